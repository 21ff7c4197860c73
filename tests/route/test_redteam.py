"""Red team of ``spotstart route``: what a hostile or broken replica, or a client's odd body,
made the router do (each test failed before its fix)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from spotstart.route.splice import Splice, UpstreamViolation
from tests.route.conftest import MakeReplicas, MakeRouter, metric, sse, url


def _chunk(text: str, ids: list[int] | None, finish: str | None = None, **extra: Any) -> str:
    choice = {"index": 0, "text": text, "finish_reason": finish, "token_ids": ids, **extra}
    return json.dumps({"id": "cmpl-x", "created": 1, "model": "m", "choices": [choice]})


class Scripted:
    """A replica that writes a fixed SSE script for every generation, then does ``after``:
    "abort" (the connection cut before [DONE]), "garbage" (a line no engine sends), "stall"
    (silent, the connection held open)."""

    def __init__(self, script: bytes, after: str, headers: dict[str, str] | None = None) -> None:
        self.script = script
        self.headers = headers or {}
        self.after = after
        self.generations = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/readyz", _ok)
        app.router.add_post("/v1/completions", self._gen)
        app.router.add_get("/other", self._other)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _other(self, request: web.Request) -> web.Response:
        return web.Response(text="x", headers=self.headers)

    async def _gen(self, request: web.Request) -> web.StreamResponse:
        doc = await request.json()
        self.generations += 1
        if not doc.get("stream"):
            answer = {"id": "c", "choices": [{"index": 0, "text": "a", "finish_reason": "stop"}]}
            return web.json_response(answer, headers=self.headers)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", **self.headers})
        await resp.prepare(request)
        await resp.write(self.script)
        if self.after == "abort":
            assert request.transport is not None
            request.transport.abort()
        elif self.after == "garbage":
            await resp.write(b"data: {not json\n\n")
            await resp.write_eof()
        elif self.after == "stall":
            await asyncio.sleep(3600)
        else:
            await resp.write_eof()
        return resp


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


@pytest.fixture
async def scripted() -> AsyncIterator[list[Scripted]]:
    started: list[Scripted] = []
    yield started
    for s in started:
        await s.stop()


@pytest.mark.parametrize("after", ["abort", "garbage", "stall"])
async def test_a_cut_after_the_final_chunk_is_not_continued(
    make_replicas: MakeReplicas, make_router: MakeRouter, scripted: list[Scripted], after: str
) -> None:
    """The guard's cut (or garbage, or silence) after the chunk with the finish_reason but
    before [DONE]: the answer is complete. It was continued on another replica: text after
    the end and a second finish_reason reached the client."""
    events = [
        _chunk(" t5", [5], prompt_token_ids=[1, 2]),
        _chunk(" t6", [6]),
        _chunk(" t7", [7], "stop"),
    ]
    script = b"".join(b"data: " + e.encode() + b"\n\n" for e in events)
    first = Scripted(script, after)
    await first.start()
    scripted.append(first)
    (second,) = await make_replicas(1)
    router = await make_router(
        [], addresses=[("127.0.0.1", first.port), ("127.0.0.1", second.port)],
        stream_idle_timeout_s=0.3,
    )  # fmt: skip
    body = {"model": "m", "prompt": "p", "max_tokens": 50, "stream": True}
    status, got, _ = await sse(router, "/v1/completions", body)
    assert status == 200
    finishes = [
        c["finish_reason"] for e in got if isinstance(e, dict) for c in e["choices"]
        if c.get("finish_reason") is not None
    ]  # fmt: skip
    assert finishes == ["stop"]
    assert "".join(c["text"] for e in got if isinstance(e, dict) for c in e["choices"]) == (
        " t5 t6 t7"
    )
    assert got[-1] == "[DONE]"
    assert not any(r[0] == "/v1/completions" for r in second.requests)
    assert metric(router, "spotstart_route_continued_total") == 0


def test_the_text_kept_stops_growing_past_its_bound() -> None:
    """Past ``max_kept_bytes`` the stream is no longer continuable, and nothing more is kept
    (the text and ids kept growing: a long or hostile stream held memory without bound)."""
    s = Splice("completions", {"prompt": "p"}, token_ids_upstream=True, max_kept_bytes=1000)
    s.start_leg()
    for i in range(5000):
        s.absorb(_chunk("x", [i + 300]))
    assert not s.continuable
    assert s.tokens_sent == 5000
    assert len(s.text_parts) <= 1000
    assert s.gen_ids is None or len(s.gen_ids) <= 1000


def test_token_ids_count_against_the_bound() -> None:
    """One hostile replica's chunks with a byte of text and 100,000 ids each: the ids were
    kept without bound (a router's memory, the whole fleet's endpoint, exhausted by one pod)."""
    s = Splice("completions", {"prompt": "p"}, token_ids_upstream=True, max_kept_bytes=1 << 20)
    s.start_leg()
    ids = list(range(300, 100_300))
    for _ in range(30):
        s.absorb(_chunk("x", ids))
    assert not s.continuable
    assert s.gen_ids is None or len(s.gen_ids) <= (1 << 20)


def test_held_back_ids_are_bounded() -> None:
    """Chunks without text but with ids are held until text comes: a replica that never sends
    text piled them up without bound. No engine holds back more than a few tokens."""
    s = Splice("completions", {"prompt": "p"}, token_ids_upstream=True)
    s.start_leg()
    ids = list(range(300, 10_300))
    with pytest.raises(UpstreamViolation):
        for _ in range(100):
            s.absorb(_chunk("", ids))
    assert len(s.pending_ids) <= 100_000


@pytest.mark.parametrize("limit", ["30", 30.0, "30.0", True])
def test_a_limit_that_is_not_an_int_is_never_exceeded_by_a_continuation(limit: Any) -> None:
    """vLLM (pydantic, lax) takes ``max_tokens: "30"`` or ``30.0`` as 30. The router reduced
    only an int: its continuation asked for 30 more tokens after the 10 sent (40 in all)."""
    s = Splice(
        "completions", {"prompt": "p", "max_tokens": limit, "stream": True}, token_ids_upstream=True
    )
    s.start_leg()
    s.absorb(_chunk(" a", [7], prompt_token_ids=[1, 2]))
    for i in range(9):
        s.absorb(_chunk(" b", [8 + i]))
    s.absorb(_chunk("", [], "abort"))
    if s.continuable:
        body = s.start_leg()
        assert body["max_tokens"] == 20
    else:
        assert s.passthrough or s.why_not_continuable


async def test_the_replica_name_does_not_reach_the_client(
    make_router: MakeRouter, scripted: list[Scripted]
) -> None:
    """The guard's X-Spotstart-Replica (the pod's name) is for the router; the router is the
    public endpoint and passed it to every client (streams and other paths alike)."""
    script = b"data: " + _chunk(" t5", [5], "stop", prompt_token_ids=[1]).encode() + b"\n\n"
    first = Scripted(script + b"data: [DONE]\n\n", "end", {"X-Spotstart-Replica": "pod-abc-1"})
    await first.start()
    scripted.append(first)
    router = await make_router([], addresses=[("127.0.0.1", first.port)])
    body = {"model": "m", "prompt": "p", "max_tokens": 5, "stream": True}
    async with aiohttp.ClientSession() as session:
        for method, path, doc in (
            ("POST", "/v1/completions", body),
            ("POST", "/v1/completions", {**body, "stream": False}),
            ("GET", "/other", None),
        ):
            async with session.request(method, url(router, path), json=doc) as resp:
                await resp.read()
                assert resp.status == 200
                assert "X-Spotstart-Replica" not in resp.headers


async def test_a_body_sent_slowly_is_not_held_forever(
    make_replicas: MakeReplicas, make_router: MakeRouter
) -> None:
    """Slowloris on the body: the listener times heads only, and the router read a body
    without a deadline (a byte a minute held a connection and its buffer for ever)."""
    replicas = await make_replicas(1)
    router = await make_router(replicas, body_timeout_s=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", router.bound_port)
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n{"
    )
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    assert answer.startswith(b"HTTP/1.1 408")
    writer.close()
    assert not any(r[0] == "/v1/completions" for r in replicas[0].requests)


async def test_request_memory_in_flight_is_bounded(
    make_replicas: MakeReplicas, make_router: MakeRouter
) -> None:
    """Each body was bounded (16 MiB) but not their sum: a few clients with large prompts of
    token ids (a parsed id costs ~36 bytes, kept for the stream's life, copied per leg) ran the
    router (1 GiB in k8s render) out of memory. Past ``max_request_memory_bytes`` in flight a
    request gets 503 + Retry-After (one request is always taken)."""
    (replica,) = await make_replicas(1, token_delay_s=0.05)
    router = await make_router([replica], max_request_memory_bytes=700_000)
    prompt = list(range(300, 4300))  # ~24 KB of JSON, ~200 KB estimated parsed
    body = {"model": "m", "prompt": prompt, "max_tokens": 40, "stream": True}
    one = {"model": "m", "prompt": prompt, "max_tokens": 1, "stream": False}
    async with aiohttp.ClientSession() as session:
        held = [asyncio.create_task(sse(router, "/v1/completions", body)) for _ in range(2)]
        await asyncio.sleep(0.5)  # both streams in flight
        async with session.post(url(router, "/v1/completions"), json=one) as resp:
            await resp.read()
            refused = (resp.status, resp.headers.get("Retry-After"))
        results = await asyncio.gather(*held)
        # once the streams are done, the same request is taken
        async with session.post(url(router, "/v1/completions"), json=one) as resp:
            await resp.read()
            assert resp.status == 200
    assert all(status == 200 for status, _, _ in results)
    assert refused == (503, "1")


def test_a_huge_body_is_not_serialized_whole_for_its_prefix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The affinity prefix (1 KiB) was taken from the whole messages list serialized (13 MiB
    of 400,000 messages: 0.3 s of the router's one event loop, every stream stalled, per
    request); now only the messages it needs are serialized, and the prefix is the same."""
    from spotstart.route import server

    messages = [{"role": "user", "content": f"message {i}"} for i in range(100_000)]
    doc = {"model": "m", "messages": messages}
    want = ("m\0" + json.dumps(messages, sort_keys=True)).encode()[:1024]
    serialized = 0
    real = json.dumps

    def counting(obj: Any, **kw: Any) -> str:
        nonlocal serialized
        out = real(obj, **kw)
        serialized += len(out)
        return out

    monkeypatch.setattr(server.json, "dumps", counting)
    assert server._prefix_of("chat", doc, 1024) == want
    assert serialized < 64 << 10
    assert server._prefix_of("chat", {"model": "m", "messages": []}, 1024) == b"m\0[]"
    ids = list(range(100_000))
    serialized = 0
    got = server._prefix_of("completions", {"model": "m", "prompt": ids}, 1024)
    assert got == ("m\0" + real(ids)).encode()[:1024] and serialized < 64 << 10


def test_a_leg_does_not_deep_copy_the_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each leg deep-copied the request (1.1 s of the event loop for a 13 MiB chat body):
    a leg changes only top-level fields, and the request stays as the client sent it."""
    import copy

    def refuse(obj: Any, memo: Any = None) -> Any:
        raise AssertionError("deepcopy")

    monkeypatch.setattr(copy, "deepcopy", refuse)
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    body = {"messages": messages, "max_tokens": 10, "continue_final_message": True}
    original = json.loads(json.dumps(body))
    s = Splice("chat", body, token_ids_upstream=False)
    s.start_leg()
    role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
    s.absorb(json.dumps({"id": "c", "created": 1, "model": "m", "choices": [role]}))
    for t in (" b", " c"):
        ch = {"index": 0, "delta": {"content": t}, "finish_reason": None}
        s.absorb(json.dumps({"id": "c", "created": 1, "model": "m", "choices": [ch]}))
    leg = s.start_leg()
    assert leg["messages"][-1] == {"role": "assistant", "content": "a b c"}
    assert leg["max_tokens"] == 8
    assert body == original


async def test_a_readiness_poll_does_not_follow_a_redirect(make_router: MakeRouter) -> None:
    """A replica's /readyz answering 307 to another address made the router GET it (a blind
    request from the router's pod to wherever a replica, or whoever holds its address, says:
    the cloud's metadata server...), and that answer's 200 made the replica ready."""
    hits: list[str] = []

    async def elsewhere(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(text="ok")

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(f"http://127.0.0.1:{other_port}/latest/meta-data")

    runners = []
    ports = []
    for handler in (elsewhere, redirect):
        app = web.Application()
        app.router.add_get("/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        ports.append(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
    other_port = ports[0]
    try:
        router = await make_router([], addresses=[("127.0.0.1", ports[1])])
        await router.poll_once()
        assert hits == []
        assert not router.replicas.ready()
    finally:
        for runner in runners:
            await runner.cleanup()
