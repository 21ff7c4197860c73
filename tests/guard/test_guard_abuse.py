"""The guard's own port under abuse, and its watchers under faults, on 127.0.0.1, bounded in
count and time: a connection flood and a slowloris while a stream is proxied and /readyz is
polled; the cap evicting abusers, never a request in progress; a watcher that crashes
started again (a dead watcher is a missed preemption); metadata faults on /spotstart/metrics.
Outcomes only, never timings."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from spotstart.emulate.metadata import MetadataEmulator
from spotstart.guard.drain import DrainConfig, DrainController
from spotstart.guard.metrics import GuardMetrics
from spotstart.guard.notice import PreemptionNotice
from spotstart.guard.proxy import GuardProxy, ProxyConfig
from spotstart.guard.run import GuardConfig, run_guard
from spotstart.guard.watchers import GceWatcher, GceWatcherConfig, PollConfig
from spotstart.listen import ListenLimits
from tests.fetch.test_peer_server_abuse import Attack, descriptors_for
from tests.guard.test_guard_cli import guard_on
from tests.guard.test_proxy import (
    GUARD_CMD,
    UPSTREAM_CMD,
    free_ports,
    spawn,
    start_upstream,
    wait_until_ready,
)

FLOOD = 1100
TIMEOUT = aiohttp.ClientTimeout(total=30)


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    proc, url = start_upstream()
    try:
        yield url
    finally:
        proc.stop()


async def _until(what: str, check: object, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within {timeout_s}s: {what}")


async def _stream(session: aiohttp.ClientSession, url: str) -> bytes:
    async with session.get(url) as r:
        assert r.status == 200
        return await r.read()


def _complete(body: bytes, n: int) -> bool:
    return body == b"".join(f"data: token-{i}\n\n".encode() for i in range(n)) + (
        b"data: [DONE]\n\n"
    )


# -- the cap's semantics, in process with small limits ---------------------------------------------


@contextlib.asynccontextmanager
async def _proxy(upstream: str, limits: ListenLimits) -> AsyncIterator[tuple[GuardProxy, str]]:
    controller = DrainController(DrainConfig(), time.monotonic)
    config = ProxyConfig(upstream, listen_port=0, health_path=None, limits=limits)
    proxy = GuardProxy(config, controller, GuardMetrics(controller), time.monotonic)
    await proxy.start()
    try:
        await _until("ready", lambda: controller.ready)
        yield proxy, f"http://127.0.0.1:{proxy.bound_port}"
    finally:
        await proxy.close()


def _closed_by_server(s: socket.socket) -> bool:
    try:
        data = s.recv(4096)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True
    return not data or data.startswith(b"HTTP/1.1 503")


async def test_the_cap_evicts_idle_and_slow_heads_never_a_stream_or_a_slow_body(
    upstream: str,
) -> None:
    # head and idle timeouts far shorter than the stream and the slow body below
    limits = ListenLimits(
        max_connections=4,
        head_timeout_s=0.3,
        idle_timeout_s=0.3,
        max_head_bytes=1024,
        request_bodies=True,
    )
    payload = [os.urandom(700) + b"\r\n\r\n" for _ in range(6)]  # blank lines, over 1024 bytes

    async def slow_body() -> AsyncIterator[bytes]:
        for part in payload:
            yield part
            await asyncio.sleep(0.1)  # the body's pace: past the head deadline in all

    async with (
        _proxy(upstream, limits) as (proxy, url),
        aiohttp.ClientSession(timeout=TIMEOUT) as session,
    ):
        stream = asyncio.create_task(_stream(session, url + "/sse?n=15&gap=0.1"))
        post = asyncio.create_task(session.post(url + "/echo", data=slow_body()))
        await _until("both in flight", lambda: proxy.controller.counters.in_flight == 2)
        abusers = []
        for i in range(12):  # idle connections and unfinished heads, beyond the cap
            s = socket.create_connection(("127.0.0.1", proxy.bound_port))
            s.setblocking(False)
            if i % 2:
                s.send(b"GET /fast HTTP/1.1\r\nHost: x\r\nX-Slow: a")
            abusers.append(s)
        async with (
            aiohttp.ClientSession(
                timeout=TIMEOUT, connector=aiohttp.TCPConnector(force_close=True)
            ) as probe,
            probe.get(url + "/readyz") as r,
        ):
            assert r.status == 200
        await _until("every abuser closed", lambda: all(_closed_by_server(s) for s in abusers))
        for s in abusers:
            s.close()
        assert _complete(await stream, 15)
        async with await post as r:
            assert r.status == 200 and await r.read() == b"".join(payload)
        closed = {
            s.labels["reason"]: s.value
            for family in text_string_to_metric_families(proxy.metrics.render().decode())
            for s in family.samples
            if s.name == "spotstart_guard_connections_closed_total"
        }
        assert closed["evicted"] + closed["head_timeout"] >= 12 and closed["refused"] == 0


async def test_at_the_cap_with_every_connection_in_a_request_a_new_one_is_refused_not_a_stream(
    upstream: str,
) -> None:
    limits = ListenLimits(max_connections=3, head_timeout_s=0.3, request_bodies=True)
    async with (
        _proxy(upstream, limits) as (proxy, url),
        aiohttp.ClientSession(
            timeout=TIMEOUT, connector=aiohttp.TCPConnector(force_close=True)
        ) as session,
    ):
        streams = [
            asyncio.create_task(_stream(session, url + "/sse?n=10&gap=0.1")) for _ in range(3)
        ]
        await _until("three in flight", lambda: proxy.controller.counters.in_flight == 3)
        # (the proxy runs on this loop: the test's own I/O must not block it)
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.bound_port)
        writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await reader.read()).startswith(b"HTTP/1.1 503")
        writer.close()
        for body in await asyncio.gather(*streams):
            assert _complete(body, 10)


# -- a flood and a slowloris on a real guard process -----------------------------------------------


@pytest.fixture
def _enough_descriptors() -> Iterator[None]:
    """This test process holds every attacking socket: 1,400 and then some."""
    yield from descriptors_for(FLOOD)


async def _status(url: str) -> tuple[int, bytes]:
    # 3 s: a readiness probe's timeoutSeconds; a new connection each time, as the kubelet's
    async with (
        aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=3),
            connector=aiohttp.TCPConnector(force_close=True),
        ) as s,
        s.get(url) as r,
    ):
        return r.status, await r.read()


@pytest.mark.usefixtures("_enough_descriptors")
async def test_a_flood_and_a_slowloris_on_the_guard_port_leave_readyz_and_a_stream_answering() -> (
    None
):
    up_port, guard_port = free_ports(2)
    upstream = spawn([*UPSTREAM_CMD, str(up_port)])
    upstream.wait_for_line("upstream listening on")
    # ulimit -n 1024 (many systems' default): the guard port's cap is a quarter of it
    guard = spawn(
        [
            "prlimit",
            "--nofile=1024:1024",
            "--",
            *GUARD_CMD,
            "--upstream",
            f"http://127.0.0.1:{up_port}",
            "--listen",
            f"127.0.0.1:{guard_port}",
            "--cloud",
            "none",
            "--health-interval",
            "0.2",
        ]
    )
    url, address = f"http://127.0.0.1:{guard_port}", f"127.0.0.1:{guard_port}"
    flood: Attack | None = None
    slow: Attack | None = None
    try:
        guard.wait_for_line("guard listening on")
        wait_until_ready(url, proc=guard)
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            # a generation longer than the head deadline (10 s), streamed through it all
            stream = asyncio.create_task(_stream(session, url + "/sse?n=48&gap=0.25"))
            await _until("the stream begun", lambda: _in_flight(guard_port) >= 1)
            flood = Attack(address, FLOOD)
            slow = Attack(address, 300)
            for i in range(40):  # the slowloris' pace: a byte a second, 40 s at most
                slow.send_byte(i)
                assert await _status(url + "/readyz") == (200, b"ready\n")
                assert await _status(url + "/fast") == (200, b"fast-ok")
                flood.reap()
                slow.reap()
                if stream.done() and not slow.open and flood.closed >= FLOOD - 256:
                    break
                await asyncio.sleep(1)
            assert _complete(await stream, 48)
        # beyond the cap, the flood's idle connections were closed to make room; every slow
        # head was closed (evicted, or at its deadline)
        assert flood.closed >= FLOOD - 256, flood.closed
        assert not slow.open and slow.closed == 300
        assert guard.popen.poll() is None
        samples = _samples(url)
        evicted = samples[("spotstart_guard_connections_closed_total", (("reason", "evicted"),))]
        assert evicted >= FLOOD - 256
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


def _in_flight(port: int) -> float:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/spotstart/metrics", timeout=3) as r:
        text = r.read().decode()
    return next(
        float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("spotstart_guard_in_flight ")
    )


# -- watchers: restarted after a crash; faults on the metrics -------------------------------------


class _CrashingOnce(GceWatcher):
    """A real GCE watcher whose first run dies of a bug before it polls."""

    runs = 0

    async def watch(self) -> AsyncIterator[PreemptionNotice]:  # type: ignore[override]
        self.runs += 1
        if self.runs == 1:
            raise RuntimeError("a bug in the watcher")
        async for notice in super().watch():
            yield notice


async def test_a_watcher_that_crashes_is_started_again_and_a_later_notice_drains(
    upstream: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, "spotstart.guard.watchers")
    fast = PollConfig(poll_interval_s=0.05, backoff_initial_s=0.05, backoff_max_s=0.2)
    with MetadataEmulator("gce") as emu:
        watcher = _CrashingOnce(
            GceWatcherConfig(metadata_url=emu.url, long_poll_timeout_s=1, poll=fast)
        )
        config = GuardConfig(ProxyConfig(upstream, listen_port=0, health_path=None))
        guard = asyncio.create_task(run_guard(config, [watcher]))
        await _until("the watcher started again", lambda: watcher.runs >= 2 or guard.done())
        emu.preempt(in_s=0)
        # run_guard returns once the notice is drained; a dead watcher would miss it for ever
        code = await asyncio.wait_for(guard, 30)
    assert code == 0
    assert watcher.faults.crashes == 1
    crashed = [r for r in caplog.records if "crashed" in r.getMessage()]
    assert len(crashed) == 1 and "notice watcher 'gce'" in crashed[0].getMessage()


def _samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    import urllib.request

    with urllib.request.urlopen(url + "/spotstart/metrics", timeout=3) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metadata_faults_and_watcher_restarts_are_on_the_guards_metrics() -> None:
    with guard_on("azure") as (guard, emu, url, _):
        emu.fail("garbage", 1000)  # 200 answers of binary junk, on every path

        def faults() -> float:
            return sum(
                v
                for (name, labels), v in _samples(url).items()
                if name == "spotstart_guard_metadata_faults_total"
                and dict(labels).get("source") == "azure"
            )

        await _until("faults counted", lambda: faults() >= 2)
        samples = _samples(url)
        assert samples[("spotstart_guard_watcher_restarts_total", (("source", "azure"),))] == 0
        endpoints = {
            dict(labels)["endpoint"]
            for (name, labels) in samples
            if name == "spotstart_guard_metadata_faults_total"
        }
        assert endpoints and all(endpoints), endpoints
        status, _ = await _status(url + "/readyz")  # junk is never a notice
        assert status == 200 and guard.popen.poll() is None


async def test_malformed_requests_on_the_guard_port_log_one_line_per_interval_not_a_traceback_each(
    upstream: str,
) -> None:
    """Anyone who reaches the guard's port sends requests aiohttp cannot parse: one line per
    interval with a count, no traceback (before: an 11-line traceback each, a log flood that
    any client of the Service could cause)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep()
    root = logging.getLogger()
    root.addHandler(keep)
    try:
        async with _proxy(upstream, ListenLimits()) as (_, url):
            port = int(url.rsplit(":", 1)[1])

            def send_bad() -> None:
                for _ in range(20):
                    for bad in (b"GET /\n\n", b"GET / HTTP/1.1\r\nHost: x\r\nX: \x01\r\n\r\n"):
                        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                            s.sendall(bad)
                            with contextlib.suppress(OSError):
                                s.recv(100)

            await asyncio.to_thread(send_bad)
            status, _ = await _status(url + "/fast")
            assert status == 200
    finally:
        root.removeHandler(keep)
    errors = [r for r in records if r.levelno >= logging.WARNING and r.name.endswith(".http")]
    assert 1 <= len(errors) <= 2, [r.getMessage() for r in errors]
    assert all(r.exc_info is None and "\n" not in r.getMessage() for r in errors)
