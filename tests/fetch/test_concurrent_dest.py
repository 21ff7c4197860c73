"""Several `spotstart fetch` processes into one DEST at once (two pods on one shared volume, a
rerun beside a run still going): each file is written by one of them under its lock
(fetch/lock.py), the others wait and find it current; a final name only ever holds a
complete file; a killed holder's lock dies with it and the next run resumes its part file.
Real processes against the storage emulator (GCS JSON API), its link slowed so the race
lasts long enough to watch."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from spotstart.emulate.link import LinkConfig
from spotstart.emulate.storage import StorageEmulator
from spotstart.fetch.layout import STATE_DIR, work_paths
from tests.conftest import BUCKET, error_line, run_cli, spawn_cli

KiB, MiB = 1 << 10, 1 << 20
SLOW = LinkConfig(per_conn_bytes_per_s=3e6, first_byte_latency_s=0.0)
SLOWER = LinkConfig(per_conn_bytes_per_s=1e6, first_byte_latency_s=0.0)  # a kill lands mid-file
# ~8 s for the whole prefix whatever the streams: a second process started on a loaded box
# (seconds of interpreter start-up) still finds the first one writing
CAPPED = LinkConfig(per_conn_bytes_per_s=1e6, aggregate_bytes_per_s=1e6, first_byte_latency_s=0.0)


def _seed(cloud: StorageEmulator, prefix: str) -> dict[str, bytes]:
    objects = {
        "a.bin": os.urandom(5 * MiB),
        "sub/b.bin": os.urandom(3 * MiB + 123),
        "c.json": os.urandom(300 * KiB),
    }
    cloud.seed_gcs(BUCKET, {f"{prefix}/{k}": v for k, v in objects.items()})
    return objects


def _args(prefix: str, dest: Path, *extra: str) -> list[str]:
    return [
        "fetch",
        f"gs://{BUCKET}/{prefix}/",
        str(dest),
        "--chunk-size",
        "1M",
        "--concurrency",
        "2",
        "--json",
        *extra,
    ]


def _wrong_final_files(dest: Path, objects: dict[str, bytes]) -> list[str]:
    """Final names that exist but do not hold their object's bytes, whole."""
    wrong = []
    for rel, data in objects.items():
        try:
            got = (dest / rel).read_bytes()
        except FileNotFoundError:
            continue
        if hashlib.sha256(got).digest() != hashlib.sha256(data).digest():
            wrong.append(f"{rel}: {len(got)} of {len(data)} bytes")
    return wrong


def _leftovers(dest: Path) -> list[str]:
    parts = dest / STATE_DIR / "parts"
    return sorted(p.name for p in parts.iterdir()) if parts.exists() else []


def _wait_for(predicate, proc: subprocess.Popen[str], what: str) -> None:  # type: ignore[no-untyped-def]
    # Bounded by pytest-timeout, not by a clock: a dead process ends the wait at once.
    while not predicate():
        assert proc.poll() is None, f"exited {proc.returncode} before {what}: {proc.stderr}"
        time.sleep(0.02)


def test_four_fetches_into_one_dest_each_file_written_once_never_seen_half(
    clean_cloud: StorageEmulator, gcs_env: dict[str, str], tmp_path: Path
) -> None:
    objects = _seed(clean_cloud, "race4")
    dest = tmp_path / "dest"
    clean_cloud.set_link(SLOW)
    procs = [spawn_cli(_args("race4", dest), gcs_env) for _ in range(4)]
    polls, wrong = 0, []
    while any(p.poll() is None for p in procs):
        wrong += _wrong_final_files(dest, objects)
        polls += 1
    outs = [p.communicate() for p in procs]
    assert not wrong, wrong
    assert polls > 10  # the race was watched, not missed
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    reports = [json.loads(out) for out, _ in outs]
    for rel, data in objects.items():
        assert (dest / rel).read_bytes() == data
    # One runner wrote each file; the rest waited for its lock and found it current.
    assert sum(r["files_fetched"] for r in reports) == len(objects)
    assert all(r["files_fetched"] + r["files_cached"] == len(objects) for r in reports)
    assert sum(r["bytes_transferred"] for r in reports) == sum(map(len, objects.values()))
    assert _leftovers(dest) == []  # no part file, journal or lock left
    index = json.loads((dest / STATE_DIR / "index.json").read_text())
    assert sorted(index["files"]) == sorted(objects)  # no runner's save dropped another's


def test_no_wait_exits_17_while_another_fetch_writes_and_touches_nothing(
    clean_cloud: StorageEmulator, gcs_env: dict[str, str], tmp_path: Path
) -> None:
    objects = _seed(clean_cloud, "nowait")
    dest = tmp_path / "dest"
    clean_cloud.set_link(CAPPED)
    first = spawn_cli(_args("nowait", dest), gcs_env)
    _, journal = work_paths(dest, "a.bin")
    try:
        _wait_for(journal.exists, first, "the first fetch's journal")
        before = journal.read_bytes()
        res = run_cli(_args("nowait", dest, "--no-wait"), gcs_env)
        assert res.code == 17, res.stderr
        assert "another fetch is writing" in error_line(res.stderr)
        assert journal.read_bytes()[: len(before)] == before  # its journal, only grown
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == 0, err
    assert json.loads(out)["files_fetched"] == len(objects)
    for rel, data in objects.items():
        assert (dest / rel).read_bytes() == data
    # Nothing left to write: --no-wait finds every file current and exits 0.
    again = run_cli(_args("nowait", dest, "--no-wait"), gcs_env)
    assert again.code == 0, again.stderr
    assert json.loads(again.stdout)["files_cached"] == len(objects)


def test_a_killed_holder_does_not_block_the_waiter_which_resumes_its_part_file(
    clean_cloud: StorageEmulator, gcs_env: dict[str, str], tmp_path: Path
) -> None:
    objects = _seed(clean_cloud, "killed")
    dest = tmp_path / "dest"
    clean_cloud.set_link(SLOWER)
    holder = spawn_cli(_args("killed", dest), gcs_env)
    _, journal = work_paths(dest, "a.bin")

    def two_chunks_journaled() -> bool:
        return journal.exists() and len(journal.read_text().splitlines()) >= 3

    waiter = None
    try:
        _wait_for(journal.exists, holder, "the holder's journal")
        waiter = spawn_cli(_args("killed", dest), gcs_env)
        _wait_for(two_chunks_journaled, holder, "two journaled chunks")
        assert waiter.poll() is None  # waiting for the holder's lock
        holder.send_signal(signal.SIGKILL)
        holder.communicate()
        assert _wrong_final_files(dest, objects) == []
        clean_cloud.set_link(LinkConfig(per_conn_bytes_per_s=None, first_byte_latency_s=0.0))
        out, err = waiter.communicate(timeout=300)
    finally:
        for p in (holder, waiter):
            if p is not None and p.poll() is None:
                p.kill()
                p.communicate()
    assert waiter.returncode == 0, err
    report = json.loads(out)
    assert report["bytes_resumed"] >= 2 * MiB  # the killed run's journaled chunks
    for rel, data in objects.items():
        assert (dest / rel).read_bytes() == data
    assert _leftovers(dest) == []
