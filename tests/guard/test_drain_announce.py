"""The guard telling a router which streams it will cut (``X-Spotstart-Continue: 1``): one SSE
comment at an event boundary when the drain starts, the stream's other bytes untouched, the
replica's name on the answer, and ``--continue-grace`` cutting such streams early. A real guard
process in front of a real upstream process whose streams the test writes byte by byte."""

from __future__ import annotations

import asyncio
import itertools
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spotstart.guard.announce import EventBoundary, drain_comment
from tests.guard.test_proxy import Proc, spawn, start_guard, wait_until_ready

COMMENT = re.compile(rb": spotstart-drain deadline_ms=(\d+)\n\n")
TIMEOUT = aiohttp.ClientTimeout(total=60)


# -- the upstream: streams whose bytes the test pushes (run as a subprocess) ---------------------


def serve_pushed_streams(port: int) -> None:
    """GET /stream?id=X opens a text/event-stream; POST /push?id=X writes its body into that
    stream as it is; POST /end?id=X ends it; GET /seen?id=X: the request headers it came with."""
    from aiohttp import web

    streams: dict[str, web.StreamResponse] = {}
    opened: dict[str, asyncio.Event] = {}
    ended: dict[str, asyncio.Event] = {}
    seen: dict[str, dict[str, str]] = {}

    def ev(table: dict[str, asyncio.Event], key: str) -> asyncio.Event:
        return table.setdefault(key, asyncio.Event())

    async def health(_: web.Request) -> web.Response:
        return web.Response()

    async def stream(request: web.Request) -> web.StreamResponse:
        key = request.query["id"]
        seen[key] = dict(request.headers)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        streams[key] = resp
        ev(opened, key).set()
        await asyncio.wait_for(ev(ended, key).wait(), 60)
        await resp.write_eof()
        return resp

    async def push(request: web.Request) -> web.Response:
        key = request.query["id"]
        await asyncio.wait_for(ev(opened, key).wait(), 10)
        try:
            await streams[key].write(await request.read())
        except (ConnectionError, RuntimeError):
            return web.Response(status=410, text="gone")
        return web.Response(text="pushed")

    async def end(request: web.Request) -> web.Response:
        ev(ended, request.query["id"]).set()
        return web.Response(text="ended")

    async def headers_seen(request: web.Request) -> web.Response:
        return web.json_response(seen.get(request.query["id"]))

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/stream", stream)
    app.router.add_get("/seen", headers_seen)
    app.router.add_post("/push", push)
    app.router.add_post("/end", end)
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    print(f"upstream listening on {sock.getsockname()[1]}", flush=True)
    web.run_app(app, sock=sock, print=None, access_log=None, handle_signals=False)


UPSTREAM_CMD = [
    sys.executable,
    "-c",
    "import sys; from tests.guard.test_drain_announce import serve_pushed_streams; "
    "serve_pushed_streams(int(sys.argv[1]))",
]


@pytest.fixture
def upstream() -> Iterator[str]:
    proc = spawn([*UPSTREAM_CMD, "0"])
    port = proc.wait_for_line("upstream listening on").rsplit(" ", 1)[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        yield s


def guard_for(upstream: str, *extra: str) -> tuple[Proc, str]:
    proc, url = start_guard(
        upstream,
        "--cloud",
        "none",
        "--health-interval",
        "0.05",
        "--termination-window",
        "30",
        "--safety-margin",
        "5",
        "--replica-id",
        "replica-a",
        *extra,
    )
    wait_until_ready(url, proc=proc)
    return proc, url


class Reader:
    """What a client of one stream has received so far."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.got = b""

    async def until(self, want: bytes | re.Pattern[bytes]) -> bytes:
        """Read until the bytes received contain ``want`` (no sleeps: each read waits)."""

        def found() -> bool:
            return (want in self.got) if isinstance(want, bytes) else bool(want.search(self.got))

        while not found():
            chunk = await self.resp.content.readany()
            if not chunk:
                raise AssertionError(f"stream ended before {want!r}; got {self.got!r}")
            self.got += chunk
        return self.got

    async def rest(self) -> bytes:
        self.got += await self.resp.content.read()
        return self.got


async def push(http: aiohttp.ClientSession, upstream: str, key: str, data: bytes) -> None:
    async with http.post(f"{upstream}/push", params={"id": key}, data=data) as r:
        assert r.status == 200, await r.text()


async def end(http: aiohttp.ClientSession, upstream: str, key: str) -> None:
    async with http.post(f"{upstream}/end", params={"id": key}) as r:
        assert r.status == 200


async def unready(http: aiohttp.ClientSession, guard: str) -> None:
    """Poll /readyz until the guard has taken the notice (503), with a deadline."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        async with http.get(guard + "/readyz") as r:
            if r.status == 503:
                return
        await asyncio.sleep(0.02)
    raise AssertionError("the guard never turned unready")


async def metric(http: aiohttp.ClientSession, guard: str, name: str) -> float:
    async with http.get(guard + "/spotstart/metrics") as r:
        text = await r.text()
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m is not None, text
    return float(m.group(1))


CONTINUE = {"X-Spotstart-Continue": "1"}


# -- through a real guard ------------------------------------------------------------------------


async def test_an_idle_stream_gets_the_comment_once_at_the_notice_and_other_bytes_unchanged(
    upstream: str, http: aiohttp.ClientSession
) -> None:
    guard, url = guard_for(upstream)
    try:
        async with (
            http.get(url + "/stream", params={"id": "a"}, headers=CONTINUE) as ra,
            http.get(url + "/stream", params={"id": "b"}) as rb,
        ):
            a, b = Reader(ra), Reader(rb)
            assert ra.headers["X-Spotstart-Replica"] == "replica-a"
            assert "X-Spotstart-Replica" not in rb.headers
            for key in ("a", "b"):
                await push(http, upstream, key, b'data: {"n":1}\n\n')
            await a.until(b'data: {"n":1}\n\n')
            await b.until(b'data: {"n":1}\n\n')
            guard.popen.send_signal(signal.SIGTERM)
            # idle between two events: the comment comes without waiting for the next one
            await a.until(COMMENT)
            await unready(http, url)
            assert await metric(http, url, "spotstart_guard_streams_announced_total") == 1
            for key in ("a", "b"):
                await push(http, upstream, key, b'data: {"n":2}\n\ndata: [DONE]\n\n')
                await end(http, upstream, key)
            got_a, got_b = await a.rest(), await b.rest()
        async with http.get(f"{upstream}/seen", params={"id": "a"}) as r:
            seen = await r.json()
    finally:
        guard.stop()
    m = COMMENT.search(got_a)
    assert m is not None
    assert 0 < int(m.group(1)) <= 25_000  # the drain deadline: 30 s window - 5 s margin
    assert len(COMMENT.findall(got_a)) == 1
    events = b'data: {"n":1}\n\ndata: {"n":2}\n\ndata: [DONE]\n\n'
    assert got_a == b'data: {"n":1}\n\n' + m.group(0) + b'data: {"n":2}\n\ndata: [DONE]\n\n'
    assert got_b == events  # no header: byte for byte, no comment
    assert not any(k.lower() == "x-spotstart-continue" for k in seen), seen


@pytest.mark.parametrize("eol", [b"\n", b"\r\n"])
async def test_a_stream_paused_mid_event_gets_the_comment_only_after_that_event_ends(
    upstream: str, http: aiohttp.ClientSession, eol: bytes
) -> None:
    guard, url = guard_for(upstream)
    first = b"data: one" + eol + eol
    try:
        async with http.get(url + "/stream", params={"id": "a"}, headers=CONTINUE) as ra:
            a = Reader(ra)
            await push(http, upstream, "a", first + b"data: tw")
            await a.until(b"data: tw")
            guard.popen.send_signal(signal.SIGTERM)
            await unready(http, url)
            # the notice came mid-event; more of the event, still no end: no comment
            await push(http, upstream, "a", b"o" + eol + b"data: more" + eol)
            await a.until(b"data: more" + eol)
            assert COMMENT.search(a.got) is None
            # the event ends in the middle of a chunk: the comment goes right after its end
            await push(http, upstream, "a", eol + b"data: three" + eol + eol)
            await end(http, upstream, "a")
            got = await a.rest()
    finally:
        guard.stop()
    m = COMMENT.search(got)
    assert m is not None, got
    second = b"data: two" + eol + b"data: more" + eol + eol
    assert got == first + second + m.group(0) + b"data: three" + eol + eol


@pytest.mark.parametrize("grace", ["0.5", "0"])
async def test_continue_grace_cuts_the_routers_streams_early_and_keeps_the_full_drain_for_others(
    upstream: str, http: aiohttp.ClientSession, grace: str
) -> None:
    guard, url = guard_for(upstream, "--continue-grace", grace)
    try:
        async with (
            http.get(url + "/stream", params={"id": "a"}, headers=CONTINUE) as ra,
            http.get(url + "/stream", params={"id": "b"}) as rb,
        ):
            a, b = Reader(ra), Reader(rb)
            for key in ("a", "b"):
                await push(http, upstream, key, b"data: 1\n\n")
            await a.until(b"data: 1\n\n")
            await b.until(b"data: 1\n\n")
            guard.popen.send_signal(signal.SIGTERM)
            if grace != "0":  # 0: cut at the notice, the comment may not get through
                await a.until(COMMENT)
            # cut: the connection ends without the chunked body's end, so it never looks whole
            with pytest.raises(aiohttp.ClientPayloadError):
                await a.rest()
            assert await metric(http, url, "spotstart_guard_streams_cut_early_total") == 1
            # the other stream goes on as in any drain, and completes
            await push(http, upstream, "b", b"data: 2\n\ndata: [DONE]\n\n")
            await end(http, upstream, "b")
            got_b = await b.rest()
        code = guard.popen.wait(timeout=20)
    finally:
        guard.stop()
    m = COMMENT.search(a.got)
    told = m.group(0) if m is not None else b""
    assert m is not None or grace == "0"
    assert m is None or int(m.group(1)) <= float(grace) * 1000
    assert a.got == b"data: 1\n\n" + told
    assert got_b == b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n"
    assert code == 0
    assert " 1 drained" in guard.text and " 1 dropped" in guard.text, guard.text


async def test_the_continue_header_never_reaches_the_server_even_when_not_1(
    upstream: str, http: aiohttp.ClientSession
) -> None:
    guard, url = guard_for(upstream)
    try:
        async with http.get(
            url + "/stream", params={"id": "x"}, headers={"X-Spotstart-Continue": "yes"}
        ) as r:
            assert "X-Spotstart-Replica" not in r.headers  # only "1" asks for it
            await end(http, upstream, "x")
            await r.read()
        async with http.get(f"{upstream}/seen", params={"id": "x"}) as r:
            seen = await r.json()
    finally:
        guard.stop()
    assert not any(k.lower() == "x-spotstart-continue" for k in seen), seen


# -- the boundary tracker, pure ------------------------------------------------------------------


def _safe_points(stream: bytes) -> set[int]:
    """Offsets where a comment may go, read off the whole stream at once: after a blank line
    (or at 0), and not between the \\r and \\n of one line ending."""
    points = {0}
    line_start, pos = True, 0
    for m in re.finditer(rb"\r\n|\n|\r", stream):
        if m.start() > pos:
            line_start = False
        if line_start and not (m.group() == b"\r" and stream[m.end() : m.end() + 1] == b"\n"):
            points.add(m.end())
        line_start, pos = True, m.end()
    return points


@pytest.mark.parametrize(
    "stream",
    [
        b'data: {"a":1}\n\ndata: {"b":2}\n\n',
        b"data: x\r\n\r\ndata: y\r\n\r\n",
        b"event: e\ndata: 1\ndata: 2\n\n: keepalive\n\ndata: 3\r\rdata: 4\n\n",
        b"\n\ndata: 1\r\n\n",
    ],
)
def test_every_split_of_a_stream_finds_the_first_boundary_after_the_split(stream: bytes) -> None:
    safe = _safe_points(stream)
    for split in range(1, len(stream)):
        for inner in range(split, len(stream) + 1):
            b = EventBoundary()
            b.feed(stream[:split])
            at_split = b.at_boundary
            rest = stream[split:inner], stream[inner:]
            at = b.feed(rest[0])
            offset = split if at_split else None
            if offset is None and at is not None:
                offset = split + at
            if offset is None and rest[1]:
                at2 = b.feed(rest[1])
                offset = None if at2 is None else inner + at2
            want = min((p for p in safe if p >= split), default=None)
            if want == len(stream) and stream.endswith(b"\r"):
                want = None  # can't tell yet
            assert offset == want, (stream, split, inner)


@settings(max_examples=300, deadline=None)
@given(
    stream=st.binary(max_size=40).map(lambda b: bytes(b"ab:\r\n"[x % 5] for x in b)),
    cuts=st.lists(st.integers(0, 40), max_size=4),
)
def test_any_stream_in_any_chunks_gets_the_comment_at_the_first_safe_point_after_the_notice(
    stream: bytes, cuts: list[int]
) -> None:
    """The proxy's use: chunk 0 passed before the notice; then the comment at once if the
    stream is at a boundary, else at the first point a later chunk's feed returns."""
    edges = sorted({0, len(stream), *(min(c, len(stream)) for c in cuts)})
    chunks = [stream[x:y] for x, y in itertools.pairwise(edges)] or [b""]
    b = EventBoundary()
    b.feed(chunks[0])
    start = len(chunks[0])
    found = start if b.at_boundary else None
    offset = start
    for chunk in chunks[1:]:
        if found is not None:
            break
        at = b.feed(chunk)
        if at is not None:
            found = offset + at
        offset += len(chunk)
    safe = sorted(p for p in _safe_points(stream) if p >= start)
    if stream.endswith(b"\r"):  # the byte after it is not known yet
        safe = [p for p in safe if p != len(stream)]
    assert found == (safe[0] if safe else None), (stream, chunks)


def test_the_comment_is_one_sse_comment_and_a_blank_line() -> None:
    assert drain_comment(1500) == b": spotstart-drain deadline_ms=1500\n\n"
    assert drain_comment(-3) == b": spotstart-drain deadline_ms=0\n\n"


def test_cli_rejects_a_replica_id_that_could_split_a_header() -> None:
    from tests.guard.test_proxy import guard_main

    code = guard_main(
        [
            "--upstream",
            "http://127.0.0.1:1",
            "--listen",
            "127.0.0.1:0",
            "--replica-id",
            "a\r\nX-Evil: 1",
        ]
    )
    assert code == 2
    code = guard_main(
        ["--upstream", "http://127.0.0.1:1", "--listen", "127.0.0.1:0", "--continue-grace", "-1"]
    )
    assert code == 2
