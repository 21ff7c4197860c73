"""The router's other promises: non-streaming answers rerun whole, requests no replica started
sent elsewhere, clean errors when no replica can take or continue a request, n > 1 passed on
but never spliced, hostile replicas and clients, metrics, prefix affinity."""

from __future__ import annotations

import asyncio
import io
import json

import aiohttp
import pytest

from spotstart.listen import ListenLimits
from spotstart.route.replicas import (
    PrefixAffinity,
    ReplicaSet,
    ReplicaSource,
    keep_resolving,
    parse_replicas,
)
from tests.route.conftest import MakeReplicas, MakeRouter, metric, sse, text_of, url
from tests.route.replica import reference

BODY = {"model": "m", "prompt": "hello there", "max_tokens": 40}


async def post(router, path, body, headers=None):  # type: ignore[no-untyped-def]
    async with (
        aiohttp.ClientSession() as s,
        s.post(url(router, path), json=body, headers=headers or {}) as resp,
    ):
        return resp.status, await resp.read(), resp.headers


async def test_non_streaming_aborted_answer_is_run_again(
    make_replicas: MakeReplicas, make_router: MakeRouter
) -> None:
    first, second = await make_replicas(2)
    first.abort_after = 7  # vLLM on SIGTERM: HTTP 200 with a truncated completion
    router = await make_router([first, second])
    status, raw, _ = await post(router, "/v1/completions", BODY)
    assert status == 200

    doc = json.loads(raw)
    assert doc["choices"][0]["finish_reason"] == "length"
    assert doc["choices"][0]["text"] == reference("completions", BODY, 40)[0]
    assert metric(router, "spotstart_route_rerun_total") == 1


@pytest.mark.parametrize("how", ["503", "500", "refused"])
async def test_unstarted_request_goes_to_another_replica(
    make_replicas: MakeReplicas, make_router: MakeRouter, how: str
) -> None:
    first, second = await make_replicas(2)
    router = await make_router([first, second])
    if how == "refused":
        await first.stop()  # still marked ready until the next poll
    else:
        first.status = int(how)
    body = {**BODY, "stream": True}
    status, events, _ = await sse(router, "/v1/completions", body)
    assert status == 200
    assert text_of(events) == reference("completions", body, 40)[0]
    assert metric(router, "spotstart_route_retried_total") >= 1
    assert metric(router, "spotstart_route_continued_total") == 0


async def test_a_draining_replica_s_503_never_reaches_the_client(
    make_replicas: MakeReplicas, make_router: MakeRouter
) -> None:
    first, second = await make_replicas(2)
    router = await make_router([first, second])
    first.draining = True  # answers 503 while its readyz still said ready at the last poll
    for _ in range(5):
        status, _, _ = await post(router, "/v1/completions", BODY)
        assert status == 200


async def test_all_replicas_down_is_a_clean_502(
    make_replicas: MakeReplicas, make_router: MakeRouter
) -> None:
    first, second = await make_replicas(2)
    router = await make_router([first, second], continue_timeout_s=0.2)
    await first.stop()
    await second.stop()
    status, _, _ = await post(router, "/v1/completions", {**BODY, "stream": True})
    assert status == 502
    status, _, _ = await post(router, "/v1/completions", BODY)
    assert status == 502
    status, _raw, _ = await post(router, "/v1/models", {})
    assert status == 502
    assert metric(router, "spotstart_route_lost_total") == 3


async def test_a_stream_no_replica_can_continue_ends_with_an_error_event(
    make_replicas: MakeReplicas, make_router: MakeRouter
) -> None:
    first, second = await make_replicas(2)
    first.drain_after, first.drain_deadline_ms = 10, 20  # draining: never ready again
    router = await make_router([first, second], continue_timeout_s=0.2)
    await second.stop()
    await router.poll_once()
    status, events, _ = await sse(router, "/v1/completions", {**BODY, "stream": True})
    assert status == 200
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["type"] == "spotstart_route_lost"
    assert not any(ch.get("finish_reason") for e in events[:-2] for ch in e.get("choices", []))
    assert metric(router, "spotstart_route_lost_total") == 1


async def test_n_above_one_is_passed_on_and_never_spliced(
    make_replicas: MakeReplicas, make_router: MakeRouter
) -> None:
    first, second = await make_replicas(2)
    router = await make_router([first, second])
    body = {**BODY, "stream": True, "n": 2}
    _, events, _ = await sse(router, "/v1/completions", body)
    finishes = sorted(
        ch["index"]
        for e in events
        if isinstance(e, dict)
        for ch in e["choices"]
        if ch.get("finish_reason") == "length"
    )
    assert finishes == [0, 1] and events[-1] == "[DONE]"
    # the engine's own usage chunk, once
    _, events, _ = await sse(
        router, "/v1/completions", {**body, "stream_options": {"include_usage": True}}
    )
    usages = [e["usage"] for e in events if isinstance(e, dict) and e.get("usage")]
    assert [u["completion_tokens"] for u in usages] == [80]
    # cut before any event: run again whole
    first.cut_after = 0
    router.replicas.affinity = PrefixAffinity()  # the first of two idle replicas is chosen
    before = len(first.requests)
    _, events, _ = await sse(router, "/v1/completions", body)
    assert len(first.requests) > before and len(second.requests) > 0
    assert events[-1] == "[DONE]" and "error" not in events[-2]
    assert len([e for e in events if isinstance(e, dict)]) == 80
    first.cut_after = second.cut_after = 5
    _, events, _ = await sse(router, "/v1/completions", body)
    assert events[-2]["error"]["message"].endswith(
        "n > 1 or best_of > 1 (several choices are not continued)"
    )
    assert metric(router, "spotstart_route_continued_total") == 0


async def test_hostile_replicas_everywhere_lose_the_request_cleanly(
    make_replicas: MakeReplicas, make_router: MakeRouter
) -> None:
    replicas = await make_replicas(2, hostile="huge_line", hostile_after=2)
    router = await make_router(replicas, max_continuations=3)
    _, events, _ = await sse(router, "/v1/completions", {**BODY, "stream": True})
    assert events[-2]["error"]["type"] == "spotstart_route_lost"
    assert metric(router, "spotstart_route_lost_total") == 1


async def test_hostile_clients(make_replicas: MakeReplicas, make_router: MakeRouter) -> None:
    (replica,) = await make_replicas(1)
    limits = ListenLimits(max_connections=64, request_bodies=True, head_timeout_s=0.3)
    router = await make_router([replica], max_body_bytes=1 << 20, limits=limits)
    # a body over the bound: 413, the replica never sees it
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            url(router, "/v1/completions"),
            data=io.BytesIO(b'{"prompt": "' + b"x" * (2 << 20) + b'"}'),
        ) as resp,
    ):
        assert resp.status == 413
    assert not replica.requests
    # the client's own continue header, hop-by-hop headers and what Connection names are
    # dropped; Authorization is passed on
    status, _, _ = await post(
        router,
        "/v1/models?x=1",
        {},
        headers={
            "Authorization": "Bearer k",
            "X-Spotstart-Continue": "0",
            "Connection": "X-Secret",
            "X-Secret": "s",
            "Proxy-Authorization": "p",
        },
    )
    assert status == 200
    path, headers, _ = replica.requests[-1]
    assert path == "/v1/models?x=1"
    assert headers["Authorization"] == "Bearer k"
    assert headers["X-Spotstart-Continue"] == "1"
    assert "X-Secret" not in headers and "Proxy-Authorization" not in headers
    # an absolute-form target never names the upstream host
    reader, writer = await asyncio.open_connection("127.0.0.1", router.bound_port)
    writer.write(b"GET http://169.254.169.254/latest HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    head = await reader.readline()
    assert b" 400 " in head
    writer.close()
    assert all("169.254" not in p for p, _, _ in replica.requests)
    # a path that looks like a network-path reference stays a path on the replica
    status, _, _ = await post(router, "//169.254.169.254/latest", {})
    assert status == 200
    assert replica.requests[-1][0] == "//169.254.169.254/latest"
    # slowloris: a head that never ends is closed by the listener, not held
    reader, writer = await asyncio.open_connection("127.0.0.1", router.bound_port)
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()


async def test_metrics_and_readyz(make_replicas: MakeReplicas, make_router: MakeRouter) -> None:
    first, second = await make_replicas(2)
    router = await make_router([first, second])
    first.drain()
    await router.poll_once()
    async with aiohttp.ClientSession() as s:
        async with s.get(url(router, "/metrics")) as resp:
            text = await resp.text()
        async with s.get(url(router, "/readyz")) as resp:
            assert resp.status == 200
    assert f'spotstart_route_replica_ready{{replica="{first.address}"}} 0.0' in text
    assert f'spotstart_route_replica_ready{{replica="{second.address}"}} 1.0' in text
    assert "spotstart_route_time_to_continue_seconds_bucket" in text


def test_prefix_affinity_prefers_the_replica_that_served_it_while_not_much_busier() -> None:
    rs = ReplicaSet(affinity_slack=2)
    rs.set_addresses([("10.0.0.1", 1), ("10.0.0.2", 1)])
    a, b = rs.replicas.values()
    rs.mark(a, True)
    rs.mark(b, True)
    key = b"k" * 16
    b.outstanding = 0
    a.outstanding = 1
    assert rs.choose(key) is b  # least outstanding, then remembered
    b.outstanding = 3
    assert rs.choose(key) is b  # 3 <= 1 + 2: the prefix's replica
    b.outstanding = 4
    assert rs.choose(key) is a  # much busier: least outstanding wins and is remembered
    assert rs.choose(key, exclude={a.address}) is b


def test_parse_replicas() -> None:
    assert parse_replicas("a:1,[::1]:2").addresses == (("a", 1), ("::1", 2))
    src = parse_replicas("dns:guards.ns.svc:8080")
    assert (src.dns_name, src.dns_port) == ("guards.ns.svc", 8080)
    for bad in ("a", "a:0", "a:x", "dns:x", "http://a:1", "a@b:1", ""):
        with pytest.raises(ValueError):
            parse_replicas(bad)


async def test_dns_set_is_re_resolved_and_a_failed_lookup_keeps_it() -> None:
    rs = ReplicaSet()
    answers: list[list[tuple[str, int]] | OSError] = [
        [("10.0.0.1", 80), ("10.0.0.2", 80)],
        OSError("no dns"),
        [("10.0.0.2", 80)],
    ]
    seen = asyncio.Event()

    async def resolver(name: str, port: int) -> list[tuple[str, int]]:
        answer = answers.pop(0) if answers else [("10.0.0.2", 80)]
        if not answers:
            seen.set()
        if isinstance(answer, OSError):
            raise answer
        return answer

    task = asyncio.create_task(
        keep_resolving(rs, ReplicaSource(dns_name="x", dns_port=80), 0.001, resolver)
    )
    await asyncio.wait_for(seen.wait(), 5)
    await asyncio.sleep(0.01)
    task.cancel()
    assert sorted(rs.replicas) == ["10.0.0.2:80"]


async def test_large_answers_whole_and_a_cut_one_never_passed_as_whole(
    make_replicas: MakeReplicas, make_router: MakeRouter
) -> None:
    (replica,) = await make_replicas(1, pad_bytes=3 << 20)
    router = await make_router([replica])
    status, raw, _ = await post(router, "/v1/completions", BODY)
    assert status == 200
    assert len(json.loads(raw)["pad"]) == 3 << 20
    async with aiohttp.ClientSession() as s:
        async with s.get(url(router, "/big")) as resp:
            assert len(await resp.read()) == 3 << 20
        async with s.get(url(router, "/big?cut=1")) as resp:
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()


async def test_while_draining_readyz_is_503_and_connections_close_after_their_request(
    make_replicas: MakeReplicas, make_router: MakeRouter
) -> None:
    (replica,) = await make_replicas(1)
    router = await make_router([replica])
    router.draining = True
    async with aiohttp.ClientSession() as s:
        async with s.get(url(router, "/readyz")) as resp:
            assert resp.status == 503
        async with s.post(url(router, "/v1/completions"), json=BODY) as resp:
            assert resp.status == 200
            assert resp.headers.get("Connection", "").lower() == "close"
