"""Red team: `spotstart guard --engine-cache` against what a careless environment or a hostile
neighbour hands it. Findings with a fix are asserted here; see /tmp/team/redteam-guard.md."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spotstart.cli.guard_cmd import default_engine_cache_dir
from spotstart.errors import UsageError

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
