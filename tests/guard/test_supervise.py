"""Supervision as an init process would do it, on real processes: workers the server leaves
in its process group are stopped, orphans re-parented to the guard (as PID 1 in a PID
namespace, or as a child subreaper) are reaped, and --stop-grace is the server's time to exit
after the stop signal even when nothing was in flight."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spotstart.guard.supervise import zombie_children
from tests.guard.test_proxy import (
    GUARD_CMD,
    ROOT,
    UPSTREAM_CMD,
    Proc,
    free_ports,
    start_guard,
    wait_until_ready,
)


def alive(pid: int) -> bool:
    """Running (a zombie is not running)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] != b"Z"


def wait_for(check: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def upstream_shell(port: int, before: str) -> list[str]:
    """A shell that runs ``before``, then becomes the upstream server (exec: same pid)."""
    cmd = " ".join(f"'{a}'" for a in [*UPSTREAM_CMD, str(port)])
    return ["sh", "-c", f"{before}; exec {cmd}"]


def test_workers_the_server_leaves_behind_are_stopped_after_a_planned_stop(
    tmp_path: Path,
) -> None:
    port, listen = free_ports(2)
    pidfile = tmp_path / "worker.pid"
    # the worker ignores SIGTERM, so only the SIGKILL after the grace takes it
    worker = f"sh -c 'trap \"\" TERM; sleep 300' & echo $! > {pidfile}"
    guard, url = start_guard(
        f"http://127.0.0.1:{port}",
        "--cloud",
        "none",
        "--health-interval",
        "0.05",
        "--stop-grace",
        "3",
        "--",
        *upstream_shell(port, worker),
        listen_port=listen,
    )
    try:
        wait_until_ready(url, proc=guard)
        worker_pid = int(pidfile.read_text())
        assert alive(worker_pid)
        guard.popen.send_signal(signal.SIGTERM)
        assert guard.popen.wait(timeout=20) == 0, guard.text
    finally:
        guard.stop()
    wait_for(lambda: not alive(worker_pid), 5, f"worker {worker_pid} outlived the guard")
    assert "leaving processes in its group" in guard.text, guard.text


def test_orphans_re_parented_to_the_guard_are_reaped(tmp_path: Path) -> None:
    port, listen = free_ports(2)
    pids = tmp_path / "orphans"
    # each ( ... & ) leaves an orphan that exits 0.2 s later: it is re-parented to the guard
    orphans = "; ".join(f"(sleep 0.2 & echo $! >> {pids})" for _ in range(3))
    guard, url = start_guard(
        f"http://127.0.0.1:{port}",
        "--cloud",
        "none",
        "--health-interval",
        "0.05",
        "--",
        *upstream_shell(port, orphans),
        listen_port=listen,
    )
    try:
        wait_until_ready(url, proc=guard)
        orphan_pids = [int(x) for x in pids.read_text().split()]

        def reaped() -> bool:  # gone from /proc entirely, not left as zombies
            return not any(Path(f"/proc/{p}").exists() for p in orphan_pids)

        wait_for(reaped, 10, f"orphans {orphan_pids} not reaped")
        assert zombie_children(guard.popen.pid) == []
        guard.popen.send_signal(signal.SIGTERM)  # a clean stop takes the server down too
        assert guard.popen.wait(timeout=20) == 0, guard.text
    finally:
        guard.stop()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root")
def test_as_pid_1_in_a_pid_namespace_the_guard_reaps_what_init_would(tmp_path: Path) -> None:
    port, listen = free_ports(2)
    count = tmp_path / "zombies"
    # inside the namespace: leave two orphans, give them time to exit and the guard time to
    # reap them, then count zombies (what an init that does not reap would leave)
    script = (
        "(sleep 0.1 &); (sleep 0.1 &); sleep 2; "
        f"grep -l '^State:.Z' /proc/[0-9]*/status 2>/dev/null | wc -l > {count}"
    )
    cmd = [
        "unshare",
        "--pid",
        "--fork",
        "--mount-proc",
        "--kill-child=SIGKILL",
        *GUARD_CMD,
        "--upstream",
        f"http://127.0.0.1:{port}",
        "--listen",
        f"127.0.0.1:{listen}",
        "--cloud",
        "none",
        "--health-interval",
        "0.05",
        "--",
        *upstream_shell(port, script),
    ]
    from tests.conftest import isolated_environ

    env = isolated_environ()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *sys.path])
    proc = Proc(
        subprocess.Popen(
            cmd, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
    )
    try:
        wait_until_ready(f"http://127.0.0.1:{listen}", timeout_s=30, proc=proc)
        wait_for(count.exists, 10, "the server never counted zombies")
        assert count.read_text().strip() == "0", proc.text
    finally:
        proc.stop()
