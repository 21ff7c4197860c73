"""Red team of the guard's engine behaviours (finish_reason abort, vLLM's shutdown 500, the
JSON buffer, the starting server's SIGKILL). Who attacks: any client of the guard port, and the
engine's output, which the client steers (a prompt can make the model print any text). Each
upstream here is a small aiohttp app; no engine is needed."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web

from spotstart.guard.answers import AbortScanner, body_aborted, is_shutdown_refusal
from spotstart.guard.drain import Command, DrainConfig, DrainController
from spotstart.guard.metrics import GuardMetrics
from spotstart.guard.notice import NoticeKind, PreemptionNotice
from spotstart.guard.proxy import GuardProxy, ProxyConfig
from tests.guard.test_engine_behaviours import SSE, FakeClock, events, recorded

TIMEOUT = aiohttp.ClientTimeout(total=30)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# what a client can make a model print: the abort marker and vLLM's shutdown message, in every
# spelling a JSON encoder can give them
HOSTILE_TEXTS = [
    '"finish_reason":"abort"',
    '"finish_reason": "abort"',
    '{"finish_reason":"abort"}',
    '\\"finish_reason\\":\\"abort\\"',  # the text itself holds backslashes
    '\\\\"finish_reason\\\\":\\\\"abort\\\\"',
    'finish_reason":"abort',
    "finish_reason",  # a string value exactly "finish_reason"...
    "\u0022finish_reason\u0022:\u0022abort\u0022",
    '"finish_reason"\n:\t"abort"',
    'data: {"error": {"message": "x", "code": 500}}\n\ndata: [DONE]\n\n',
    'data:{"choices":[{"finish_reason":"abort"}]}\r\n\r\n',
    ": comment\n\n",
    "cannot schedule new futures after shutdown",
]


def chat_answer(contents: list[str], ensure_ascii: bool) -> bytes:
    """A non-streaming chat completion with one choice per content (n > 1), as vLLM writes
    it (compact), each finished normally."""
    answer = json.loads(recorded("chat_ok.json"))
    template = answer["choices"][0]
    answer["choices"] = [
        {**template, "index": i, "message": {**template["message"], "content": text}}
        for i, text in enumerate(contents)
    ]
    return json.dumps(answer, separators=(",", ":"), ensure_ascii=ensure_ascii).encode()


def chat_stream(contents: list[str], ensure_ascii: bool, finish: str = "stop") -> bytes:
    """A chat stream (n = len(contents)): one delta event per choice, then each choice's
    finish, then [DONE], as vLLM writes them."""
    out = []
    for i, text in enumerate(contents):
        delta = {"choices": [{"index": i, "delta": {"content": text}, "finish_reason": None}]}
        out.append(b"data: " + json.dumps(delta, ensure_ascii=ensure_ascii).encode() + b"\n\n")
    for i in range(len(contents)):
        end = {"choices": [{"index": i, "delta": {}, "finish_reason": finish}]}
        out.append(b"data: " + json.dumps(end, separators=(",", ":")).encode() + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return b"".join(out)


# -- a guard in front of any upstream --------------------------------------------------------------


@dataclass
class Rig:
    proxy: GuardProxy
    url: str
    upstream: web.Application

    @property
    def controller(self) -> DrainController:
        return self.proxy.controller


@contextlib.asynccontextmanager
async def rig(
    routes: dict[str, Handler],
    drain: DrainConfig | None = None,
    health: Handler | None = None,
    **proxy: object,
) -> AsyncIterator[Rig]:
    async def ok(_: web.Request) -> web.Response:
        return web.Response()

    app = web.Application()
    for path, handler in routes.items():
        app.router.add_route("*", path, handler)
    app.router.add_get("/health", health or ok)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    controller = DrainController(drain or DrainConfig(min_grace_s=0.5), time.monotonic)
    config = ProxyConfig(
        f"http://127.0.0.1:{port}",
        listen_port=0,
        health_interval_s=0.05,
        **proxy,  # type: ignore[arg-type]
    )
    gp = GuardProxy(config, controller, GuardMetrics(controller), time.monotonic)
    await gp.start()
    try:
        if health is None:
            await until(lambda: controller.ready, "the guard ready")
        yield Rig(gp, f"http://127.0.0.1:{gp.bound_port}", app)
    finally:
        await gp.close()
        await runner.cleanup()


async def until(check: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not within {timeout_s}s: {what}")


def fixed(status: int, body: bytes, ctype: str = "application/json") -> Handler:
    async def handler(_: web.Request) -> web.Response:
        return web.Response(status=status, body=body, headers={"Content-Type": ctype})

    return handler


# -- 1. generated text that spells the abort marker or the shutdown message ------------------------


@pytest.mark.parametrize("ensure_ascii", [False, True])
@pytest.mark.parametrize("text", HOSTILE_TEXTS)
def test_generated_text_never_reads_as_an_abort_in_any_split(text: str, ensure_ascii: bool) -> None:
    for body in (
        chat_answer([text, "fine"], ensure_ascii),
        chat_stream([text, text], ensure_ascii),
    ):
        assert not body_aborted(body), body
        for cut in range(len(body) + 1):
            scan = AbortScanner()
            scan.feed(body[:cut])
            scan.feed(body[cut:])
            assert not scan.aborted and not scan.errored, (cut, body)
        assert not is_shutdown_refusal(500, body)


def test_one_choice_of_several_aborted_is_an_abort() -> None:
    body = chat_stream(["a", "b", "c"], ensure_ascii=False, finish="stop")
    aborted = body.replace(b'"index": 1, "delta": {}, "finish_reason": "stop"', b"")
    end = {"choices": [{"index": 1, "delta": {}, "finish_reason": "abort"}]}
    aborted = body + b"data: " + json.dumps(end, separators=(",", ":")).encode() + b"\n\n"
    assert body_aborted(aborted) and not body_aborted(body)
    for crlf in (aborted.replace(b"\n", b"\r\n"), aborted.replace(b"data: ", b"data:")):
        assert body_aborted(crlf)


@pytest.mark.parametrize("stream", [False, True])
async def test_an_answer_spelling_abort_and_shutdown_passes_unchanged_counted_served(
    stream: bool,
) -> None:
    texts = [t for t in HOSTILE_TEXTS if "\n" not in t]
    body = chat_stream(texts, False) if stream else chat_answer(texts, False)

    async def answer(request: web.Request) -> web.StreamResponse:
        if not stream:
            return web.Response(body=body, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": SSE})
        await resp.prepare(request)
        for i in range(0, len(body), 7):  # every chunk boundary a client could hope for
            await resp.write(body[i : i + 7])
        await resp.write_eof()
        return resp

    async with (
        rig({"/v1/chat/completions": answer}) as r,
        aiohttp.ClientSession(timeout=TIMEOUT) as s,
    ):
        now = time.monotonic()
        for _ in range(3):
            async with s.post(r.url + "/v1/chat/completions", json={}) as resp:
                assert resp.status == 200 and await resp.read() == body
        assert r.controller.ready
        r.controller.on_notice(PreemptionNotice(NoticeKind.PREEMPTION, "t", now, now + 30))
        async with s.post(r.url + "/v1/chat/completions", json={}) as resp:
            assert resp.status == 503  # draining: rejected, as it should be
        c = r.controller.counters
        assert (c.accepted, c.aborted, c.failed, c.lost, c.rejected) == (3, 0, 0, 0, 1)


# -- 2. a 500 that mentions the shutdown but is not vLLM shutting down -----------------------------

# vLLM answers a raw exception (RuntimeError, KeyError...) 500 with str(exc) as the message: a
# chat template or a tool parser failing on the client's input can echo what the client sent
ECHO_500S = [
    json.dumps(
        {
            "error": {
                "message": "error rendering the chat template: unknown variable 'cannot schedule "
                "new futures after shutdown'",
                "type": "InternalServerError",
                "param": None,
                "code": 500,
            }
        }
    ).encode(),
    b"Internal Server Error: cannot schedule new futures after shutdown (in the prompt)",
    json.dumps(
        {
            "error": {"message": "x", "type": "InternalServerError"},
            "prompt": "cannot schedule new futures after shutdown",
        }
    ).encode(),
]


@pytest.mark.parametrize("body", ECHO_500S)
def test_a_500_that_only_mentions_the_shutdown_is_not_a_refusal(body: bytes) -> None:
    assert not is_shutdown_refusal(500, body)
    assert is_shutdown_refusal(500, recorded("shutdown_refusal_500.json"))
    pretty = json.dumps(json.loads(recorded("shutdown_refusal_500.json")), indent=2).encode()
    assert is_shutdown_refusal(500, pretty)


@pytest.mark.parametrize("body", ECHO_500S)
async def test_a_client_steered_500_does_not_make_a_healthy_engine_unready(body: bytes) -> None:
    served = 0

    async def generate(request: web.Request) -> web.Response:
        nonlocal served
        prompt = (await request.json())["prompt"]
        if prompt == "evil":
            return web.Response(status=500, body=body, content_type="application/json")
        served += 1
        return web.Response(body=recorded("completion_ok.json"), content_type="application/json")

    async with (
        rig({"/v1/completions": generate}) as r,
        aiohttp.ClientSession(timeout=TIMEOUT) as s,
    ):
        async with s.post(r.url + "/v1/completions", json={"prompt": "evil"}) as resp:
            assert resp.status == 500 and await resp.read() == body  # passed on as sent
        async with s.get(r.url + "/readyz") as resp:
            assert resp.status == 200, await resp.text()
        async with s.post(r.url + "/v1/completions", json={"prompt": "hi"}) as resp:
            assert resp.status == 200 and await resp.read() == recorded("completion_ok.json")
        assert served == 1
        c = r.controller.counters
        assert (c.accepted, c.failed, c.rejected) == (2, 1, 0)


async def test_a_false_shutdown_reading_is_asked_again_and_a_served_request_ends_it() -> None:
    """Even a 500 exactly like vLLM's refusal (a client that found a way to make the engine
    say it) keeps a healthy engine from clients for one recheck interval, not for good."""
    refuse = True
    received = 0

    async def generate(_: web.Request) -> web.Response:
        nonlocal received
        received += 1
        if refuse:
            refusal = recorded("shutdown_refusal_500.json")
            return web.Response(status=500, body=refusal, content_type="application/json")
        return web.Response(body=recorded("completion_ok.json"), content_type="application/json")

    drain = DrainConfig(min_grace_s=0.5, shutdown_recheck_s=0.3)
    async with (
        rig({"/v1/completions": generate}, drain) as r,
        aiohttp.ClientSession(timeout=TIMEOUT) as s,
    ):
        async with s.post(r.url + "/v1/completions", json={}) as resp:
            assert resp.status == 503
        assert not r.controller.ready and received == 1
        # a genuine shutdown: the one request let through per interval is refused again
        await asyncio.sleep(0.35)
        statuses = []
        for _ in range(3):
            async with s.post(r.url + "/v1/completions", json={}) as resp:
                statuses.append(resp.status)
        assert statuses == [503, 503, 503] and received == 2, (statuses, received)
        assert not r.controller.ready
        await asyncio.sleep(0.35)
        # ready again for the recheck: no request comes to an unready replica behind a load
        # balancer, and without one a false reading would last for good
        async with s.get(r.url + "/readyz") as resp:
            assert resp.status == 200
        refuse = False  # the engine was never shutting down (or a new one is up)
        async with s.post(r.url + "/v1/completions", json={}) as resp:
            assert resp.status == 200 and await resp.read() == recorded("completion_ok.json")
        assert r.controller.ready and not r.controller.upstream_shutting_down
        c = r.controller.counters
        assert (c.accepted, c.rejected, c.failed, c.lost) == (1, 4, 0, 0), c


# -- 3. the JSON buffer and the 500 peek: bounded, and nothing altered but an abort ----------------


async def test_concurrent_big_answers_are_held_within_the_budget_and_pass_unchanged() -> None:
    big = chat_answer(["x" * ((1 << 20) - 1024)], ensure_ascii=False)
    assert len(big) <= 1 << 20
    release = asyncio.Event()
    peak = 0

    async def slow(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = len(big)
        await resp.prepare(request)
        await resp.write(big[:100])
        await release.wait()
        await resp.write(big[100:])
        await resp.write_eof()
        return resp

    async with (
        rig({"/v1/chat/completions": slow}, json_buffer_budget_bytes=4 << 20) as r,
        aiohttp.ClientSession(timeout=TIMEOUT) as s,
    ):

        async def one() -> tuple[int, bytes]:
            async with s.post(r.url + "/v1/chat/completions", json={}) as resp:
                return resp.status, await resp.read()

        tasks = [asyncio.create_task(one()) for _ in range(12)]
        for _ in range(50):
            await asyncio.sleep(0.01)
            peak = max(peak, r.proxy._json_buffered)
        release.set()
        results = await asyncio.gather(*tasks)
        assert all(got == (200, big) for got in results)
        assert peak <= 4 << 20 and r.proxy._json_buffered == 0
        assert r.controller.counters.failed == 0


async def test_a_flood_of_slow_500s_is_held_within_the_budget_not_per_connection() -> None:
    """The 500 peek (to recognise vLLM's refusal) was outside the budget: N slow 500s held N x
    64 KiB. Within the budget, the ones that do not fit are streamed as they come."""
    release = asyncio.Event()

    async def slow_500(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=500, headers={"Content-Type": "application/json"})
        await resp.prepare(request)  # chunked: no Content-Length
        await resp.write(b'{"error":')
        await release.wait()
        await resp.write(b'{"message":"boom"}}')
        await resp.write_eof()
        return resp

    async with (
        rig({"/v1/completions": slow_500}, json_buffer_budget_bytes=2 * 64 * 1024) as r,
        aiohttp.ClientSession(timeout=TIMEOUT) as s,
    ):
        started: list[int] = []

        async def one() -> bytes:
            async with s.post(r.url + "/v1/completions", json={}) as resp:
                started.append(resp.status)
                return await resp.read()

        tasks = [asyncio.create_task(one()) for _ in range(6)]
        await until(lambda: len(started) >= 4, "the 500s beyond the budget streamed", 5)
        assert r.proxy._json_buffered <= 2 * 64 * 1024
        release.set()
        assert all(b == b'{"error":{"message":"boom"}}' for b in await asyncio.gather(*tasks))
        assert r.proxy._json_buffered == 0 and r.controller.ready


async def test_an_upstream_that_lies_about_its_length_is_a_failure_not_an_answer() -> None:
    async def short(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = 5000
        await resp.prepare(request)
        await resp.write(recorded("chat_ok.json")[:200])
        assert request.transport is not None
        request.transport.close()  # the upstream dies mid-answer
        return resp

    async with (
        rig({"/v1/chat/completions": short}) as r,
        aiohttp.ClientSession(timeout=TIMEOUT) as s,
    ):
        async with s.post(r.url + "/v1/chat/completions", json={}) as resp:
            assert resp.status == 502, resp.status
        c = r.controller.counters
        assert (c.failed, c.in_flight) == (1, 0)
        assert r.proxy._json_buffered == 0 and r.controller.ready


async def test_a_client_that_leaves_mid_buffer_frees_its_share() -> None:
    async def never(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        await resp.write(b'{"id":')
        await asyncio.sleep(30)
        return resp

    async with (
        rig({"/v1/chat/completions": never}) as r,
        aiohttp.ClientSession(timeout=TIMEOUT) as s,
    ):
        task = asyncio.create_task(s.post(r.url + "/v1/chat/completions", json={}))
        await until(lambda: r.proxy._json_buffered > 0, "the answer held")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await until(lambda: r.proxy._json_buffered == 0, "its share freed")
        await until(lambda: r.controller.counters.in_flight == 0, "the request ended")


@pytest.mark.parametrize(
    ("method", "status", "headers", "body"),
    [
        ("HEAD", 200, {"Content-Type": "application/json"}, b""),
        ("GET", 204, {}, b""),
        ("GET", 304, {"ETag": '"x"'}, b""),
        ("GET", 200, {"Content-Type": "application/json", "Content-Encoding": "gzip"}, None),
        ("GET", 200, {"Content-Type": "application/problem+json"}, b'{"finish_reason":"stop"}'),
    ],
)
async def test_bodiless_and_encoded_answers_pass_unchanged(
    method: str, status: int, headers: dict[str, str], body: bytes | None
) -> None:
    if body is None:  # gzip: an aborted answer the guard cannot read is passed on as sent
        body = gzip.compress(recorded("chat_aborted.json"))

    async def answer(request: web.Request) -> web.Response:
        return web.Response(status=status, body=body or None, headers=headers)

    async with rig({"/x": answer}) as r, aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.request(method, r.url + "/x", auto_decompress=False) as resp:
            assert resp.status == status and await resp.read() == body
        assert r.controller.ready and r.controller.counters.in_flight == 0


# -- 4. the starting server's 1 s SIGKILL never reaches a started one ------------------------------


def notice_at(clock: FakeClock, window_s: float = 30.0) -> PreemptionNotice:
    return PreemptionNotice(NoticeKind.PREEMPTION, "gce", clock.now, clock.now + window_s)


def test_a_server_seen_started_within_the_short_grace_gets_the_stop_again_and_full_grace() -> None:
    clock = FakeClock()
    config = DrainConfig(safety_margin_s=5, stop_grace_s=10, supervising=True)
    ctl = DrainController(config, clock)
    ctl.on_notice(notice_at(clock))
    assert ctl.tick() == [Command.STOP_SERVER]  # never seen healthy: the short grace
    clock.now += 0.5
    ctl.note_upstream_started()  # its health answered (it came up, or was up already)
    assert ctl.next_wakeup() == clock.now
    assert ctl.tick() == [Command.STOP_SERVER]  # again: a starting vLLM ignored the first
    clock.now += 2.0  # past the 1 s cut
    assert ctl.tick() == []
    clock.now = 1000 + 0.5 + config.stop_grace_s
    assert ctl.tick() == [Command.KILL_SERVER]  # the full grace, then SIGKILL, in the notice
    assert ctl.stop_by is not None and ctl.stop_by <= 1000 + 30 - 5


def test_a_server_whose_health_flaps_is_still_a_started_server() -> None:
    clock = FakeClock()
    ctl = DrainController(DrainConfig(stop_grace_s=10, supervising=True), clock)
    for healthy in (True, False, True, False):
        ctl.set_upstream_health(healthy)
    ctl.on_notice(notice_at(clock))
    assert ctl.tick() == [Command.STOP_SERVER]
    assert ctl.stop_by == pytest.approx(1000 + 10)


async def test_a_server_that_turns_healthy_as_the_notice_arrives_is_seen_started() -> None:
    healthy = False

    async def health(_: web.Request) -> web.Response:
        return web.Response(status=200 if healthy else 503)

    drain = DrainConfig(min_grace_s=0.5, supervising=True)
    async with rig({}, drain, health=health) as r:
        await asyncio.sleep(0.2)
        assert not r.controller.upstream_ever_healthy
        now = time.monotonic()
        r.controller.on_notice(PreemptionNotice(NoticeKind.PREEMPTION, "t", now, now + 30))
        healthy = True  # up at the very moment the notice came
        await until(lambda: r.controller.upstream_ever_healthy, "the server seen started", 3)


async def test_a_server_that_answers_requests_is_started_before_its_health_says_so() -> None:
    async def health(_: web.Request) -> web.Response:
        await asyncio.sleep(5)  # /health slower than the poll's timeout under load
        return web.Response()

    drain = DrainConfig(min_grace_s=0.5, supervising=True)
    async with (
        rig(
            {"/v1/completions": fixed(500, b'{"error":{"message":"x"}}')}, drain, health=health
        ) as r,
        aiohttp.ClientSession(timeout=TIMEOUT) as s,
    ):
        async with s.post(r.url + "/v1/completions", json={}) as resp:
            assert resp.status == 500
        assert r.controller.upstream_ever_healthy


# -- 5. objects the client wrote, echoed by vLLM as JSON: a real "finish_reason":"abort" ----------

# vLLM's Responses API answers with the request's ``metadata`` (and ``tools``, ``text``) as given:
# the client writes a genuine key and value, not escaped text
ECHOED = {"finish_reason": "abort", "x": '"finish_reason":"abort"'}
RESPONSES_JSON = json.dumps(
    {
        "id": "resp_1",
        "object": "response",
        "status": "completed",
        "metadata": ECHOED,
        "tools": [{"type": "function", "name": "f", "parameters": {"choices": [ECHOED]}}],
        "output": [{"type": "message", "content": [{"type": "output_text", "text": "hi"}]}],
        "error": None,
    },
    separators=(",", ":"),
).encode()
RESPONSES_SSE = (
    b"event: response.created\ndata: "
    + json.dumps({"type": "response.created", "response": json.loads(RESPONSES_JSON)}).encode()
    + b"\n\nevent: response.completed\ndata: "
    + json.dumps({"type": "response.completed", "response": json.loads(RESPONSES_JSON)}).encode()
    + b"\n\n"
)


def test_an_echoed_object_with_finish_reason_abort_is_not_an_abort() -> None:
    assert b'"finish_reason":"abort"' in RESPONSES_JSON
    assert not body_aborted(RESPONSES_JSON) and not body_aborted(RESPONSES_SSE)
    for cut in range(0, len(RESPONSES_SSE) + 1, 3):
        scan = AbortScanner()
        scan.feed(RESPONSES_SSE[:cut])
        scan.feed(RESPONSES_SSE[cut:])
        assert not scan.aborted and not scan.errored, cut


@pytest.mark.parametrize("stream", [False, True])
async def test_a_client_echoed_abort_key_gets_its_answer_and_counts_nothing_lost(
    stream: bool,
) -> None:
    body = RESPONSES_SSE if stream else RESPONSES_JSON
    ctype = SSE if stream else "application/json"
    async with (
        rig({"/v1/responses": fixed(200, body, ctype)}) as r,
        aiohttp.ClientSession(timeout=TIMEOUT) as s,
    ):
        async with s.post(r.url + "/v1/responses", json={}) as resp:
            assert resp.status == 200 and await resp.read() == body
        c = r.controller.counters
        assert (c.accepted, c.aborted, c.lost, c.failed) == (1, 0, 0, 0)


@pytest.mark.parametrize(
    "spell",
    [
        lambda b: b,
        lambda b: b.replace(b"\n", b"\r\n"),
        lambda b: b.replace(b"\n", b"\r"),
        lambda b: b.replace(b"data: ", b"data:"),
        lambda b: b": keep-alive\n\n" + b.replace(b"\n\n", b"\n: ping\n\n"),
        lambda b: b.rstrip(b"\n") + b"\n",  # ends without the blank line
    ],
)
def test_vllms_abort_is_seen_in_every_sse_spelling_and_split(
    spell: Callable[[bytes], bytes],
) -> None:
    for name, aborted in (("chat_stream_aborted.sse", True), ("chat_stream_ok.sse", False)):
        body = spell(recorded(name))
        for cut in range(len(body) + 1):
            scan = AbortScanner()
            scan.feed(body[:cut])
            scan.feed(body[cut:])
            assert scan.aborted is aborted, (name, cut)


def test_an_event_over_the_hold_limit_is_scanned_as_bytes_not_held() -> None:
    """A client can make one event long (echo of a long prompt, its token ids): held, that
    was up to 1 MiB per stream outside any budget; now at most 64 KiB, and the next events
    are read as JSON again."""
    from spotstart.guard import answers

    huge = b"y" * (4 * answers.EVENT_BYTES)
    echoed = json.dumps({"metadata": ECHOED}, separators=(",", ":")).encode()
    for big in (
        b'data: {"choices":[{"text":"' + huge + b'"}]}\n\n',  # one long line
        b"".join(b"data: " + huge[:1000] + b"\n" for _ in range(300)) + b"\n",  # many lines
    ):
        for step in (1000, 70000):
            scan = AbortScanner()
            ok = big + b"data: " + echoed + b"\n\n"  # read as JSON again: not an abort
            for i in range(0, len(ok), step):
                scan.feed(ok[i : i + step])
                assert len(scan._line) + scan._size <= answers.EVENT_BYTES
            assert not scan.aborted, step
            scan.feed(events(recorded("chat_stream_aborted.sse"))[-2])
            assert scan.aborted
    scan = AbortScanner()  # an abort inside a long event: the byte pattern still sees it
    scan.feed(b'data: {"choices":[{"text":"' + huge + b'","finish_reason":')
    scan.feed(b'"abort"}]}\n\n')
    assert scan.aborted


async def test_a_probe_the_engine_keeps_generating_ends_the_false_shutdown_reading() -> None:
    """The request let through to ask again may be a long generation: the engine took it
    (vLLM refuses a new request within milliseconds once shutting down), so other requests
    are not kept waiting behind it."""
    calls = 0

    async def generate(_: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            refusal = recorded("shutdown_refusal_500.json")
            return web.Response(status=500, body=refusal, content_type="application/json")
        if calls == 2:
            await asyncio.sleep(3)  # the probe: a long non-streaming generation
        return web.Response(body=recorded("completion_ok.json"), content_type="application/json")

    drain = DrainConfig(min_grace_s=0.5, shutdown_recheck_s=0.3)
    async with (
        rig({"/v1/completions": generate}, drain) as r,
        aiohttp.ClientSession(timeout=TIMEOUT) as s,
    ):
        async with s.post(r.url + "/v1/completions", json={}) as resp:
            assert resp.status == 503
        await asyncio.sleep(0.35)
        probe = asyncio.create_task(s.post(r.url + "/v1/completions", json={}))
        await until(lambda: calls == 2, "the probe forwarded")
        await asyncio.sleep(0.35)
        t0 = time.monotonic()
        async with s.post(r.url + "/v1/completions", json={}) as resp:
            assert resp.status == 200 and time.monotonic() - t0 < 2
        assert r.controller.ready
        async with await probe as resp:
            assert resp.status == 200
