"""The scheduler against the in-memory source: retries, corruption, truncation, resume, cache,
without sockets (the same behaviours are checked against real servers in test_faults.py)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from spotstart.errors import (
    EndpointUnreachable,
    IntegrityError,
    ObjectChanged,
    RetriesExceeded,
    StallDetected,
    TransferStalled,
    TransientError,
    UsageError,
)
from spotstart.fetch import Concurrency, FetchConfig, FetchReport, NullProgress, Retry
from spotstart.fetch.engine import Fetcher
from spotstart.fetch.layout import PART_SUFFIX, work_paths
from spotstart.store import StorageURL
from spotstart.store.memory import MemorySource

MiB = 1 << 20
FAST = FetchConfig(
    chunk_bytes=MiB,
    concurrency=Concurrency(streams=4),
    retry=Retry(backoff_base_s=0.001, backoff_cap_s=0.01),
)


def blob(n: int, seed: int = 0) -> bytes:
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}-{i}".encode()).digest()
        i += 1
    return bytes(out[:n])


def run(
    source: MemorySource, dest: Path, config: FetchConfig = FAST, prefix: str = "m/"
) -> FetchReport:
    fetcher = Fetcher(source, StorageURL("gs", "bkt", prefix), dest, config, NullProgress())
    return asyncio.run(fetcher.run())


def test_tree_is_copied_byte_identical_with_relative_paths(tmp_path: Path) -> None:
    objects = {"m/a.bin": blob(3 * MiB + 7), "m/sub/b.bin": blob(5, 1), "m/empty": b""}
    report = run(MemorySource(objects), tmp_path)
    for key, data in objects.items():
        assert (tmp_path / key.removeprefix("m/")).read_bytes() == data
    assert report.files_fetched == 3
    assert report.verified["crc32c"] == 3
    assert not list(tmp_path.rglob(f"*{PART_SUFFIX}"))


def test_transient_errors_are_retried_and_counted(tmp_path: Path) -> None:
    def fault(key: str, start: int, length: int, attempt: int) -> bytes | None:
        if attempt < 2 and start == MiB:
            raise TransientError("HTTP 503 Service Unavailable")
        return None

    data = blob(4 * MiB)
    report = run(MemorySource({"m/x": data}, fault=fault), tmp_path)
    assert (tmp_path / "x").read_bytes() == data
    assert report.retries == 2


def test_corrupted_chunk_is_detected_and_refetched(tmp_path: Path) -> None:
    data = blob(4 * MiB)

    def fault(key: str, start: int, length: int, attempt: int) -> bytes | None:
        if start == 2 * MiB and attempt == 0:
            bad = bytearray(data[start : start + length])
            bad[100] ^= 0xFF
            return bytes(bad)
        return None

    report = run(MemorySource({"m/x": data}, fault=fault), tmp_path)
    assert (tmp_path / "x").read_bytes() == data
    assert report.refetched_chunks == 1


def test_persistent_corruption_fails_loudly_and_leaves_no_file(tmp_path: Path) -> None:
    data = blob(2 * MiB)

    def fault(key: str, start: int, length: int, attempt: int) -> bytes | None:
        bad = bytearray(data[start : start + length])
        bad[0] ^= 1
        return bytes(bad)

    with pytest.raises(IntegrityError, match="crc32c mismatch"):
        run(MemorySource({"m/x": data}, fault=fault), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == []


def test_md5_only_objects_are_verified_by_md5(tmp_path: Path) -> None:
    data = blob(3 * MiB)
    src = MemorySource({"m/x": data})
    src.md5_only = True  # type: ignore[attr-defined]
    original = src._info

    def md5_only(key: str):  # type: ignore[no-untyped-def]
        info = original(key)
        from dataclasses import replace

        from spotstart.store import Checksums

        return replace(info, checksums=Checksums(None, info.checksums.md5))

    src._info = md5_only  # type: ignore[method-assign]
    report = run(src, tmp_path)
    assert report.verified == {"size": 1, "md5": 1}
    assert (tmp_path / "x").read_bytes() == data


def test_persistent_truncation_exhausts_retries_and_leaves_no_final_file(tmp_path: Path) -> None:
    data = blob(2 * MiB)

    def fault(key: str, start: int, length: int, attempt: int) -> bytes | None:
        return data[start : start + length // 2]

    config = FetchConfig(
        chunk_bytes=MiB,
        concurrency=Concurrency(streams=2),
        retry=Retry(max_attempts=3, backoff_base_s=0.001),
    )
    with pytest.raises(RetriesExceeded, match="gave up after 3 attempts"):
        run(MemorySource({"m/x": data}, fault=fault), tmp_path, config)
    assert not (tmp_path / "x").exists()


def test_rerun_after_interruption_resumes_without_refetching_done_chunks(tmp_path: Path) -> None:
    data = blob(8 * MiB)
    stop_at = 5 * MiB

    def fault(key: str, start: int, length: int, attempt: int) -> bytes | None:
        if start >= stop_at:
            raise UsageError("interrupted")  # fatal: the run stops, state is kept
        return None

    config = FetchConfig(chunk_bytes=MiB, concurrency=Concurrency(streams=1))
    with pytest.raises(UsageError):
        run(MemorySource({"m/x": data}, fault=fault), tmp_path, config)
    assert work_paths(tmp_path, "x")[1].exists()
    assert not (tmp_path / "x").exists()
    second = MemorySource({"m/x": data})
    report = run(second, tmp_path, config)
    assert (tmp_path / "x").read_bytes() == data
    assert report.bytes_resumed == stop_at
    assert report.bytes_transferred == len(data) - stop_at
    assert all(start >= stop_at for _, start, _ in second.reads)


def test_journal_of_another_version_is_not_trusted(tmp_path: Path) -> None:
    old, new = blob(4 * MiB, 1), blob(4 * MiB, 2)

    def fault(key: str, start: int, length: int, attempt: int) -> bytes | None:
        if start >= 2 * MiB:
            raise UsageError("interrupted")
        return None

    config = FetchConfig(chunk_bytes=MiB, concurrency=Concurrency(streams=1))
    with pytest.raises(UsageError):
        run(MemorySource({"m/x": old}, fault=fault), tmp_path, config)
    report = run(MemorySource({"m/x": new}), tmp_path, config)
    assert report.bytes_resumed == 0
    assert (tmp_path / "x").read_bytes() == new


def test_second_run_copies_nothing_when_versions_match(tmp_path: Path) -> None:
    objects = {"m/a": blob(2 * MiB), "m/b": blob(10)}
    run(MemorySource(objects), tmp_path)
    src = MemorySource(objects)
    report = run(src, tmp_path)
    assert report.files_cached == 2 and report.files_fetched == 0
    assert report.bytes_transferred == 0 and src.reads == []


def test_changed_object_or_edited_local_file_is_fetched_again(tmp_path: Path) -> None:
    run(MemorySource({"m/a": blob(MiB, 1), "m/b": blob(MiB, 2)}), tmp_path)
    (tmp_path / "b").write_bytes(b"edited")
    report = run(MemorySource({"m/a": blob(MiB, 3), "m/b": blob(MiB, 2)}), tmp_path)
    assert report.files_fetched == 2
    assert (tmp_path / "a").read_bytes() == blob(MiB, 3)
    assert (tmp_path / "b").read_bytes() == blob(MiB, 2)


def test_dest_that_is_a_file_is_a_usage_error(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(UsageError, match="must be a directory"):
        run(MemorySource({"m/a": b"1"}), target)


def test_memory_stays_bounded_by_the_writer_queue(tmp_path: Path) -> None:
    # The writer admits at most write_queue_bytes (or one oversized batch) at a time.
    from spotstart.fetch.writer import DiskWriter

    async def scenario() -> int:
        writer = DiskWriter(queue_bytes=4 * MiB, threads=1)
        fd = os.open(tmp_path / "w", os.O_RDWR | os.O_CREAT)
        peak = 0
        futures = []
        for i in range(16):
            futures.append(await writer.write(fd, i * MiB, [blob(MiB, i)]))
            peak = max(peak, writer._queued)
        await asyncio.gather(*futures)
        writer.close()
        os.close(fd)
        return peak

    assert asyncio.run(scenario()) <= 4 * MiB
    assert (tmp_path / "w").read_bytes()[5 * MiB : 6 * MiB] == blob(MiB, 5)


class Recorder(NullProgress):
    """Progress events as a test sees them."""

    def __init__(self) -> None:
        self.net_bytes = 0
        self.retry_delays: list[float] = []

    def on_bytes(self, n: int) -> None:
        self.net_bytes += n

    def on_retry(self, what: str, error: str, delay_s: float) -> None:
        self.retry_delays.append(delay_s)


def test_progress_is_rolled_back_for_bytes_fetched_again(tmp_path: Path) -> None:
    data = blob(4 * MiB)

    def fault(key: str, start: int, length: int, attempt: int) -> bytes | None:
        if attempt == 0 and start in (0, 2 * MiB):
            return data[start : start + length // 3]  # a short body: retried from scratch
        return None

    progress = Recorder()
    fetcher = Fetcher(
        MemorySource({"m/x": data}, fault=fault),
        StorageURL("gs", "bkt", "m/"),
        tmp_path,
        FAST,
        progress,
    )
    report = asyncio.run(fetcher.run())
    assert report.retries == 2
    assert report.bytes_transferred > len(data)  # the wire saw the discarded bytes too
    assert progress.net_bytes == len(data)  # the bar never counts a byte twice


def test_server_retry_after_is_honoured(tmp_path: Path) -> None:
    def fault(key: str, start: int, length: int, attempt: int) -> bytes | None:
        if attempt == 0 and start == 0:
            raise TransientError("HTTP 503 Slow Down", retry_after_s=0.05)
        return None

    progress = Recorder()
    fetcher = Fetcher(
        MemorySource({"m/x": blob(2 * MiB)}, fault=fault),
        StorageURL("gs", "bkt", "m/"),
        tmp_path,
        FAST,  # backoff ceiling 0.01 s: only Retry-After can make the delay 0.05 s
        progress,
    )
    asyncio.run(fetcher.run())
    assert progress.retry_delays == [pytest.approx(0.05)]


def test_stream_that_stalls_on_every_attempt_is_transfer_stalled_and_resumable(
    tmp_path: Path,
) -> None:
    data = blob(3 * MiB)

    def fault(key: str, start: int, length: int, attempt: int) -> bytes | None:
        if start == 2 * MiB:
            raise StallDetected("no bytes for 1s")
        return None

    config = FetchConfig(
        chunk_bytes=MiB,
        concurrency=Concurrency(streams=1),
        retry=Retry(max_attempts=3, backoff_base_s=0.001),
    )
    with pytest.raises(TransferStalled, match="stalled on all 3 attempts") as caught:
        run(MemorySource({"m/x": data}, fault=fault), tmp_path, config)
    assert caught.value.exit_code == 7
    assert not (tmp_path / "x").exists()
    # A transient failure keeps the finished chunks for the next run.
    assert work_paths(tmp_path, "x")[1].exists()
    report = run(MemorySource({"m/x": data}), tmp_path, config)
    assert report.bytes_resumed == 2 * MiB
    assert (tmp_path / "x").read_bytes() == data


def test_object_replaced_mid_read_is_object_changed_and_leaves_nothing(tmp_path: Path) -> None:
    data = blob(4 * MiB)
    source = MemorySource({"m/x": data})

    def fault(key: str, start: int, length: int, attempt: int) -> bytes | None:
        if start == 2 * MiB:
            source.objects["m/x"] = blob(4 * MiB, 9)  # someone uploads a new version
        return None

    source.fault = fault
    config = FetchConfig(chunk_bytes=MiB, concurrency=Concurrency(streams=1))
    with pytest.raises(ObjectChanged):
        run(source, tmp_path, config)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == []


def test_unreachable_endpoint_mid_transfer_is_reported_after_retries(tmp_path: Path) -> None:
    def fault(key: str, start: int, length: int, attempt: int) -> bytes | None:
        raise EndpointUnreachable("cannot connect: connection refused")

    config = FetchConfig(
        chunk_bytes=MiB,
        concurrency=Concurrency(streams=1),
        retry=Retry(max_attempts=2, backoff_base_s=0.001),
    )
    with pytest.raises(EndpointUnreachable, match="after 2 attempts"):
        run(MemorySource({"m/x": blob(MiB)}, fault=fault), tmp_path, config)
    assert not (tmp_path / "x").exists()


def test_objects_without_checksums_are_verified_by_size_only(tmp_path: Path) -> None:
    data = blob(MiB + 1)
    report = run(MemorySource({"m/x": data}, checksums=False), tmp_path)
    assert report.verified == {"size": 1}
    assert (tmp_path / "x").read_bytes() == data


@pytest.mark.parametrize("bad_key", ["m/../escape", "m/a/../../escape"])
def test_keys_escaping_dest_are_refused_before_writing(tmp_path: Path, bad_key: str) -> None:
    dest = tmp_path / "dest"
    with pytest.raises(UsageError, match="escape DEST"):
        run(MemorySource({bad_key: b"evil", "m/ok": b"ok"}), dest)
    assert not (tmp_path / "escape").exists()
    assert not (dest / "ok").exists()


def test_single_object_url_lands_under_its_base_name(tmp_path: Path) -> None:
    data = blob(2 * MiB + 3)
    source = MemorySource({"m/sub/w.bin": data, "m/sub/w.bin.other": b"no"})
    report = run(source, tmp_path, prefix="m/sub/w.bin")
    assert report.files_total == 1
    assert (tmp_path / "w.bin").read_bytes() == data


def test_two_keys_that_map_to_one_local_file_are_refused_before_writing(tmp_path: Path) -> None:
    source = MemorySource({"m/a": blob(2 * MiB, 1), "m//a": blob(2 * MiB, 2)})
    with pytest.raises(UsageError, match="lands on the same path as"):
        run(source, tmp_path)
    assert source.reads == []
    assert not (tmp_path / "a").exists()
