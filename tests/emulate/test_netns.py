"""spotstart.emulate.netns: what a crashed run leaves is removed by the next, everything a run
made is gone after it, and without root the error says so. (Pacing and peers between hosts:
tests/fetch/test_peers_netns.py.)"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from spotstart.emulate.netns import (
    FAMILY,
    HostNetwork,
    NamespaceUnavailable,
    check_available,
    remove_leftovers,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _namespaces() -> None:
    try:
        check_available()
    except NamespaceUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set and network namespaces are unavailable here: {exc}")
        pytest.skip(f"network namespaces unavailable (CI unset): {exc}")


def _ours(pid: int) -> tuple[list[str], list[str]]:
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return (
        [line.split()[0] for line in ns.splitlines() if line.startswith(f"{FAMILY}-{pid}-")],
        [w.rstrip(":").split("@")[0] for w in links.split() if w.startswith(f"{FAMILY}{pid}")],
    )


CRASHING = """
import os, signal, subprocess, sys
from spotstart.emulate.netns import HostNetwork
net = HostNetwork(origin_up_bytes_per_s=10e6)
net.start()
host = net.add_host("x", up_bytes_per_s=5e6, down_bytes_per_s=5e6)
host.popen(["sleep", "600"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(os.getpid(), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_what_a_killed_run_left_is_removed_by_the_next_one() -> None:
    proc = subprocess.run([sys.executable, "-c", CRASHING], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    namespaces, links = _ours(int(proc.stdout))
    assert namespaces and links  # left behind, with a process still running in the host
    pids = subprocess.run(
        ["ip", "netns", "pids", namespaces[0]], capture_output=True, text=True
    ).stdout.split()
    assert pids
    removed = remove_leftovers()
    assert set(namespaces) <= set(removed)
    assert _ours(int(proc.stdout)) == ([], [])
    for pid in pids:  # gone, or a zombie not yet reaped
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().split(") ")[1].startswith("Z")


def test_a_run_removes_everything_it_made_and_kills_its_processes() -> None:
    with HostNetwork(origin_up_bytes_per_s=10e6) as net:
        host = net.add_host("y", up_bytes_per_s=5e6, down_bytes_per_s=5e6)
        sleeper = host.popen(["sleep", "600"], stdout=subprocess.DEVNULL)
        assert host.run(["ip", "-o", "addr", "show"]).stdout.count(host.address) == 1
        assert _ours(os.getpid())[0]
    assert sleeper.wait(timeout=10) == -signal.SIGKILL
    assert _ours(os.getpid()) == ([], [])


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux setpriv")
def test_without_root_the_error_says_what_is_missing() -> None:
    proc = subprocess.run(
        [
            *("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable),
            *("-c", "from spotstart.emulate.netns import check_available; check_available()"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "NamespaceUnavailable" in proc.stderr and "need root" in proc.stderr, proc.stderr


def test_a_delay_needs_netem_and_says_so_where_the_kernel_lacks_it() -> None:
    with HostNetwork() as net:
        try:
            host = net.add_host("d", up_bytes_per_s=5e6, down_bytes_per_s=5e6, delay_s=0.005)
        except NamespaceUnavailable as exc:
            assert "netem" in str(exc)  # this kernel has no sch_netem (as here)
        else:
            shown = host.run(["tc", "qdisc", "show", "dev", host.veth_host]).stdout
            assert "netem" in shown and "tbf" in shown, shown
