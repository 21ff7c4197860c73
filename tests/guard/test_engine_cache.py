"""`spotstart guard --engine-cache` end to end: a real guard process supervising a fake engine
(a small Python server that finds its caches restored, or "compiles" them into the directories
the guard points it at, then serves /health), against a file:// bucket and the S3 emulator.
First start: miss, cold, published; second: hit, the identical files, warm; a changed key: miss.
A SIGTERM during the restore starts no server; a publish never holds up a drain. The events the
guard writes are read back by `spotstart timeline`."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from spotstart import timeline
from spotstart.emulate.link import FaultRule
from spotstart.emulate.storage import StorageEmulator, _http, s3_signed_headers
from spotstart.guard.notice import NoticeKind, PreemptionNotice
from tests.conftest import BUCKET
from tests.guard.test_proxy import Proc, free_ports, start_guard, wait_until_ready

ENGINE_CMD = [
    sys.executable,
    "-c",
    "import os; from tests.guard.fake_engine import fake_engine; "
    "fake_engine(int(os.environ['FAKE_PORT']), os.environ['FAKE_REPORT'])",
]  # the same argv on every node (it is part of the key): the port and report in the env


@dataclass
class Run:
    proc: Proc
    url: str
    node: Path
    events: Path

    @property
    def report(self) -> dict[str, Any]:
        return dict(json.loads((self.node / "report.json").read_text()))

    def stop(self, timeout_s: float = 30) -> int:
        self.proc.popen.send_signal(signal.SIGTERM)
        code = self.proc.popen.wait(timeout=timeout_s)
        self.proc.close()
        return code


def start(
    node: Path, cache_url: str, *flags: str, env: dict[str, str] | None = None, ready: bool = True
) -> Run:
    """A guard on ``node`` (its own events file and engine report) in front of the fake
    engine, with ``--engine-cache cache_url``. The cache dir is the same path on every node
    (the key holds it: compiled code may name its own path), emptied first: a fresh node."""
    node.mkdir(parents=True)
    cache = node.parent / "cache"
    if cache.exists():
        shutil.rmtree(cache)
    port, listen = free_ports(2)
    events = node / "events.jsonl"
    proc, url = start_guard(
        f"http://127.0.0.1:{port}",
        "--cloud",
        "none",
        "--health-interval",
        "0.1",
        "--events",
        str(events),
        "--engine-cache",
        cache_url,
        "--engine-cache-dir",
        str(cache),
        *flags,
        "--",
        *ENGINE_CMD,
        listen_port=listen,
        env={
            "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
            "FAKE_PORT": str(port),
            "FAKE_REPORT": str(node / "report.json"),
            **(env or {}),
        },
    )
    run = Run(proc, url, node, events)
    if ready:
        wait_until_ready(url, timeout_s=90, proc=proc)
    return run


def get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as r:
        return str(r.read().decode())


def event_list(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_three_starts(root: Path, url: str, manifests: Any, env: dict[str, str]) -> None:
    # 1: nothing in the bucket: cold, and what the engine wrote is published
    first = start(root / "n1", url, env=env)
    first.proc.wait_for_line("engine cache: published", timeout_s=60)
    assert first.stop() == 0, first.proc.text
    assert "starting cold" in first.proc.text and "miss for key" in first.proc.text
    assert first.report["restored"] is False
    assert len(manifests()) == 1
    # 2: a fresh node, the same key: warm, the very same files, nothing published again
    serve = free_ports(1)[0]
    second = start(root / "n2", url, "--engine-cache-serve", f"127.0.0.1:{serve}", env=env)
    assert second.report["restored"] is True, second.proc.text
    assert second.report["files"] == first.report["files"]
    assert re.search(r"restored \d+ files, [\d.]+ MB in [\d.]+ s", second.proc.text)
    metrics = get(second.url + "/spotstart/metrics")
    assert 'spotstart_guard_engine_cache_restores_total{outcome="hit"} 1.0' in metrics
    assert re.search(r"^spotstart_guard_engine_cache_restore_bytes [1-9]", metrics, re.M)
    # the archive it restored is served to other replicas (loopback: no token needed)
    inventory = json.loads(get(f"http://127.0.0.1:{serve}/v1/inventory"))
    (fetched,) = [e for e in event_list(second.events) if e["phase"] == "fetch"]
    served = [(o["size"], o["complete"]) for o in inventory["objects"]]
    assert served == [(fetched["bytes"], True)], inventory
    assert second.stop() == 0
    assert "publishing" not in second.proc.text
    assert len(manifests()) == 1
    # 3: another key (a key-extra): miss, cold, and its own cache published beside the first
    third = start(root / "n3", url, "--engine-cache-key-extra", "model-rev-2", env=env)
    third.proc.wait_for_line("engine cache: published", timeout_s=60)
    assert third.stop() == 0
    assert third.report["restored"] is False and "miss for key" in third.proc.text
    assert len(manifests()) == 2
    # the guard's events: engine-init cold/warm with the restore's outcome
    inits = {
        n: [e for e in event_list(root / n / "events.jsonl") if e["phase"] == "engine-init"]
        for n in ("n1", "n2", "n3")
    }
    assert [(e["detail"], e["cache"]) for e in inits["n1"]] == [("cold", "miss")]
    assert [(e["detail"], e["cache"]) for e in inits["n2"]] == [("warm", "hit")]
    assert [(e["detail"], e["cache"]) for e in inits["n3"]] == [("cold", "miss")]
    # and the timeline shows the warm start with the restore as its own phase on the path
    phases = timeline.collect([root / "n2" / "events.jsonl"])
    names = [p.name for p in phases]
    assert "engine-init (warm)" in names and "engine-cache-restore" in names, names
    # (no tolerance: this start's phases last milliseconds, the default's 0.5 s would merge them)
    path = [p.name for p in timeline.critical_path(phases, tol_s=0.0)]
    assert path[:2] == ["server-start", "engine-cache-restore"], path
    assert "engine-init (warm)" in path[2:], path


def test_file_bucket_cold_publishes_then_warm_restores_the_same_files_and_a_new_key_misses(
    tmp_path: Path,
) -> None:
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    check_three_starts(
        tmp_path, f"file://{bucket}", lambda: sorted(bucket.rglob("manifest.json")), {}
    )


def test_a_tampered_archive_or_a_wrong_key_starts_cold_and_never_replaces_the_manifest(
    tmp_path: Path,
) -> None:
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    url = f"file://{bucket}"
    key = tmp_path / "cache.secret"
    key.write_text("a" * 64)
    key.chmod(0o600)
    first = start(tmp_path / "n1", url, "--engine-cache-secret-file", str(key))
    first.proc.wait_for_line("engine cache: published", timeout_s=60)
    assert first.stop() == 0
    assert first.report["secret_seen"] is False
    (manifest,) = bucket.rglob("manifest.json")
    signed = manifest.read_bytes()
    assert b'"hmac"' in signed
    # the same cache, checked with another key (from the environment): refused, cold
    other = {"SPOTSTART_ENGINE_CACHE_SECRET": "b" * 64}
    second = start(tmp_path / "n2", url, env=other)
    assert second.report["restored"] is False and second.report["secret_seen"] is False
    second.proc.wait_for_line("another replica published this key first", timeout_s=60)
    assert second.stop() == 0
    assert "restore failed for key" in second.proc.text and "starting cold" in second.proc.text
    # the right key, but the archive's bytes changed in the bucket: refused, cold
    (archive,) = bucket.rglob("*.tar.zst")
    size = archive.stat().st_size
    archive.write_bytes(b"\0" * size)
    third = start(tmp_path / "n3", url, "--engine-cache-secret-file", str(key))
    assert third.report["restored"] is False
    third.proc.wait_for_line("another replica published this key first", timeout_s=60)
    assert third.stop() == 0
    assert "restore failed for key" in third.proc.text
    assert manifest.read_bytes() == signed  # create-only: never replaced


def s3_keys(cloud: StorageEmulator, prefix: str) -> list[str]:
    url = f"{cloud.s3.direct}/{BUCKET}?list-type=2&prefix={prefix}%2F"
    status, text = _http("GET", url, headers=s3_signed_headers("GET", url))
    assert status == 200, text
    return re.findall(r"<Key>([^<]+)</Key>", text)


def test_s3_bucket_cold_publishes_then_warm_restores_the_same_files_and_a_new_key_misses(
    clean_cloud: StorageEmulator, tmp_path: Path
) -> None:
    prefix = f"ec-{uuid.uuid4().hex[:8]}"
    check_three_starts(
        tmp_path,
        f"s3://{BUCKET}/{prefix}",
        lambda: [k for k in s3_keys(clean_cloud, prefix) if k.endswith("/manifest.json")],
        clean_cloud.env_for_s3(),
    )


def test_sigterm_during_the_restore_cancels_it_and_starts_no_server(
    clean_cloud: StorageEmulator, tmp_path: Path
) -> None:
    prefix = f"ec-{uuid.uuid4().hex[:8]}"
    # every read under the prefix hangs: the restore cannot end by itself for a long while
    clean_cloud.set_faults(
        [FaultRule("stall", count=1000, method="GET", path_regex=prefix, seconds=60)]
    )
    run = start(
        tmp_path / "n", f"s3://{BUCKET}/{prefix}", env=clean_cloud.env_for_s3(), ready=False
    )
    run.proc.wait_for_line("engine cache: restoring", timeout_s=60)
    assert run.stop(timeout_s=20) == 0, run.proc.text
    assert "restore cancelled, server not started" in run.proc.text
    assert not (run.node / "report.json").exists()  # the engine never ran
    assert "started server pid" not in run.proc.text
    assert [e["phase"] for e in event_list(run.events) if e["phase"] == "engine-init"] == []


def test_a_publish_still_uploading_never_holds_up_the_drain_and_leaves_nothing_visible(
    clean_cloud: StorageEmulator, tmp_path: Path
) -> None:
    prefix = f"ec-{uuid.uuid4().hex[:8]}"
    # uploads under the prefix get no answer for a minute: the publish hangs mid-upload
    clean_cloud.set_faults(
        [FaultRule("stall", count=1000, method="PUT", path_regex=prefix, seconds=60)]
    )
    run = start(
        tmp_path / "n",
        f"s3://{BUCKET}/{prefix}",
        env={**clean_cloud.env_for_s3(), "FAKE_CACHE_BYTES": str(1 << 20)},
    )
    run.proc.wait_for_line("engine cache: publishing", timeout_s=60)
    assert run.stop(timeout_s=20) == 0, run.proc.text
    assert "publish cancelled by the notice" in run.proc.text
    assert "drain" in [e["phase"] for e in event_list(run.events)]
    clean_cloud.clear_faults()
    assert [k for k in s3_keys(clean_cloud, prefix) if k.endswith("manifest.json")] == []


class NoticeOnCue:
    """A watcher that sends one preemption notice when the test says so."""

    name = "test"

    def __init__(self) -> None:
        self.cue = asyncio.Event()

    async def watch(self) -> AsyncIterator[PreemptionNotice]:
        await self.cue.wait()
        now = time.monotonic()
        yield PreemptionNotice(NoticeKind.PREEMPTION, "test", now, now + 30)
        await asyncio.Event().wait()


async def test_the_python_api_starts_cold_publishes_then_drains_on_a_notice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from spotstart.enginecache import EngineCacheConfig
    from spotstart.errors import UsageError
    from spotstart.guard.drain import DrainConfig
    from spotstart.guard.proxy import ProxyConfig
    from spotstart.guard.run import GuardConfig, run_guard

    bucket = tmp_path / "bucket"
    bucket.mkdir()
    cache = EngineCacheConfig(url=f"file://{bucket}", root=tmp_path / "cache")
    port, listen = free_ports(2)
    proxy = ProxyConfig(f"http://127.0.0.1:{port}", listen_port=listen, health_interval_s=0.1)
    with pytest.raises(UsageError, match="needs server_argv"):
        GuardConfig(proxy, engine_cache=cache)
    monkeypatch.setenv("FAKE_PORT", str(port))
    monkeypatch.setenv("FAKE_REPORT", str(tmp_path / "report.json"))
    config = GuardConfig(
        proxy,
        DrainConfig(supervising=True, min_grace_s=0.5),
        server_argv=tuple(ENGINE_CMD),
        engine_cache=cache,
    )
    watcher = NoticeOnCue()
    guard = asyncio.create_task(run_guard(config, [watcher]))
    for _ in range(1200):  # the publish lands within 60 s
        if list(bucket.rglob("manifest.json")) or guard.done():
            break
        await asyncio.sleep(0.05)
    assert not guard.done(), guard.result()
    watcher.cue.set()
    assert await asyncio.wait_for(guard, 30) == 0
    assert json.loads((tmp_path / "report.json").read_text())["restored"] is False
    assert len(list(bucket.rglob("manifest.json"))) == 1


LEFT_BEHIND = """
import asyncio, logging, sys, threading
from spotstart.cli import guard_cmd

logging.basicConfig(level=logging.INFO)
started = threading.Event()

def pack():  # stands for a pack or an extraction: a thread cannot be cancelled
    started.set()
    threading.Event().wait(300)

async def guard():
    work = asyncio.create_task(asyncio.to_thread(pack))
    await asyncio.to_thread(started.wait)
    work.cancel()  # what the notice does to the publish
    await asyncio.gather(work, return_exceptions=True)
    return 0

sys.exit(guard_cmd._run_leaving_busy_threads(guard()))
"""


def test_a_pack_thread_a_notice_left_running_does_not_hold_the_guards_exit() -> None:
    import subprocess

    done = subprocess.run(
        [sys.executable, "-c", LEFT_BEHIND], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "1 pack/extract call(s) still running; exiting without them" in done.stderr


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--engine-cache-dir", "/x"], "--engine-cache-dir needs --engine-cache URL"),
        (["--engine-cache", "file:///tmp/x"], "needs the server command after '--'"),
        (["--engine-cache", "bucket", "--", "true"], "a URL"),
        (["--engine-cache-no-publish", "--", "true"], "needs --engine-cache URL"),
    ],
)
def test_engine_cache_flags_without_what_they_need_are_usage_errors(
    argv: list[str], needle: str, tmp_path: Path
) -> None:
    from tests.conftest import error_line, run_cli

    res = run_cli(
        ["guard", "--upstream", "http://127.0.0.1:9", "--listen", "127.0.0.1:0", *argv],
        env={"XDG_CACHE_HOME": str(tmp_path)},
    )
    assert res.code == 2, res.stderr
    assert needle in error_line(res.stderr)


def test_serving_caches_on_a_reachable_address_needs_a_token(tmp_path: Path) -> None:
    from tests.conftest import error_line, run_cli

    argv = ["--engine-cache", f"file://{tmp_path}/b", "--engine-cache-dir", str(tmp_path / "c")]
    res = run_cli(
        [
            "guard",
            "--upstream",
            "http://127.0.0.1:9",
            "--listen",
            "127.0.0.1:0",
            *argv,
            "--engine-cache-serve",
            "0.0.0.0:0",
            "--",
            "true",
        ]
    )
    assert res.code == 2 and "--engine-cache-serve 0.0.0.0:0 is reachable" in error_line(res.stderr)


def test_a_secret_file_others_may_read_is_refused(tmp_path: Path) -> None:
    from tests.conftest import error_line, run_cli

    key = tmp_path / "cache.secret"
    key.write_text("0123456789abcdef0123456789abcdef")
    key.chmod(0o640)
    argv = [
        "guard",
        "--upstream",
        "http://127.0.0.1:9",
        "--listen",
        "127.0.0.1:0",
        "--engine-cache",
        f"file://{tmp_path}/b",
        "--engine-cache-dir",
        str(tmp_path / "c"),
        "--engine-cache-secret-file",
        str(key),
        "--",
        "true",
    ]
    res = run_cli(argv)
    assert res.code == 2 and "lets other users read the key" in error_line(res.stderr)
    key.chmod(0o600)
    key.write_text("short")
    res = run_cli(argv)
    assert res.code == 2 and "at least 16" in error_line(res.stderr)


def test_the_cache_dir_of_another_user_or_open_to_others_is_refused(tmp_path: Path) -> None:
    from tests.conftest import error_line, run_cli

    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    res = run_cli(
        [
            "guard",
            "--upstream",
            "http://127.0.0.1:9",
            "--listen",
            "127.0.0.1:0",
            "--engine-cache",
            f"file://{tmp_path}/b",
            "--engine-cache-dir",
            str(open_dir),
            "--",
            "true",
        ]
    )
    assert res.code != 0 and "writable by group or others" in error_line(res.stderr)
