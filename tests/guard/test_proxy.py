"""The guard's proxy against a real upstream HTTP server in a subprocess: bodies, streams,
headers, its own endpoints, upstream health; and the ASGI middleware giving the same drain
in-process. The upstream server and the guard launcher defined here serve test_guard_cli too."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from spotstart.guard.asgi import DrainMiddleware
from spotstart.guard.drain import DrainConfig, DrainController
from spotstart.guard.notice import NoticeKind, PreemptionNotice

ROOT = Path(__file__).resolve().parents[2]

# -- the upstream: a small inference-server look-alike (run as a subprocess) -------------------


def serve_upstream(port: int) -> None:
    """/health, /fast, /echo (streams the body back), /sse?n=&gap= (text/event-stream),
    /gated-sse (one event, then waits for POST /release), /crash (exit 3),
    POST /admin/health?ok=0|1, POST /webhook and GET /webhooks, GET /count."""
    from aiohttp import web

    state: dict[str, object] = {"healthy": True, "count": 0, "webhooks": [], "gone": 0}
    release = asyncio.Event()

    @web.middleware
    async def count(request: web.Request, handler: object) -> web.StreamResponse:
        if request.path not in ("/health", "/count"):
            state["count"] = int(state["count"]) + 1  # type: ignore[call-overload]
        return await handler(request)  # type: ignore[operator,no-any-return]

    async def health(_: web.Request) -> web.Response:
        return web.Response(status=200 if state["healthy"] else 503)

    async def fast(request: web.Request) -> web.Response:
        status = int(request.query.get("status", "200"))
        return web.Response(
            status=status,
            text="fast-ok",
            headers={"X-Upstream": "yes", "X-Hop": "drop-me", "Connection": "X-Hop"},
        )

    async def echo(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        async for chunk in request.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    async def sse(request: web.Request) -> web.StreamResponse:
        n, gap = int(request.query.get("n", "10")), float(request.query.get("gap", "0.1"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(n):
            await resp.write(f"data: token-{i}\n\n".encode())
            await asyncio.sleep(gap)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def gated_sse(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: first\n\n")
        await asyncio.wait_for(release.wait(), 20)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def raw(request: web.Request) -> web.Response:
        return web.Response(text=request.raw_path)

    async def slow_headers(request: web.Request) -> web.Response:
        # Think for up to 20 s before answering, noticing when the client (the guard) leaves.
        for _ in range(400):
            transport = request.transport
            if transport is None or transport.is_closing():
                state["gone"] = int(state["gone"]) + 1  # type: ignore[call-overload]
                return web.Response(status=499)
            await asyncio.sleep(0.05)
        return web.Response(text="late")

    async def gone(_: web.Request) -> web.Response:
        return web.json_response(state["gone"])

    async def gated_small(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": "20"})
        await resp.prepare(request)
        await resp.write(b"first-ten!")
        await asyncio.wait_for(release.wait(), 20)
        await resp.write(b"second-ten")
        await resp.write_eof()
        return resp

    async def own_metrics(_: web.Request) -> web.Response:
        return web.Response(text="vllm_num_requests_running 0\n")

    async def do_release(_: web.Request) -> web.Response:
        release.set()
        release.clear()  # the next gated request waits for its own release
        return web.Response(text="released")

    async def admin_health(request: web.Request) -> web.Response:
        state["healthy"] = request.query.get("ok") == "1"
        return web.Response()

    async def crash(_: web.Request) -> web.Response:
        os._exit(3)

    async def webhook(request: web.Request) -> web.Response:
        state["webhooks"].append(await request.json())  # type: ignore[attr-defined]
        return web.Response()

    async def webhooks(_: web.Request) -> web.Response:
        return web.json_response(state["webhooks"])

    async def counter(_: web.Request) -> web.Response:
        return web.json_response(state["count"])

    app = web.Application(middlewares=[count])
    for path, handler in (
        ("/health", health),
        ("/fast", fast),
        ("/sse", sse),
        ("/gated-sse", gated_sse),
        ("/crash", crash),
        ("/webhooks", webhooks),
        ("/count", counter),
        ("/raw/{tail:.*}", raw),
        ("/slow-headers", slow_headers),
        ("/gone", gone),
        ("/gated-small", gated_small),
        ("/metrics", own_metrics),
    ):
        app.router.add_get(path, handler)
    for path, handler in (
        ("/echo", echo),
        ("/release", do_release),
        ("/admin/health", admin_health),
        ("/webhook", webhook),
    ):
        app.router.add_post(path, handler)

    def on_term(*_: object) -> None:
        print("upstream: got SIGTERM", file=sys.stderr, flush=True)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    print(f"upstream listening on {sock.getsockname()[1]}", flush=True)
    web.run_app(app, sock=sock, print=None, access_log=None, handle_signals=False)


UPSTREAM_CMD = [
    sys.executable,
    "-c",
    "import sys; from tests.guard.test_proxy import serve_upstream; "
    "serve_upstream(int(sys.argv[1]))",
]
GUARD_CMD = [
    sys.executable,
    "-c",
    "import sys; from tests.guard.test_proxy import guard_main; sys.exit(guard_main(sys.argv[1:]))",
]


def guard_main(argv: list[str]) -> int:
    """`spotstart guard ARGV`: through cli/main.py once it knows the command, else directly."""
    import argparse

    from spotstart.cli import guard_cmd, main

    parser = main.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "guard" in sub.choices:
        return main.main(["guard", *argv])
    parser = argparse.ArgumentParser(prog="spotstart")
    guard_cmd.add_parser(parser.add_subparsers(dest="command", required=True))
    try:
        args = parser.parse_args(["guard", *argv])
        return int(args.run(args))
    except main.SpotstartError as exc:
        print(f"spotstart: error: {exc}", file=sys.stderr)
        return exc.exit_code


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports on 127.0.0.1 (all held open until all are picked)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


@dataclass
class Proc:
    """A subprocess whose output lines are collected by a thread (never a blocking read)."""

    popen: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def __post_init__(self) -> None:
        for stream in (self.popen.stdout, self.popen.stderr):
            thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _pump(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self.lines.append(line.rstrip("\n"))

    def wait_for_line(self, needle: str, timeout_s: float = 15.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if needle in line:
                    return line
            if self.popen.poll() is not None and not any(needle in x for x in self.lines):
                time.sleep(0.05)  # let the pump threads finish the last lines
                if not any(needle in x for x in self.lines):
                    break
            time.sleep(0.01)
        raise AssertionError(f"no line with {needle!r} within {timeout_s}s:\n" + self.text)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=10)
        self.close()

    def close(self) -> None:
        """After the process exited: collect the last lines, close the pipes."""
        for thread in self.threads:
            thread.join(timeout=5)
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream is not None:
                stream.close()


def spawn(cmd: list[str], env: dict[str, str] | None = None) -> Proc:
    """``cmd`` in the isolated test environment, plus ``env``."""
    from tests.conftest import isolated_environ  # here: subprocesses importing us skip it

    return Proc(
        subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={**isolated_environ(), **(env or {})},
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    )


def start_upstream() -> tuple[Proc, str]:
    proc = spawn([*UPSTREAM_CMD, "0"])
    port = proc.wait_for_line("upstream listening on").rsplit(" ", 1)[1]
    return proc, f"http://127.0.0.1:{port}"


def start_guard(
    upstream: str, *extra: str, listen_port: int = 0, env: dict[str, str] | None = None
) -> tuple[Proc, str]:
    listen = f"127.0.0.1:{listen_port}"
    proc = spawn([*GUARD_CMD, "--upstream", upstream, "--listen", listen, *extra], env)
    line = proc.wait_for_line("guard listening on")
    return proc, line.split(" on ", 1)[1].split(" ")[0]


def wait_until_ready(url: str, timeout_s: float = 15.0, proc: Proc | None = None) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.02)
    log = proc.text if proc is not None else ""
    raise AssertionError(f"{url} not ready within {timeout_s}s\n{log}")


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    proc, url = start_upstream()
    try:
        yield url
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def guard(upstream: str) -> Iterator[str]:
    proc, url = start_guard(upstream, "--cloud", "none", "--health-interval", "0.1")
    try:
        wait_until_ready(url)
        yield url
    finally:
        proc.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        yield s


# -- proxying ------------------------------------------------------------------------------------


async def test_proxy_preserves_status_headers_and_body_and_drops_hop_by_hop_headers(
    guard: str, http: aiohttp.ClientSession
) -> None:
    async with http.get(guard + "/fast?status=201") as r:
        assert r.status == 201 and await r.text() == "fast-ok"
        assert r.headers["X-Upstream"] == "yes"
        assert "X-Hop" not in r.headers  # named in the upstream's Connection header


async def test_request_body_streams_to_upstream_and_back_unchanged(
    guard: str, http: aiohttp.ClientSession
) -> None:
    payload = [os.urandom(64 * 1024) for _ in range(32)]

    async def body() -> AsyncIterator[bytes]:
        for part in payload:
            yield part

    async with http.post(guard + "/echo", data=body()) as r:
        assert r.status == 200 and await r.read() == b"".join(payload)


async def test_sse_events_reach_the_client_before_the_stream_ends(
    guard: str, upstream: str, http: aiohttp.ClientSession
) -> None:
    # The upstream holds the stream open after its first event until we release it: if the
    # proxy buffered, the first event would never arrive and wait_for would time out.
    async with http.get(guard + "/gated-sse") as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 10)
        assert first == b"data: first\n\n"
        async with http.post(upstream + "/release") as rel:
            assert rel.status == 200
        assert await r.read() == b"data: [DONE]\n\n"


async def test_readyz_livez_metrics_are_answered_by_the_guard_not_forwarded(
    guard: str, upstream: str, http: aiohttp.ClientSession
) -> None:
    async with http.get(upstream + "/count") as r:
        before = await r.json()
    for path in ("/readyz", "/livez"):
        async with http.get(guard + path) as r:
            assert r.status == 200
    async with http.get(guard + "/spotstart/metrics") as r:
        text = await r.text()
    for name in (
        "spotstart_guard_in_flight",
        "spotstart_guard_requests_dropped_total",
        "spotstart_guard_notice_to_unready_seconds_bucket",
        "spotstart_guard_upstream_latency_seconds_count",
    ):
        assert name in text
    async with http.get(upstream + "/count") as r:
        assert await r.json() == before


async def test_unhealthy_upstream_turns_readyz_503_and_back(
    guard: str, upstream: str, http: aiohttp.ClientSession
) -> None:
    async def readyz_becomes(status: int) -> None:
        for _ in range(200):
            async with http.get(guard + "/readyz") as r:
                if r.status == status:
                    return
            await asyncio.sleep(0.02)
        raise AssertionError(f"/readyz never answered {status}")

    try:
        async with http.post(upstream + "/admin/health?ok=0"):
            pass
        await readyz_becomes(503)
    finally:
        async with http.post(upstream + "/admin/health?ok=1"):
            pass
    await readyz_becomes(200)


# -- the same drain in-process: ASGI -------------------------------------------------------------


async def _call(app: object, path: str) -> tuple[int, dict[str, str], bytes]:
    messages: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, object]) -> None:
        messages.append(message)

    scope = {"type": "http", "method": "GET", "path": path, "headers": []}
    await app(scope, receive, send)  # type: ignore[operator]
    start = messages[0]
    headers = {k.decode(): v.decode() for k, v in start["headers"]}  # type: ignore[attr-defined]
    body = b"".join(m.get("body", b"") for m in messages[1:])  # type: ignore[misc]
    return int(start["status"]), headers, body  # type: ignore[call-overload]


async def test_asgi_middleware_rejects_new_requests_during_drain_and_waits_for_in_flight() -> None:
    gate = asyncio.Event()

    async def inner(scope: object, receive: object, send: object) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
        await gate.wait()
        await send({"type": "http.response.body", "body": b"done"})  # type: ignore[operator]

    ctl = DrainController(DrainConfig(safety_margin_s=1), time.monotonic)
    app = DrainMiddleware(inner, ctl)
    assert (await _call(app, "/readyz"))[0] == 200
    running = asyncio.create_task(_call(app, "/generate"))
    for _ in range(100):
        if ctl.counters.in_flight == 1:
            break
        await asyncio.sleep(0.01)
    now = time.monotonic()
    app.notify(PreemptionNotice(NoticeKind.TERMINATION, "test", now, now + 30))
    assert (await _call(app, "/readyz"))[0] == 503
    status, headers, _ = await _call(app, "/generate")
    assert status == 503 and headers["retry-after"] == "1"
    drained = asyncio.create_task(app.drain())
    gate.set()
    assert await asyncio.wait_for(running, 5) == (200, {}, b"done")
    await asyncio.wait_for(drained, 5)
    assert ctl.counters.drained == 1 and ctl.counters.dropped == 0


# -- the request target, early departures, small bodies, errors (found on real clients) ----------


def raw_http(guard: str, request: bytes, timeout_s: float = 10.0) -> bytes:
    """Send ``request`` byte for byte (no client library to normalise it); the whole answer."""
    host, port = guard.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


@pytest.mark.parametrize(
    "target",
    ["/raw/a/%2e%2e/b%3B", "/raw/x/./y/../z?sig=a%2Fb%3D&x=%2e", "/raw/%2F%2f?a=%3B;b"],
)
def test_request_target_reaches_the_upstream_byte_for_byte(guard: str, target: str) -> None:
    head = f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    answer = raw_http(guard, head)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert answer.split(b"\r\n\r\n", 1)[1] == target.encode()


def test_absolute_form_request_target_is_accepted(guard: str) -> None:
    # RFC 9112 section 3.2.2: a server MUST accept the absolute-form in requests
    host = guard.removeprefix("http://")
    head = f"GET http://{host}/raw/abs?q=%2F HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    answer = raw_http(guard, head.encode())
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert answer.split(b"\r\n\r\n", 1)[1] == b"/raw/abs?q=%2F"


async def test_a_client_that_leaves_before_the_headers_cancels_the_upstream_request(
    guard: str, upstream: str, http: aiohttp.ClientSession
) -> None:
    async with http.get(upstream + "/gone") as r:
        before = await r.json()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5), http.get(guard + "/slow-headers"):
            pass  # never reached: the upstream thinks for 20 s
    for _ in range(200):  # the upstream sees its client (the guard) go: bounded poll
        async with http.get(upstream + "/gone") as r:
            if await r.json() > before:
                return
        await asyncio.sleep(0.05)
    raise AssertionError("the guard kept the upstream request after its client left")


async def test_a_small_response_still_arriving_is_streamed_not_held_back(
    guard: str, upstream: str, http: aiohttp.ClientSession
) -> None:
    async with http.get(guard + "/gated-small") as r:
        assert r.headers["Content-Length"] == "20"
        first = await asyncio.wait_for(r.content.readexactly(10), 10)
        assert first == b"first-ten!"  # before the upstream sent the rest
        async with http.post(upstream + "/release") as rel:
            assert rel.status == 200
        assert await r.read() == b"second-ten"


async def test_metrics_of_the_server_are_forwarded_the_guards_have_a_path_of_their_own(
    guard: str, http: aiohttp.ClientSession
) -> None:
    async with http.get(guard + "/metrics") as r:
        assert await r.text() == "vllm_num_requests_running 0\n"
    async with http.get(guard + "/spotstart/metrics") as r:
        assert "spotstart_guard_in_flight" in await r.text()


async def test_unreachable_upstream_is_a_retryable_503_that_names_no_internal_address(
    http: aiohttp.ClientSession,
) -> None:
    # a refused connection: the server never saw the request, so the client may send it to
    # another replica (a 502 says nothing of the kind)
    dead = f"http://127.0.0.1:{free_port()}"
    proc, url = start_guard(dead, "--cloud", "none", "--health-path", "")
    try:
        async with http.get(url + "/fast") as r:
            body = await r.text()
        assert r.status == 503 and r.headers["Retry-After"] == "1"
        assert "127.0.0.1" not in body and dead not in body
        assert any(dead in line for line in proc.lines)  # the operator's log has it
    finally:
        proc.stop()


async def test_clients_hanging_up_mid_stream_leave_no_tracebacks(
    upstream: str, http: aiohttp.ClientSession
) -> None:
    proc, url = start_guard(upstream, "--cloud", "none", "--health-interval", "0.1")
    try:
        wait_until_ready(url)
        for _ in range(5):
            async with http.get(url + "/sse?n=100&gap=0.02") as r:
                await asyncio.wait_for(r.content.readuntil(b"\n\n"), 10)
            # leaving the block with the body unread closes the connection
        for _ in range(200):
            async with http.get(url + "/spotstart/metrics") as r:
                if "spotstart_guard_in_flight 0.0" in await r.text():
                    break
            await asyncio.sleep(0.05)
    finally:
        proc.stop()
    assert "Traceback" not in proc.text and "Error handling request" not in proc.text
