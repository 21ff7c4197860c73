"""Faults injected by the link emulator between fetch and real servers, a killed process, a
full disk."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from spotstart import FetchConfig, fetch
from spotstart.emulate.link import FaultRule, LinkConfig
from spotstart.emulate.storage import StorageEmulator
from spotstart.errors import DiskFull, IntegrityError, RetriesExceeded
from spotstart.fetch import Concurrency, Retry
from spotstart.fetch.layout import work_paths
from spotstart.store import HttpOptions
from tests.conftest import BUCKET, error_line, run_cli, spawn_cli

MiB = 1 << 20
QUICK = FetchConfig(
    chunk_bytes=MiB,
    concurrency=Concurrency(streams=4),
    retry=Retry(backoff_base_s=0.01, backoff_cap_s=0.05),
)


@pytest.fixture
def obj(clean_cloud: StorageEmulator, gcs_env: dict[str, str], s3_env: dict[str, str]) -> bytes:
    data = os.urandom(6 * MiB)
    clean_cloud.seed_gcs(BUCKET, {"faults/w.bin": data})
    clean_cloud.seed_s3(BUCKET, {"faults/w.bin": data})
    return data


@pytest.mark.parametrize("store", ["gs", "s3"])
def test_resets_and_503_bursts_are_survived_with_retries(
    store: str, obj: bytes, clean_cloud: StorageEmulator, tmp_path: Path
) -> None:
    clean_cloud.set_faults(
        [
            FaultRule(kind="reset", count=2, after_bytes=200_000, ranged_only=True),
            FaultRule(kind="status", status=503, count=3, ranged_only=True, retry_after_s=0),
            FaultRule(kind="status", status=429, count=1, ranged_only=True),
        ]
    )
    report = fetch(f"{store}://{BUCKET}/faults/w.bin", tmp_path, QUICK)
    assert (tmp_path / "w.bin").read_bytes() == obj
    assert report.retries >= 6


@pytest.mark.parametrize(("store", "checksum"), [("gs", "crc32c"), ("s3", "md5")])
def test_corrupted_body_is_detected_by_checksum_and_refetched(
    store: str, checksum: str, obj: bytes, clean_cloud: StorageEmulator, tmp_path: Path
) -> None:
    clean_cloud.set_faults([FaultRule(kind="corrupt", at_byte=12345, count=1, ranged_only=True)])
    report = fetch(f"{store}://{BUCKET}/faults/w.bin", tmp_path, QUICK)
    assert (tmp_path / "w.bin").read_bytes() == obj
    assert report.refetched_chunks == 1
    assert report.verified == {"size": 1, checksum: 1}


@pytest.mark.parametrize("store", ["gs", "s3"])
def test_persistent_corruption_fails_with_exit_6_and_no_file(
    store: str,
    obj: bytes,
    clean_cloud: StorageEmulator,
    tmp_path: Path,
    s3_env: dict[str, str],
    gcs_env: dict[str, str],
) -> None:
    clean_cloud.set_faults([FaultRule(kind="corrupt", at_byte=7, count=10_000, ranged_only=True)])
    env = {**s3_env, **gcs_env}
    res = run_cli(
        ["fetch", f"{store}://{BUCKET}/faults/w.bin", str(tmp_path), "--chunk-size", "1M"], env
    )
    assert res.code == IntegrityError.exit_code, res.stderr
    assert "mismatch" in error_line(res.stderr)
    assert not [p for p in tmp_path.iterdir() if p.is_file()]
    with pytest.raises(IntegrityError):
        fetch(f"{store}://{BUCKET}/faults/w.bin", tmp_path, QUICK)


def test_persistent_truncation_exhausts_retries_without_a_final_file(
    obj: bytes, clean_cloud: StorageEmulator, tmp_path: Path
) -> None:
    clean_cloud.set_faults(
        [FaultRule(kind="truncate", after_bytes=1000, count=10_000, ranged_only=True)]
    )
    cfg = FetchConfig(
        chunk_bytes=MiB,
        concurrency=Concurrency(streams=2),
        retry=Retry(max_attempts=3, backoff_base_s=0.01),
    )
    with pytest.raises(RetriesExceeded, match=r"body ended|gave up"):
        fetch(f"gs://{BUCKET}/faults/w.bin", tmp_path, cfg)
    assert not (tmp_path / "w.bin").exists()


def test_stalled_stream_is_replaced(
    obj: bytes, clean_cloud: StorageEmulator, tmp_path: Path
) -> None:
    clean_cloud.set_faults(
        [FaultRule(kind="stall", after_bytes=50_000, seconds=60, count=1, ranged_only=True)]
    )
    cfg = FetchConfig(
        chunk_bytes=MiB,
        concurrency=Concurrency(streams=4),
        http=HttpOptions(stall_timeout_s=1.0),
        retry=Retry(backoff_base_s=0.01),
    )
    report = fetch(f"gs://{BUCKET}/faults/w.bin", tmp_path, cfg)
    assert (tmp_path / "w.bin").read_bytes() == obj
    assert report.stalls == 1


def _wait_for(predicate, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_rerun_after_kill_9_resumes_and_fetches_fewer_bytes(
    clean_cloud: StorageEmulator, gcs_env: dict[str, str], tmp_path: Path
) -> None:
    data = os.urandom(48 * MiB)
    clean_cloud.seed_gcs(BUCKET, {"kill/w.bin": data})
    clean_cloud.set_link(LinkConfig(per_conn_bytes_per_s=4e6, first_byte_latency_s=0.0))
    args = [
        "fetch",
        f"gs://{BUCKET}/kill/w.bin",
        str(tmp_path),
        "--chunk-size",
        "2M",
        "--concurrency",
        "2",
        "--json",
    ]
    proc = spawn_cli(args, gcs_env)
    part, journal = work_paths(tmp_path, "w.bin")

    def two_chunks_journaled() -> bool:
        return journal.exists() and len(journal.read_text().splitlines()) >= 3

    try:
        _wait_for(two_chunks_journaled, 60, "journaled chunks")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert not (tmp_path / "w.bin").exists()
    assert part.exists()
    clean_cloud.set_link(LinkConfig(per_conn_bytes_per_s=None, first_byte_latency_s=0.0))
    res = run_cli(args, gcs_env)
    assert res.code == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["bytes_resumed"] >= 4 * MiB
    assert report["bytes_transferred"] <= len(data) - report["bytes_resumed"]
    assert (tmp_path / "w.bin").read_bytes() == data
    assert not journal.exists()


def test_full_disk_is_a_clear_error_with_no_final_file(
    obj: bytes, tmp_path: Path, gcs_env: dict[str, str]
) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        res = run_cli(["fetch", f"gs://{BUCKET}/faults/w.bin", str(mnt / "d")], gcs_env)
        assert res.code == DiskFull.exit_code, res.stderr
        assert "space" in error_line(res.stderr)
        assert not (mnt / "d" / "w.bin").exists()
        assert not work_paths(mnt / "d", "w.bin")[0].exists()
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.parametrize(("size", "tmpfs"), [(21_000_000, "20m"), (30_000_000, "20m")])
def test_disk_full_message_tells_the_two_sizes_apart(
    size: int, tmpfs: str, clean_cloud: StorageEmulator, tmp_path: Path, gcs_env: dict[str, str]
) -> None:
    clean_cloud.seed_gcs(BUCKET, {f"df/{size}.bin": b"\0" * size})
    mnt = _small_tmpfs(tmp_path / "small", tmpfs)
    try:
        res = run_cli(["fetch", f"gs://{BUCKET}/df/{size}.bin", str(mnt / "d")], gcs_env)
        assert res.code == DiskFull.exit_code, res.stderr
        line = error_line(res.stderr)
        m = re.search(r"needs (.+), only (.+) free", line)
        assert m is not None and m.group(1) != m.group(2), line
        assert ("21,000,000 bytes" in line) == (size == 21_000_000)
        assert ("30.0 MB" in line) == (size == 30_000_000)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_persistent_truncation_exits_7_with_one_line_and_no_final_file(
    obj: bytes, clean_cloud: StorageEmulator, tmp_path: Path, s3_env: dict[str, str]
) -> None:
    clean_cloud.set_faults(
        [FaultRule(kind="truncate", after_bytes=1000, count=10_000, ranged_only=True)]
    )
    args = ["fetch", f"s3://{BUCKET}/faults/w.bin", str(tmp_path), "--chunk-size", "1M"]
    res = run_cli([*args, "--retries", "2"], s3_env)
    assert res.code == RetriesExceeded.exit_code, res.stderr
    assert "gave up after 2 attempts" in error_line(res.stderr)
    assert not (tmp_path / "w.bin").exists()


def test_stalled_stream_is_replaced_when_stall_timeout_is_short(
    obj: bytes, clean_cloud: StorageEmulator, tmp_path: Path, s3_env: dict[str, str]
) -> None:
    clean_cloud.set_faults(
        [FaultRule(kind="stall", after_bytes=10_000, seconds=120, count=2, ranged_only=True)]
    )
    args = ["fetch", f"s3://{BUCKET}/faults/w.bin", str(tmp_path), "--chunk-size", "1M"]
    res = run_cli([*args, "--stall-timeout", "1", "--json"], s3_env)
    assert res.code == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["stalls"] == 2 and report["retries"] >= 2
    assert (tmp_path / "w.bin").read_bytes() == obj


def test_http_source_survives_resets_and_503s(
    obj: bytes, clean_cloud: StorageEmulator, tmp_path: Path
) -> None:
    clean_cloud.set_faults(
        [
            FaultRule(kind="reset", count=2, after_bytes=100_000, ranged_only=True),
            FaultRule(kind="status", status=503, count=2, ranged_only=True),
        ]
    )
    report = fetch(f"{clean_cloud.http_base}/{BUCKET}/faults/w.bin", tmp_path, QUICK)
    assert (tmp_path / "w.bin").read_bytes() == obj
    # The two 503s always land (the link answers them itself). A reset rule is spent on the
    # one-byte range probe (its body ends before 100 kB) and on any body fake-gcs sends
    # chunked (the link relays those untouched), so the resets add 0 to 2 more.
    assert report.retries >= 2


def test_interrupt_exits_130_and_the_rerun_resumes(
    clean_cloud: StorageEmulator, gcs_env: dict[str, str], tmp_path: Path
) -> None:
    data = os.urandom(24 * MiB)
    clean_cloud.seed_gcs(BUCKET, {"int/w.bin": data})
    clean_cloud.set_link(LinkConfig(per_conn_bytes_per_s=4e6, first_byte_latency_s=0.0))
    args = ["fetch", f"gs://{BUCKET}/int/w.bin", str(tmp_path), "--chunk-size", "1M"]
    args += ["--concurrency", "2", "--json"]
    proc = spawn_cli(args, gcs_env)
    journal = work_paths(tmp_path, "w.bin")[1]
    try:
        _wait_for(
            lambda: journal.exists() and len(journal.read_text().splitlines()) >= 2,
            60,
            "a journaled chunk",
        )
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "w.bin").exists()
    clean_cloud.set_link(LinkConfig(per_conn_bytes_per_s=None, first_byte_latency_s=0.0))
    res = run_cli(args, gcs_env)
    assert res.code == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["bytes_resumed"] >= MiB
    assert report["bytes_transferred"] == len(data) - report["bytes_resumed"]
    assert (tmp_path / "w.bin").read_bytes() == data


def _small_tmpfs(where: Path, size: str) -> Path:
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    return where


def test_disk_filling_up_after_the_space_check_is_disk_full_and_cleans_up(
    obj: bytes, tmp_path: Path, gcs_env: dict[str, str]
) -> None:
    # A part file left by an older run passes the free-space check (its blocks were counted
    # as reserved) but belongs to another version: preallocating the new one hits ENOSPC.
    mnt = _small_tmpfs(tmp_path / "small", "2m")
    try:
        dest = mnt / "d"
        dest.mkdir()
        old_part = work_paths(dest, "w.bin")[0]
        old_part.parent.mkdir(parents=True)
        old_part.write_bytes(b"old")
        res = run_cli(["fetch", f"gs://{BUCKET}/faults/w.bin", str(dest)], gcs_env)
        assert res.code == DiskFull.exit_code, res.stderr
        assert "no space left" in error_line(res.stderr)
        assert sorted(p.name for p in dest.iterdir() if p.name != ".spotstart") == []
        assert not old_part.exists()
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_503_on_head_is_retried_so_the_http_checksums_are_not_lost(
    obj: bytes, clean_cloud: StorageEmulator, tmp_path: Path
) -> None:
    url = f"{clean_cloud.http_base}/{BUCKET}/faults/w.bin"
    assert "crc32c" in fetch(url, tmp_path / "a", QUICK).verified  # fake-gcs sends x-goog-hash
    clean_cloud.set_faults([FaultRule(kind="status", status=503, count=1, method="HEAD")])
    report = fetch(url, tmp_path / "b", QUICK)
    assert (tmp_path / "b" / "w.bin").read_bytes() == obj
    assert "crc32c" in report.verified and report.retries >= 1
