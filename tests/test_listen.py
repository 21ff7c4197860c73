"""The bounded listener: which addresses count as loopback, where a request head ends, accept
failures logged once per interval (fake clock), and on a real socket on 127.0.0.1: a head
over the bound gets 431, a head not finished in time is cut, and at the connection cap the
longest-idle connection makes room for a real request."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket

import pytest
from aiohttp import web

from spotstart.listen import BoundedListener, ListenLimits, _head_end, _RateLimitedLog, is_loopback


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("::ffff:127.0.0.1", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("10.0.0.7", False),
        ("::ffff:10.0.0.7", False),
        ("localhost.evil.example", False),
        ("128.0.0.1", False),
        ("my-pod.svc", False),
    ],
)
def test_only_loopback_addresses_count_as_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(
    ("data", "end"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 27),
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET", 27),
        (b"GET / HTTP/1.1\nHost: a\n\n", 24),
        (b"GET / HTTP/1.1\r\nHost: a\r\n", -1),
        (b"", -1),
    ],
)
def test_a_head_ends_at_its_blank_line(data: bytes, end: int) -> None:
    assert _head_end(data) == end


def test_accept_failures_are_one_line_per_interval_with_their_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = logging.getLogger("test.listen")
    limited = _RateLimitedLog(log, "peer server", interval_s=10.0)
    emfile = OSError(errno.EMFILE, "Too many open files")
    with caplog.at_level(logging.WARNING, logger="test.listen"):
        for i in range(100_000):
            limited.failed(emfile, now=i * 1e-4)  # 10 s of failures, 10,000 a second
        limited.failed(emfile, now=10.0)
        limited.flush(now=11.0)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "failed 1 time(s)" in lines[0]
    assert "failed 100000 time(s)" in lines[1] and "Too many open files" in lines[1]
    assert limited.total == 100_001


async def _hello(_: web.Request) -> web.Response:
    return web.Response(text="hello")


async def _serving(limits: ListenLimits) -> tuple[web.AppRunner, BoundedListener, int]:
    app = web.Application()
    app.router.add_get("/", _hello)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    assert runner.server is not None
    listener = BoundedListener(runner.server, limits, logging.getLogger("test"), "test")
    port = await listener.start("127.0.0.1", 0)
    return runner, listener, port


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    """Everything until the server closes (a reset counts as a close with nothing more)."""
    try:
        return await asyncio.wait_for(reader.read(), 10)
    except ConnectionResetError:
        return b""


def test_a_head_over_the_bound_gets_431_and_a_close() -> None:
    async def go() -> bytes:
        runner, listener, port = await _serving(ListenLimits(max_head_bytes=1024))
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 4096)
            try:
                return await _read_all(reader)
            finally:
                writer.close()
        finally:
            await listener.close()
            await runner.cleanup()

    assert asyncio.run(go()).startswith(b"HTTP/1.1 431")


def test_a_head_not_finished_in_time_is_cut_while_a_quick_one_is_answered() -> None:
    async def go() -> tuple[bytes, bytes, int]:
        runner, listener, port = await _serving(ListenLimits(head_timeout_s=0.5))
        try:
            slow_r, slow_w = await asyncio.open_connection("127.0.0.1", port)
            slow_w.write(b"GET / HTTP/1.1\r\n")  # and then nothing more
            quick_r, quick_w = await asyncio.open_connection("127.0.0.1", port)
            quick_w.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            quick = await _read_all(quick_r)
            slow = await _read_all(slow_r)  # EOF: the deadline closed it
            slow_w.close()
            quick_w.close()
            return quick, slow, listener.head_timeouts
        finally:
            await listener.close()
            await runner.cleanup()

    quick, slow, timeouts = asyncio.run(go())
    assert quick.startswith(b"HTTP/1.1 200") and quick.endswith(b"hello")
    assert slow == b"" and timeouts == 1


def test_at_the_cap_the_longest_idle_connection_makes_room_for_a_request() -> None:
    async def go() -> tuple[list[bytes], bytes, int]:
        runner, listener, port = await _serving(ListenLimits(max_connections=4))
        idle = []
        try:
            for _ in range(4):
                idle.append(await asyncio.open_connection("127.0.0.1", port))

            async def accepted() -> None:
                while len(listener.connections) < 4:  # noqa: ASYNC110 (no event to wait on)
                    await asyncio.sleep(0.01)

            await asyncio.wait_for(accepted(), 10)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = await _read_all(reader)
            writer.close()
            first = await _read_all(idle[0][0])
            return [first], answer, listener.evicted
        finally:
            for _, w in idle:
                w.close()
            await listener.close()
            await runner.cleanup()

    (first,), answer, evicted = asyncio.run(go())
    assert answer.startswith(b"HTTP/1.1 200")
    assert first == b"" and evicted == 1  # the oldest idle one went


def test_binding_an_address_in_use_raises_and_leaves_nothing_open() -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]

    async def go() -> None:
        listener = BoundedListener(
            lambda: asyncio.Protocol(), ListenLimits(), logging.getLogger("t"), "t"
        )
        with pytest.raises(OSError):
            await listener.start("127.0.0.1", port)
        await listener.close()

    try:
        asyncio.run(go())
    finally:
        holder.close()


def test_at_the_cap_with_every_connection_in_a_request_a_new_one_gets_503_at_once() -> None:
    async def go() -> tuple[bytes, bytes, int]:
        release = asyncio.Event()

        async def held(_: web.Request) -> web.Response:
            await release.wait()
            return web.Response(text="done")

        app = web.Application()
        app.router.add_get("/held", held)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        assert runner.server is not None
        limits = ListenLimits(max_connections=1)
        listener = BoundedListener(runner.server, limits, logging.getLogger("t"), "t")
        port = await listener.start("127.0.0.1", 0)
        try:
            busy_r, busy_w = await asyncio.open_connection("127.0.0.1", port)
            busy_w.write(b"GET /held HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")

            async def in_request() -> None:
                while not listener.connections or any(  # noqa: ASYNC110
                    c.reading_head for c in listener.connections
                ):
                    await asyncio.sleep(0.01)

            await asyncio.wait_for(in_request(), 10)
            new_r, new_w = await asyncio.open_connection("127.0.0.1", port)
            refused = await _read_all(new_r)
            new_w.close()
            release.set()
            done = await _read_all(busy_r)
            busy_w.close()
            return refused, done, listener.refused
        finally:
            await listener.close()
            await runner.cleanup()

    refused, done, count = asyncio.run(go())
    assert refused.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in refused
    assert done.startswith(b"HTTP/1.1 200") and done.endswith(b"done") and count == 1
