"""Red team: `spotstart guard --engine-cache` against what a careless environment or a hostile
neighbour hands it. Findings with a fix are asserted here; see /tmp/team/redteam-guard.md."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from spotstart.cli.guard_cmd import default_engine_cache_dir
from spotstart.emulate.link import FaultRule
from spotstart.emulate.storage import StorageEmulator
from spotstart.errors import UsageError
from tests.conftest import BUCKET

TAIL = Path("spotstart") / "engine-cache"


def test_a_relative_xdg_cache_home_is_ignored_as_the_spec_says(tmp_path: Path) -> None:
    # before: "rel/spotstart/engine-cache", made absolute against the guard's cwd: the cache
    # (and the key that holds its path) landed wherever the guard was started
    got = default_engine_cache_dir({"XDG_CACHE_HOME": "rel", "HOME": str(tmp_path)})
    assert got == tmp_path / ".cache" / TAIL
    got = default_engine_cache_dir({"XDG_CACHE_HOME": str(tmp_path / "x"), "HOME": "/nowhere"})
    assert got == tmp_path / "x" / TAIL


def test_no_usable_home_is_a_usage_error_not_a_directory_named_tilde(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import pwd

    # $HOME relative: the passwd entry's home, absolute
    got = default_engine_cache_dir({"HOME": "relative"})
    assert got.is_absolute() and got == Path(pwd.getpwuid(os.getuid()).pw_dir) / ".cache" / TAIL

    # no $HOME and no passwd entry (an arbitrary uid in a container): expanduser("~") is "~",
    # which made a directory named "~" in the cwd; now the user is told to name one
    def no_entry(uid: int) -> pwd.struct_passwd:
        raise KeyError(uid)

    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    with pytest.raises(UsageError, match="--engine-cache-dir"):
        default_engine_cache_dir({})


async def test_no_orphan_reaper_runs_while_the_cache_key_probes_the_engines_python(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key probes the engine's interpreter (and nvidia-smi) in child processes asyncio
    waits for. The guard's OrphanReaper reaps every zombie child it does not know (only the
    server and hooks are known): running during the restore, it could take a probe's exit
    status first. asyncio then reports 255 ("Unknown child process pid"), the probe "failed",
    no key: the node starts cold and never publishes. Measured with the reaper polling
    continuously: 8 of 200 probes stolen (Python 3.11, threaded child watcher); at the
    guard's 0.5 s interval rarer, never impossible. The reaper now starts with the server."""
    import asyncio
    import sys

    from spotstart.enginecache import EngineCacheConfig
    from spotstart.guard import run as guard_run
    from spotstart.guard import warmstart
    from spotstart.guard.drain import DrainConfig
    from spotstart.guard.proxy import ProxyConfig
    from spotstart.guard.run import GuardConfig, run_guard
    from spotstart.guard.supervise import OrphanReaper
    from tests.guard.test_engine_cache import ENGINE_CMD, NoticeOnCue
    from tests.guard.test_proxy import free_ports

    probing = False
    reaped_while_probing = 0

    class Watching(OrphanReaper):
        def reap_once(self) -> int:
            nonlocal reaped_while_probing
            reaped_while_probing += probing
            return super().reap_once()

    from spotstart.enginecache import compute_key as real_key

    async def key(*args: object) -> object:
        nonlocal probing
        probing = True
        try:
            return await real_key(*args)  # type: ignore[arg-type]
        finally:
            probing = False

    monkeypatch.setattr(guard_run, "OrphanReaper", Watching)
    monkeypatch.setattr(warmstart, "compute_key", key)
    # the engine's python: a wrapper that takes 1.5 s to start (the probe runs it too)
    slow = tmp_path / "bin" / "python3"
    slow.parent.mkdir()
    slow.write_text(f'#!/bin/sh\nsleep 1.5\nexec {sys.executable} "$@"\n')
    slow.chmod(0o755)
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    port, listen = free_ports(2)
    monkeypatch.setenv("FAKE_PORT", str(port))
    monkeypatch.setenv("FAKE_REPORT", str(tmp_path / "report.json"))
    config = GuardConfig(
        ProxyConfig(f"http://127.0.0.1:{port}", listen_port=listen, health_interval_s=0.1),
        DrainConfig(supervising=True, min_grace_s=0.5),
        server_argv=(str(slow), *ENGINE_CMD[1:]),
        engine_cache=EngineCacheConfig(
            url=f"file://{bucket}", root=tmp_path / "cache", publish=False
        ),
    )
    watcher = NoticeOnCue()
    guard = asyncio.create_task(run_guard(config, [watcher]))
    for _ in range(1200):
        if (tmp_path / "report.json").exists() or guard.done():
            break
        await asyncio.sleep(0.05)
    assert not guard.done(), guard.result()
    watcher.cue.set()
    assert await asyncio.wait_for(guard, 30) == 0
    assert reaped_while_probing == 0


def test_a_bucket_that_stalls_the_archive_delays_the_start_by_the_restore_timeout_only(
    clean_cloud: StorageEmulator, tmp_path: Path
) -> None:
    """Whoever slows the bucket (an incident, a proxy on the path, a throttled prefix) held the
    server's start for as long as the archive fetch kept trying: each read may go 20 s
    without a byte, 8 attempts with backoff, and a trickle never counts as a stall. Measured
    here before the fix, this very stall: the server started cold after 183 s. A spot
    replacement is needed NOW: --engine-cache-restore-timeout bounds the restore (default
    600 s), then the server starts cold and says why."""
    import uuid

    from tests.guard.test_engine_cache import start

    prefix = f"ec-{uuid.uuid4().hex[:8]}"
    url = f"s3://{BUCKET}/{prefix}"
    first = start(tmp_path / "a", url, env=clean_cloud.env_for_s3())
    first.proc.wait_for_line("engine cache: published", timeout_s=120)
    assert first.stop() == 0
    # the manifest answers; the archive's bytes never come
    clean_cloud.set_faults(
        [FaultRule("stall", count=10000, method="GET", path_regex=r"\.tar\.zst", seconds=600)]
    )
    run = start(
        tmp_path / "b",
        url,
        "--engine-cache-restore-timeout",
        "2",
        env=clean_cloud.env_for_s3(),
        ready=False,
    )
    run.proc.wait_for_line("starting cold", timeout_s=60)  # the fetch alone: minutes
    assert "restore failed" in run.proc.text and "2 s" in run.proc.text, run.proc.text
    from tests.guard.test_proxy import wait_until_ready

    wait_until_ready(run.url, timeout_s=60, proc=run.proc)
    assert run.report["restored"] is False  # cold, the cache dirs as a miss leaves them
    assert run.stop() == 0


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--engine-cache-restore-timeout", "5", "--", "true"], "needs --engine-cache URL"),
        (
            ["--engine-cache", "file:///nonexistent/b", "--engine-cache-restore-timeout", "0"],
            "over 0",
        ),
        (
            ["--engine-cache", "file:///nonexistent/b", "--engine-cache-restore-timeout", "nan"],
            "over 0",
        ),
    ],
)
def test_restore_timeout_flag_errors(argv: list[str], needle: str, tmp_path: Path) -> None:
    from tests.conftest import error_line, run_cli

    if "--" not in argv:
        argv = [*argv, "--engine-cache-dir", str(tmp_path / "c"), "--", "true"]
    res = run_cli(["guard", "--upstream", "http://127.0.0.1:9", "--listen", "127.0.0.1:0", *argv])
    assert res.code == 2, res.stderr
    assert needle in error_line(res.stderr)


def test_a_cache_dir_too_long_for_vllms_sockets_is_exit_2_before_anything_is_made(
    tmp_path: Path,
) -> None:
    # vLLM makes its ZMQ IPC sockets in $TMPDIR = <root>/tmp: 107 bytes at most for the path
    root = tmp_path.resolve() / ("r" * 70)
    proc = subprocess.run(
        [
            sys.executable, "-m", "spotstart", "guard",
            "--upstream", "http://127.0.0.1:9", "--listen", "127.0.0.1:0", "--cloud", "none",
            "--engine-cache", f"file://{tmp_path}/bucket/", "--engine-cache-dir", str(root),
            "--", sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", "/m",
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "107 bytes" in proc.stderr and "--engine-cache-dir" in proc.stderr
    assert not root.exists()
