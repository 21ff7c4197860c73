"""The peer server under abuse, on 127.0.0.1, bounded in count and time: a 1,100-connection
flood, a slowloris (a header byte a second on hundreds of connections), and accept failing for
want of descriptors. Run as a user runs them (`serve-peers`, `guard --serve-peers`), with the
open-files limit many systems give a process (1024; 64 to make accept fail). Outcomes only:
the legitimate requests are answered, the abusive connections are closed, the log stays
short."""

from __future__ import annotations

import contextlib
import errno
import json
import resource
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fetch.peer_dirs import Served, add_complete, http_get, range_of
from tests.guard.test_proxy import (
    GUARD_CMD,
    UPSTREAM_CMD,
    Proc,
    free_ports,
    spawn,
    wait_until_ready,
)

TOKEN = "f00dcafe" * 8
FLOOD = 1100
DATA = bytes(range(256)) * 4096  # 1 MiB


def descriptors_for(flood: int) -> Iterator[None]:
    """Raise this test process's open-files limit for ``flood`` attacking sockets and then
    some, for the length of a test (a fixture body)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4 * flood if hard == resource.RLIM_INFINITY else min(hard, 4 * flood)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 2 * flood:
        pytest.skip(f"the open-files limit of this test run is too low for a {flood:,} flood")
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture(autouse=True)
def _enough_descriptors() -> Iterator[None]:
    """This test process holds every attacking socket: 1,100 and then some."""
    yield from descriptors_for(FLOOD)


def _limited(nofile: int) -> list[str]:
    """A command prefix that runs with ``ulimit -n`` = ``nofile`` (soft and hard)."""
    return ["prlimit", f"--nofile={nofile}:{nofile}", "--"]


def _serve_peers(root: Path, nofile: int, *extra: str) -> tuple[Proc, str]:
    cli = [sys.executable, "-m", "spotstart.cli.main", "serve-peers", str(root)]
    proc = spawn(
        [*_limited(nofile), *cli, "--listen", "127.0.0.1:0", "--json", *extra],
        {"SPOTSTART_PEER_TOKEN": TOKEN},
    )
    line = proc.wait_for_line('"listen"')
    return proc, json.loads(line)["listen"]


class Attack:
    """Attacking connections, opened without waiting for the server (non-blocking connects)
    and watched for the server closing them."""

    def __init__(self, address: str, n: int) -> None:
        host, port = address.rsplit(":", 1)
        self.open: list[socket.socket] = []
        self.closed = 0
        for _ in range(n):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex((host, int(port)))
            self.open.append(s)

    def send_byte(self, i: int) -> None:
        """One more byte of an endless request head on every connection still open."""
        head = b"GET /v1/inventory HTTP/1.1\r\nHost: peer\r\nX-Slow: " + b"a" * 1_000_000
        for s in list(self.open):
            try:
                s.send(head[i : i + 1])
            except BlockingIOError:
                pass  # not connected yet, or a full buffer: it stays
            except OSError:
                self._gone(s)

    def reap(self) -> int:
        """Count the connections the server closed (EOF, reset, or its canned 503 + EOF)."""
        for s in list(self.open):
            try:
                data = s.recv(4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                if exc.errno == errno.ENOTCONN:
                    continue  # still connecting
                self._gone(s)
                continue
            if not data or data.startswith(b"HTTP/1.1 503"):
                self._gone(s)
        return self.closed

    def _gone(self, s: socket.socket) -> None:
        self.open.remove(s)
        s.close()
        self.closed += 1

    def close(self) -> None:
        for s in self.open:
            s.close()
        self.open = []


def _fetch_range(peer: str, served: Served, i: int) -> None:
    start = (i * 65536) % (len(served.data) - 4096)
    status, body = http_get(
        peer, f"/v1/objects/{served.oid}", range_of(served, start, start + 4096, TOKEN)
    )
    assert (status, body) == (206, served.data[start : start + 4096]), (status, body[:80])


def _until(what: str, check: object, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout_s}s: {what}")


def test_a_1100_connection_flood_leaves_serve_peers_answering(tmp_path: Path) -> None:
    served = add_complete(tmp_path, "model.bin", DATA)
    proc, peer = _serve_peers(tmp_path, 1024)
    attack = Attack(peer, FLOOD)
    try:
        for i in range(20):  # a peer fetch's ranged reads, each on a new connection
            _fetch_range(peer, served, i)
        # beyond the cap (1024 // 2), the flood's idle connections were closed to make room
        _until("the flood is cut to the cap", lambda: attack.reap() >= FLOOD - 512)
        assert proc.popen.poll() is None
    finally:
        attack.close()
        proc.popen.terminate()
        proc.popen.wait(10)
        proc.close()
    assert "Traceback" not in proc.text


def test_a_slowloris_is_cut_off_and_peers_keep_being_served(tmp_path: Path) -> None:
    served = add_complete(tmp_path, "model.bin", DATA)
    proc, peer = _serve_peers(tmp_path, 1024, "--head-timeout", "2")
    attack = Attack(peer, 600)
    try:
        i = 0
        deadline = time.monotonic() + 60
        while attack.open and time.monotonic() < deadline:
            attack.send_byte(i)  # the attack's pace: one byte a second
            _fetch_range(peer, served, i)
            attack.reap()
            i += 1
            time.sleep(1)
        # every slow head was closed (by its deadline, or evicted for real clients)
        assert not attack.open and attack.closed == 600
    finally:
        attack.close()
        proc.popen.terminate()
        proc.popen.wait(10)
        proc.close()


def test_accept_failing_for_want_of_descriptors_is_logged_once_per_interval(
    tmp_path: Path,
) -> None:
    served = add_complete(tmp_path, "model.bin", DATA)
    # 64 descriptors, yet 1000 connections allowed: accept runs out of descriptors.
    proc, peer = _serve_peers(tmp_path, 64, "--max-connections", "1000")
    attack = Attack(peer, 400)
    try:
        # the connections past the descriptors are shed at once (closed), not left queued
        _until("connections shed", lambda: attack.reap() >= 200)
        attack.close()  # the flood ends: descriptors come back
        _until("serving again", lambda: _answers(peer, served))
    finally:
        attack.close()
        proc.popen.terminate()
        proc.popen.wait(10)
        proc.close()
    lines = [ln for ln in proc.lines if ln.strip() and '"listen"' not in ln]
    failed = [ln for ln in lines if "accept failed" in ln]
    assert 1 <= len(failed) <= 3 and len(lines) == len(failed), "\n".join(lines)
    assert "Too many open files" in failed[0] and "open-files limit 64" in failed[0]


def _answers(peer: str, served: Served) -> bool:
    with contextlib.suppress(OSError, AssertionError, IndexError, ValueError):
        _fetch_range(peer, served, 0)
        return True
    return False


def _get(url: str) -> tuple[int, bytes]:
    # 3 s: a readiness probe's timeoutSeconds (an unanswered probe is a failed one)
    with urllib.request.urlopen(url, timeout=3) as r:
        return r.status, r.read()


def test_a_flood_and_a_slowloris_on_the_guards_peer_port_leave_its_own_port_answering(
    tmp_path: Path,
) -> None:
    served = add_complete(tmp_path / "weights", "model.bin", DATA)
    up_port, guard_port, peer_port = free_ports(3)
    upstream = spawn([*UPSTREAM_CMD, str(up_port)])
    upstream.wait_for_line("upstream listening on")
    guard = spawn(
        [
            *_limited(1024),
            *GUARD_CMD,
            "--upstream",
            f"http://127.0.0.1:{up_port}",
            "--listen",
            f"127.0.0.1:{guard_port}",
            "--cloud",
            "none",
            "--health-interval",
            "0.2",
            "--serve-peers",
            f"{tmp_path / 'weights'}:127.0.0.1:{peer_port}",
        ],
        {"SPOTSTART_PEER_TOKEN": TOKEN},
    )
    url, peer = f"http://127.0.0.1:{guard_port}", f"127.0.0.1:{peer_port}"
    flood: Attack | None = None
    slow: Attack | None = None
    try:
        guard.wait_for_line("to peers on")
        wait_until_ready(url, proc=guard)
        flood = Attack(peer, FLOOD)
        slow = Attack(peer, 300)
        for i in range(6):  # the flood is whole after a second or two
            slow.send_byte(i)
            assert _get(url + "/readyz")[0] == 200
            assert _get(url + "/fast") == (200, b"fast-ok")  # the proxy, to the server
            _fetch_range(peer, served, i)
            flood.reap()
            slow.reap()
            time.sleep(1)  # the slowloris' pace
        assert guard.popen.poll() is None
    finally:
        for attack in (flood, slow):
            if attack is not None:
                attack.close()
        guard.popen.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            guard.popen.wait(30)
        guard.stop()
        upstream.stop()
    assert "Traceback" not in guard.text, guard.text
