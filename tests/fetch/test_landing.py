"""The direct reader's landing for a local file (``FileWindow``): bytes received into a reused
page-aligned buffer, whole 4 KiB blocks written with O_DIRECT, unaligned heads and tails
through the page cache. Any chunk layout and any recv sizes must land the same bytes with the
same CRC, on filesystems with and without O_DIRECT."""

from __future__ import annotations

import errno
import itertools
import os
import random
from pathlib import Path

import google_crc32c
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spotstart.errors import DiskFull
from spotstart.fetch.journal import JournalHeader, PartFile, local_error
from spotstart.fetch.target import ALIGN, FileWindow
from spotstart.fetch.verify import CRC32C
from spotstart.store import SinkError


def _part(tmp: Path, size: int) -> PartFile:
    header = JournalHeader(source="gs://b/o", size=size, version="1", chunk_bytes=1 << 20)
    part = PartFile(tmp / "o.bin", header, fsync=False)
    part.open()
    return part


def _land(window: FileWindow, data: bytes, rng: random.Random) -> None:
    """What the reader does: ask for space, fill a random amount of it, report it."""
    pos = 0
    while pos < len(data):
        space = window.space()
        n = min(len(space), len(data) - pos, rng.choice([1, 7, 4096, 65_536, 1 << 20, 3 << 20]))
        space[:n] = data[pos : pos + n]
        window.took(n)
        pos += n


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    size=st.integers(1, 3 << 20),
    cuts=st.lists(st.integers(1, 1 << 20), max_size=6),
    seed=st.integers(0, 2**32),
    direct=st.booleans(),
)
def test_any_chunking_and_recv_sizes_land_every_byte_with_its_crc(
    tmp_path_factory: pytest.TempPathFactory, size: int, cuts: list[int], seed: int, direct: bool
) -> None:
    tmp = tmp_path_factory.mktemp("landing")
    rng = random.Random(seed)
    data = rng.randbytes(size)
    part = _part(tmp, size)
    if not direct:
        part.refuse_direct()
    bounds, pos = [0], 0
    for c in cuts:  # chunk boundaries anywhere, aligned or not (S3 parts of 5,000,000 bytes)
        pos += c
        if pos < size:
            bounds.append(pos)
    bounds.append(size)
    chunks = list(itertools.pairwise(bounds))
    rng.shuffle(chunks)  # chunks land in any order
    try:
        for lo, hi in chunks:
            w = FileWindow(part, lo, hi - lo, CRC32C)
            _land(w, data[lo:hi], rng)
            assert w.crc(CRC32C) == google_crc32c.value(data[lo:hi])
            w.close()
        assert os.pread(part.fd, size + 1, 0) == data
    finally:
        part.close()


def test_the_direct_descriptor_takes_whole_blocks_whatever_the_chunk_offsets(
    tmp_path: Path,
) -> None:
    size = 8 * ALIGN + 100
    part = _part(tmp_path, size)
    try:
        assert part.direct_fd() is not None, "ext4 under the test run takes O_DIRECT"
        data = os.urandom(size)
        for lo, hi in ((0, 100), (100, 3 * ALIGN + 7), (3 * ALIGN + 7, size)):
            w = FileWindow(part, lo, hi - lo, CRC32C)
            _land(w, data[lo:hi], random.Random(lo))
        # Unaligned chunk starts still put whole blocks at aligned addresses: the kernel
        # refused nothing (an EINVAL would have switched the file to the page cache).
        assert part.direct_fd() is not None
        assert os.pread(part.fd, size, 0) == data
    finally:
        part.close()


def test_a_device_refusing_our_alignment_falls_back_to_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = 64 * ALIGN
    part = _part(tmp_path, size)
    direct = part.direct_fd()
    assert direct is not None
    real = os.pwrite

    def pwrite(fd: int, data: object, at: int) -> int:
        if fd == direct:  # what a device with 64 KiB logical blocks answers to 4 KiB writes
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, at)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "pwrite", pwrite)
    try:
        data = os.urandom(size)
        for lo in (0, size // 2):
            w = FileWindow(part, lo, size // 2, CRC32C)
            _land(w, data[lo : lo + size // 2], random.Random(lo))
        assert part.direct_fd() is None  # refused once: never asked again for this file
        assert os.pread(part.fd, size, 0) == data
    finally:
        part.close()


def test_a_write_failure_is_a_sink_error_carrying_the_os_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    part = _part(tmp_path, 2 * ALIGN)

    def full(fd: int, data: object, at: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    try:
        w = FileWindow(part, 0, 2 * ALIGN, CRC32C)
        with pytest.raises(SinkError) as caught:
            _land(w, bytes(2 * ALIGN), random.Random(0))
        assert caught.value.cause.errno == errno.ENOSPC
        assert isinstance(local_error(part.part, caught.value.cause, "writing"), DiskFull)
    finally:
        part.close()
