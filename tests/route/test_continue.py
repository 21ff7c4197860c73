"""Streams cut on one replica (the guard's drain comment, a lost connection, finish_reason
abort, an end without [DONE]) are continued on another and spliced: the client's text and
token ids equal an uninterrupted greedy run's, under one id, with one finish and [DONE]."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from tests.route.conftest import MakeReplicas, MakeRouter, metric, sse, text_of, url
from tests.route.replica import BOS, chat_prompt, reference, tokenize

PROMPT = "The quick brown fox"


def assert_spliced(events: list[Any], kind: str, max_tokens: int, body: dict[str, Any]) -> None:
    assert events[-1] == "[DONE]"
    chunks = [e for e in events if isinstance(e, dict)]
    assert all("error" not in c for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert len({c["created"] for c in chunks}) == 1
    assert {c["model"] for c in chunks} == {"tiny-greedy"}
    finishes = [
        ch["finish_reason"] for c in chunks for ch in c["choices"] if ch.get("finish_reason")
    ]
    assert finishes == ["length"]
    assert all(ch["index"] == 0 for c in chunks for ch in c["choices"])
    text, _ = reference(kind, body, max_tokens)
    assert text_of(events, kind) == text


@pytest.mark.parametrize(
    "fault", ["drain", "cut", "abort", "end", "huge_event", "huge_line", "garbage", "wrong_index"]
)
async def test_completion_continued_exactly(
    make_replicas: MakeReplicas, make_router: MakeRouter, fault: str
) -> None:
    first, second = await make_replicas(2)
    first.drain_deadline_ms = 60_000  # the comment, not the cut, moves it
    setting = {
        "drain": "drain_after",
        "cut": "cut_after",
        "abort": "abort_after",
        "end": "end_after",
    }.get(fault)
    if setting is not None:
        setattr(first, setting, 37)
    else:
        first.hostile, first.hostile_after = fault, 37
    router = await make_router([first, second])
    body = {"model": "m", "prompt": PROMPT, "max_tokens": 120, "stream": True}
    status, events, _ = await sse(router, "/v1/completions", body)
    assert status == 200
    assert_spliced(events, "completions", 120, body)
    # no token ids reach a client that did not ask for them
    assert all(
        "token_ids" not in ch and "prompt_token_ids" not in ch
        for e in events
        if isinstance(e, dict)
        for ch in e["choices"]
    )
    # the first leg asked for token ids; the continuation is the exact token splice
    ((_, h1, b1),) = [r for r in first.requests if r[0] == "/v1/completions"]
    assert h1["X-Spotstart-Continue"] == "1" and b1["return_token_ids"] is True
    ((_, _, b2),) = [r for r in second.requests if r[0] == "/v1/completions"]
    _, ref_ids = reference("completions", body, 120)
    sent = len(b2["prompt"]) - 1 - len(tokenize(PROMPT))
    assert b2["prompt"] == [BOS, *tokenize(PROMPT), *ref_ids[:sent]]
    assert b2["max_tokens"] == 120 - sent and sent >= 37
    assert metric(router, "spotstart_route_continued_total") == 1
    assert metric(router, "spotstart_route_extra_prefill_tokens_total") == sent
    assert metric(router, "spotstart_route_lost_total") == 0
    assert metric(router, "spotstart_route_time_to_continue_seconds_count") == 1


async def test_token_ids_and_usage_for_the_whole_request(
    make_replicas: MakeReplicas, make_router: MakeRouter
) -> None:
    first, second = await make_replicas(2)
    first.cut_after = 50
    router = await make_router([first, second])
    body = {
        "model": "m",
        "prompt": PROMPT,
        "max_tokens": 90,
        "stream": True,
        "return_token_ids": True,
        "stream_options": {"include_usage": True},
    }
    _, events, _ = await sse(router, "/v1/completions", body)
    assert_spliced(events, "completions", 90, body)
    chunks = [e for e in events if isinstance(e, dict)]
    ids = [t for c in chunks for ch in c["choices"] for t in (ch.get("token_ids") or [])]
    assert ids == reference("completions", body, 90)[1]
    prompts = [
        ch["prompt_token_ids"] for c in chunks for ch in c["choices"] if ch.get("prompt_token_ids")
    ]
    assert prompts == [[BOS, *tokenize(PROMPT)]]
    usages = [c["usage"] for c in chunks if c.get("usage")]
    n_prompt = 1 + len(tokenize(PROMPT))
    assert usages == [
        {"prompt_tokens": n_prompt, "completion_tokens": 90, "total_tokens": n_prompt + 90}
    ]
    assert chunks[-1]["choices"] == []


CHAT = {
    "model": "m",
    "stream": True,
    "max_completion_tokens": 80,
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "count for me"},
    ],
}


async def test_chat_with_token_ids_is_continued_exactly_through_completions(
    make_replicas: MakeReplicas, make_router: MakeRouter
) -> None:
    """vLLM's chat takes no token ids: the continuation goes to /v1/completions with the chat's
    templated prompt ids + the generated ids, and its chunks come back as chat chunks."""
    first, second = await make_replicas(2)
    first.drain_after = 25
    first.drain_deadline_ms = 60_000
    router = await make_router([first, second])
    body = {**CHAT, "return_token_ids": True}
    _, events, _ = await sse(router, "/v1/chat/completions", body)
    assert_spliced(events, "chat", 80, body)
    chunks = [e for e in events if isinstance(e, dict)]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    roles = [ch["delta"]["role"] for c in chunks for ch in c["choices"] if "role" in ch["delta"]]
    assert roles == ["assistant"]
    ids = [t for c in chunks for ch in c["choices"] for t in (ch.get("token_ids") or [])]
    _ref_text, ref_ids = reference("chat", body, 80)
    assert ids == ref_ids
    assert [c["prompt_token_ids"] for c in chunks if c.get("prompt_token_ids")] == [
        chat_prompt(body)
    ]
    assert not [r for r in second.requests if r[0] == "/v1/chat/completions"]
    ((_, _, b2),) = [r for r in second.requests if r[0] == "/v1/completions"]
    sent = len(b2["prompt"]) - len(chat_prompt(body))
    assert b2["prompt"] == chat_prompt(body) + ref_ids[:sent]
    assert b2["max_tokens"] == 80 - sent and "messages" not in b2


@pytest.mark.parametrize("why", ["openai engine", "logprobs"])
async def test_chat_continued_as_the_partial_assistant_message(
    make_replicas: MakeReplicas, make_router: MakeRouter, why: str
) -> None:
    """Without token ids (or with a field /v1/completions does not take alike), the messages plus
    the partial assistant message with continue_final_message. Exact here because this
    tokenizer re-tokenizes generated text the same; real ones may not (router.md)."""
    first, second = await make_replicas(2, hold_back=False)
    first.drain_after = 25
    first.drain_deadline_ms = 60_000
    router = await make_router([first, second], token_ids=why != "openai engine")
    body = {**CHAT, "logprobs": True} if why == "logprobs" else dict(CHAT)
    _, events, _ = await sse(router, "/v1/chat/completions", body)
    assert_spliced(events, "chat", 80, body)
    roles = [
        ch["delta"]["role"]
        for e in events
        if isinstance(e, dict)
        for ch in e["choices"]
        if "role" in ch["delta"]
    ]
    assert roles == ["assistant"]
    ((_, _, b2),) = [r for r in second.requests if r[0] == "/v1/chat/completions"]
    assert b2["continue_final_message"] is True and b2["add_generation_prompt"] is False
    assert b2["messages"][:2] == body["messages"]
    partial = b2["messages"][2]
    assert partial["role"] == "assistant"
    full, _ = reference("chat", body, 80)
    assert full.startswith(partial["content"]) and partial["content"]
    assert b2["max_completion_tokens"] == 80 - len(tokenize(partial["content"]))


async def test_a_cut_after_held_back_bytes_splices_at_the_last_token_with_text(
    make_replicas: MakeReplicas, make_router: MakeRouter
) -> None:
    """A chunk with empty text and a token id holds bytes the engine sends later: cut right
    after it, the held id is not spliced (a continuation would never send its bytes) but
    generated again."""
    body = {"model": "m", "prompt": PROMPT, "max_tokens": 100, "stream": True,
            "return_token_ids": True}  # fmt: skip
    _, ref_ids = reference("completions", body, 100)
    k = next(i + 1 for i, t in enumerate(ref_ids[:-1]) if t % 10 == 0 and i > 2)
    first, second = await make_replicas(2)
    first.cut_after = k  # the k-th token is held back: its chunk's text is empty
    router = await make_router([first, second])
    _, events, _ = await sse(router, "/v1/completions", body)
    assert_spliced(events, "completions", 100, body)
    ids = [t for e in events if isinstance(e, dict) for ch in e["choices"]
           for t in (ch.get("token_ids") or [])]  # fmt: skip
    assert ids == ref_ids
    ((_, _, b2),) = [r for r in second.requests if r[0] == "/v1/completions"]
    assert b2["prompt"][-1] == ref_ids[k - 2]  # spliced before the held token
    assert b2["max_tokens"] == 100 - (k - 1)


async def test_text_continuation_without_token_ids(
    make_replicas: MakeReplicas, make_router: MakeRouter
) -> None:
    """--engine openai: the prompt text with the generated text appended (exact here because
    this tokenizer splits the splice the same way; see router.md for where real ones do not)."""
    first, second = await make_replicas(2)
    first.cut_after = 33
    router = await make_router([first, second], token_ids=False)
    body = {"model": "m", "prompt": PROMPT, "max_tokens": 70, "stream": True}
    _, events, _ = await sse(router, "/v1/completions", body)
    assert_spliced(events, "completions", 70, body)
    ((_, _, b1),) = [r for r in first.requests if r[0] == "/v1/completions"]
    assert "return_token_ids" not in b1
    ((_, _, b2),) = [r for r in second.requests if r[0] == "/v1/completions"]
    assert (
        b2["prompt"]
        == PROMPT + reference("completions", body, 70)[0][: len(b2["prompt"]) - len(PROMPT)]
    )
    assert b2["max_tokens"] == 70 - 33


async def test_several_cuts_in_a_row(make_replicas: MakeReplicas, make_router: MakeRouter) -> None:
    replicas = await make_replicas(3)
    replicas[0].cut_after = 10
    replicas[1].abort_after = 10
    router = await make_router(replicas)
    body = {"model": "m", "prompt": PROMPT, "max_tokens": 60, "stream": True}
    _, events, _ = await sse(router, "/v1/completions", body)
    assert_spliced(events, "completions", 60, body)
    assert metric(router, "spotstart_route_continued_total") == 2


async def test_a_lone_draining_replica_is_read_until_its_cut_then_the_next_ready_continues(
    make_replicas: MakeReplicas, make_router: MakeRouter
) -> None:
    """The drain comment with no other replica ready: the stream goes on from the draining one
    (it may finish), and after the cut waits (within --continue-timeout) for a ready one."""
    first, second = await make_replicas(2)
    second.ready = False
    first.drain_after, first.drain_deadline_ms = 20, 50
    first.token_delay_s = 0.002
    router = await make_router([first, second], continue_timeout_s=30)

    async def bring_up() -> None:
        await first.drained.wait()
        await asyncio.sleep(0.1)  # past the deadline: the cut comes first
        second.ready = True

    helper = asyncio.create_task(bring_up())
    body = {"model": "m", "prompt": PROMPT, "max_tokens": 200, "stream": True}
    _, events, _ = await sse(router, "/v1/completions", body)
    await helper
    assert_spliced(events, "completions", 200, body)
    ((_, _, b2),) = [r for r in second.requests if r[0] == "/v1/completions"]
    # more than the 20 tokens at the notice came from the draining replica
    assert len(b2["prompt"]) - 1 - len(tokenize(PROMPT)) > 20


async def test_a_refused_continuation_is_lost_with_its_reason(
    make_replicas: MakeReplicas, make_router: MakeRouter
) -> None:
    first, second = await make_replicas(2)
    first.cut_after = 5
    router = await make_router([first, second])
    second.status = 400
    body = {"model": "m", "prompt": PROMPT, "max_tokens": 30, "stream": True}
    _, events, _ = await sse(router, "/v1/completions", body)
    assert events[-1] == "[DONE]"
    assert "continuation refused: 400" in events[-2]["error"]["message"]
    assert metric(router, "spotstart_route_lost_total") == 1


async def test_a_client_that_leaves_frees_its_replica(
    make_replicas: MakeReplicas, make_router: MakeRouter
) -> None:
    (replica,) = await make_replicas(1, token_delay_s=0.01)
    router = await make_router([replica])
    body = {"model": "m", "prompt": PROMPT, "max_tokens": 3000, "stream": True}
    async with aiohttp.ClientSession() as s:
        resp = await s.post(url(router, "/v1/completions"), json=body)
        await resp.content.readuntil(b"\n\n")
        (held,) = router.replicas.replicas.values()
        assert held.outstanding == 1
        resp.close()
    for _ in range(500):
        if held.outstanding == 0:
            break
        await asyncio.sleep(0.01)
    assert held.outstanding == 0


async def test_a_silent_stream_is_cut_and_continued(
    make_replicas: MakeReplicas, make_router: MakeRouter
) -> None:
    first, second = await make_replicas(2)
    first.stall_after = 12
    router = await make_router([first, second], stream_idle_timeout_s=0.2)
    body = {"model": "m", "prompt": PROMPT, "max_tokens": 50, "stream": True}
    _, events, _ = await sse(router, "/v1/completions", body)
    assert_spliced(events, "completions", 50, body)
    assert metric(router, "spotstart_route_continued_total") == 1


async def test_a_lone_replica_that_cut_a_connection_but_is_ready_continues_it(
    make_replicas: MakeReplicas, make_router: MakeRouter
) -> None:
    (replica,) = await make_replicas(1)
    replica.cut_after = 30
    router = await make_router([replica], continue_timeout_s=60)
    body = {"model": "m", "prompt": PROMPT, "max_tokens": 80, "stream": True}
    _, events, _ = await sse(router, "/v1/completions", body)
    assert_spliced(events, "completions", 80, body)  # 30 + 30 + 20 tokens
    assert metric(router, "spotstart_route_continued_total") == 2
