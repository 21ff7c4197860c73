"""Where one object's bytes land. The scheduler only knows this protocol: a local file
(``DiskTarget``: part file, journal, atomic rename) for ``fetch``, tensors in memory for
``load`` (spotstart.weights), or both at once for a write-through cache."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import mmap
import os
import sys
import threading
from pathlib import Path
from typing import Protocol, cast

from spotstart.fetch.journal import JournalHeader, PartFile
from spotstart.fetch.verify import CrcAlgorithm
from spotstart.fetch.writer import DiskWriter
from spotstart.store import SinkError


class FileTarget(Protocol):
    """Receives the chunks of one object, in any order, and commits it when verified."""

    def open(self) -> dict[int, int]:
        """Prepare; return {chunk index: crc32c} of chunks already held (resume)."""
        ...

    @property
    def is_open(self) -> bool: ...

    async def write(self, offset: int, pieces: list[bytes]) -> asyncio.Future[None]:
        """Store consecutive ``pieces`` at object offset ``offset``; the future completes
        when they are stored. Awaiting the call itself is the backpressure."""
        ...

    def read(self, offset: int, length: int) -> bytes:
        """Bytes already stored (for MD5 verification)."""
        ...

    def stored_size(self) -> int: ...

    def commit(self, chunks: dict[int, int]) -> None:
        """Record finished chunks (journal) so a rerun can resume."""
        ...

    def finish(self) -> None:
        """The object is verified: publish it (rename, hand tensors over)."""
        ...

    def discard(self) -> None:
        """Remove every trace: the bytes must never be mistaken for the object."""
        ...

    def close(self) -> None:
        """Release resources, keeping resumable state."""
        ...


_MADV_POPULATE_WRITE = 23  # Linux >= 5.14 (include/uapi/asm-generic/mman-common.h)
_PAGE = mmap.PAGESIZE
_madvise: ctypes._CFuncPtr | None = None  # type: ignore[name-defined]
if sys.platform == "linux":
    with contextlib.suppress(OSError, AttributeError):
        _madvise = ctypes.CDLL(None, use_errno=True).madvise
        _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _madvise.restype = ctypes.c_int


def populate_write(view: memoryview) -> bool:
    """Fault in the pages under ``view``, writable, with one ``madvise(MADV_POPULATE_WRITE)``
    (ctypes releases the GIL) instead of one trap a 4 KiB page as bytes arrive: measured
    here 4.5x less CPU for filling a file's pages through mmap (bench/fetch/datapath.py).
    Whole pages inside the view only (a tensor's view need not start on a page). False where
    the kernel has no such advice (before 5.14; the pages then fault one by one, as before)
    or the memory cannot be populated; never raises."""
    global _madvise
    if _madvise is None or view.readonly or view.nbytes < _PAGE:
        return False
    holder = (ctypes.c_char * view.nbytes).from_buffer(view)
    try:
        addr = ctypes.addressof(holder)
        lo = -(-addr // _PAGE) * _PAGE
        hi = (addr + view.nbytes) // _PAGE * _PAGE
        if hi <= lo:
            return False
        if _madvise(lo, hi - lo, _MADV_POPULATE_WRITE) == 0:
            return True
        if ctypes.get_errno() == errno.EINVAL:  # an older kernel: stop asking
            _madvise = None
        return False
    finally:
        del holder


class Window:
    """Memory the direct reader receives one chunk straight into (a tensor's storage), as
    consecutive segments (a chunk that starts in a file's header lands its first bytes in a
    scratch segment): a :class:`~spotstart.store.BodySink` that hands out the rest of each
    in turn. Pages are faulted in with one call per segment before its first byte
    (:func:`populate_write`)."""

    def __init__(self, *segments: memoryview) -> None:
        self.segments = [s for s in segments if s.nbytes]
        self._seg = 0
        self._pos = 0
        self._populated = -1

    def space(self) -> memoryview:
        seg = self.segments[self._seg]
        if self._populated < self._seg:  # on the reader's thread, once a segment
            self._populated = self._seg
            populate_write(seg)
        return seg[self._pos :]

    def took(self, n: int) -> None:
        self._pos += n
        if self._pos == self.segments[self._seg].nbytes and self._seg + 1 < len(self.segments):
            self._seg += 1
            self._pos = 0

    def crc(self, algorithm: CrcAlgorithm) -> int:
        """The checksum of what landed (the whole window: called once it is full)."""
        crc = 0
        for seg in self.segments:
            crc = algorithm.update(seg, crc)
        return crc

    def close(self) -> None:
        # A reader thread still writing (its task was cancelled) may hold slices: then the GC
        # releases the views once it is done, never under it.
        for seg in self.segments:
            with contextlib.suppress(BufferError):
                seg.release()


_buffers = threading.local()
LANDING_BYTES = 1 << 20  # a reader thread's reused buffer: a MiB a recv, a CRC update, a write
ALIGN = 4096  # O_DIRECT: file offsets, lengths and buffer addresses in whole 4 KiB blocks


def _landing_buffer() -> memoryview:
    """This thread's page-aligned buffer (anonymous mmap), made once and reused."""
    buf = getattr(_buffers, "buf", None)
    if buf is None:
        buf = _buffers.buf = memoryview(mmap.mmap(-1, LANDING_BYTES + ALIGN))
    return cast(memoryview, buf)


def pwrite_all(fd: int, data: memoryview, at: int) -> None:
    """All of ``data`` at offset ``at`` (pwrite may write less than asked)."""
    while data:
        n = os.pwrite(fd, data, at)
        data, at = data[n:], at + n


class FileWindow(Window):
    """One chunk of a local file by way of the reader thread's reused, page-aligned buffer:
    ``recv_into`` it, CRC it while it is hot in cache, write it. Whole 4 KiB blocks go with
    ``O_DIRECT`` (the part file's :meth:`~PartFile.direct_fd`), skipping the page cache;
    unaligned heads and tails, and filesystems without ``O_DIRECT``, through the page cache.
    Measured here (bench/fetch/datapath.py): mapping the file's pages and receiving into
    them costs page faults, read-ahead zero-filling the unwritten blocks, and, in a VM, the
    host backing fresh page-cache memory (~2.5 CPU-s/GiB on these machines); O_DIRECT
    writes from a reused buffer cost ~0.05 CPU-s/GiB at 2 GB/s."""

    def __init__(
        self,
        part: PartFile,
        offset: int,
        length: int,
        algorithm: CrcAlgorithm,
        *,
        direct: bool = True,
    ) -> None:
        self.part, self.offset, self.length = part, offset, length
        self.algorithm = algorithm
        self._direct = part.direct_fd() if direct else None  # on the loop: opened once
        self._buf: memoryview | None = None
        # The buffer index of a byte is congruent to its file offset mod ALIGN, so whole
        # blocks of the file sit at aligned addresses: the first fill starts at the skew.
        self._base = self._fill = offset % ALIGN
        self._written = 0
        self._crc = 0

    def space(self) -> memoryview:
        if self._buf is None:
            self._buf = _landing_buffer()
        return self._buf[self._fill :]

    def took(self, n: int) -> None:
        self._fill += n
        assert self._buf is not None
        if self._fill == len(self._buf) or self._written + self._fill - self._base >= self.length:
            self._flush(self._buf[self._base : self._fill])

    def _flush(self, data: memoryview) -> None:
        self._crc = self.algorithm.update(data, self._crc)
        at = self.offset + self._written
        try:
            self._write(data, at)
        except OSError as exc:
            raise SinkError(exc) from exc
        self._written += len(data)
        self._base = self._fill = 0

    def _write(self, data: memoryview, at: int) -> None:
        fd = self.part.fd
        lo = -(-at // ALIGN) * ALIGN  # the whole blocks inside [at, at + len)
        hi = (at + len(data)) // ALIGN * ALIGN
        if self._direct is None or hi <= lo:
            pwrite_all(fd, data, at)
            return
        try:
            pwrite_all(self._direct, data[lo - at : hi - at], lo)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.part.refuse_direct()  # the device wants more alignment: the page cache
            self._direct = None
            pwrite_all(fd, data[lo - at : hi - at], lo)
        pwrite_all(fd, data[: lo - at], at)
        pwrite_all(fd, data[hi - at :], hi)

    def crc(self, algorithm: CrcAlgorithm) -> int:
        assert algorithm is self.algorithm and self._written == self.length
        return self._crc

    def close(self) -> None:
        self._buf = None  # the buffer stays with its thread


class DiskTarget:
    """A local file: preallocated part file + journal, atomic rename on finish."""

    def __init__(
        self,
        final: Path,
        header: JournalHeader,
        writer: DiskWriter,
        *,
        fsync: bool,
        work: tuple[Path, Path] | None = None,
        direct_io: bool = True,
    ) -> None:
        self.part = PartFile(final, header, fsync=fsync, work=work, direct_io=direct_io)
        self.writer = writer

    def open(self) -> dict[int, int]:
        return self.part.open()

    @property
    def fd(self) -> int:
        """The open part file's descriptor (a write-through copy lands through it)."""
        return self.part.fd

    @property
    def is_open(self) -> bool:
        return self.part.fd >= 0

    async def write(self, offset: int, pieces: list[bytes]) -> asyncio.Future[None]:
        return await self.writer.write(self.part.fd, offset, pieces)

    def window(
        self, offset: int, length: int, algorithm: CrcAlgorithm, *, reread: bool = False
    ) -> Window | None:
        """``[offset, offset+length)`` of the part file, for the direct reader to land
        through a reused buffer (:class:`FileWindow`); ``reread``: the bytes are read back
        soon (an in-order MD5), so they go through the page cache, not O_DIRECT."""
        if length <= 0:
            return None
        return FileWindow(self.part, offset, length, algorithm, direct=not reread)

    def read(self, offset: int, length: int) -> bytes:
        first = os.pread(self.part.fd, length, offset)
        if len(first) == length:
            return first  # the usual case: no extra copy
        out = bytearray(first)
        while len(out) < length:
            data = os.pread(self.part.fd, length - len(out), offset + len(out))
            if not data:
                raise OSError(f"{self.part.part}: shorter than expected at {offset + len(out)}")
            out += data
        return bytes(out)

    def stored_size(self) -> int:
        return os.fstat(self.part.fd).st_size

    def commit(self, chunks: dict[int, int]) -> None:
        self.part.commit(chunks)

    def finish(self) -> None:
        self.part.finish()

    def discard(self) -> None:
        self.part.discard()

    def close(self) -> None:
        self.part.close()
