"""The pure parts: the bounded SSE reader and the splice's bookkeeping."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spotstart.route.splice import LegOutcome, Splice, UpstreamViolation
from spotstart.route.sse import Comment, Event, SSEError, SSEReader
from tests.route.replica import BOS, chat_prompt, detok, greedy, tokenize


def test_events_split_anywhere_come_out_whole() -> None:
    raw = b'data: {"a": 1}\r\n\r\n: spotstart-drain deadline_ms=5\n\ndata: x\ndata: y\n\n'
    for cut in range(len(raw)):
        r = SSEReader()
        items = r.feed(raw[:cut]) + r.feed(raw[cut:])
        assert items == [Event('{"a": 1}'), Comment("spotstart-drain deadline_ms=5"), Event("x\ny")]
        assert r.between_events


def test_bounds() -> None:
    with pytest.raises(SSEError):
        SSEReader(max_line_bytes=10).feed(b"data: " + b"x" * 20)
    with pytest.raises(SSEError):
        SSEReader(max_line_bytes=10).feed(b"data: " + b"x" * 20 + b"\n")
    r = SSEReader(max_line_bytes=100, max_event_bytes=200)
    with pytest.raises(SSEError):
        for _ in range(5):
            r.feed(b"data: " + b"x" * 60 + b"\n")
    with pytest.raises(SSEError):
        SSEReader().feed(b"data: \xff\n\n")


def _chunk(text: str, ids: list[int] | None, finish: str | None = None, **extra: object) -> str:
    choice = {"index": 0, "text": text, "finish_reason": finish, "token_ids": ids, **extra}
    return json.dumps({"id": "cmpl-x", "created": 1, "model": "m", "choices": [choice]})


def test_splice_continuation_body_and_limits() -> None:
    s = Splice(
        "completions",
        {"prompt": "p", "max_tokens": 5, "min_tokens": 3, "stream": True},
        token_ids_upstream=True,
    )
    assert s.start_leg()["return_token_ids"] is True
    out, oc = s.absorb(_chunk(" a", [7], prompt_token_ids=[1, 2]))
    assert oc is LegOutcome.MORE and b"token_ids" not in out
    s.absorb(_chunk(" b", [8]))
    assert s.absorb(_chunk("", [], "abort"))[1] is LegOutcome.CUT
    body = s.start_leg()
    assert body["prompt"] == [1, 2, 7, 8]
    assert (body["max_tokens"], body["min_tokens"]) == (3, 1)
    assert s.remaining_tokens() == 3
    out, _ = s.absorb(_chunk(" c", [9]).replace("cmpl-x", "cmpl-other"))
    assert b"cmpl-x" in out and b"cmpl-other" not in out
    assert s.usage() == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


@pytest.mark.parametrize(
    "data",
    [
        "{",
        "[]",
        '{"choices": 3}',
        '{"error": {"message": "boom"}}',
        '{"choices": [{"index": 1, "text": "a"}]}',
        '{"choices": [{"index": 0, "text": 5}]}',
        '{"choices": [{"index": 0, "text": "a", "token_ids": ["x"]}]}',
    ],
)
def test_what_no_engine_sends_is_a_violation(data: str) -> None:
    s = Splice("completions", {"prompt": "p"}, token_ids_upstream=True)
    s.start_leg()
    with pytest.raises(UpstreamViolation):
        s.absorb(data)


def test_kept_text_is_bounded() -> None:
    s = Splice("completions", {"prompt": "p"}, token_ids_upstream=False, max_kept_bytes=10)
    s.start_leg()
    s.absorb(_chunk("x" * 11, None))
    assert not s.continuable


def test_a_reasoning_delta_reaches_the_client_and_ends_continuation() -> None:
    s = Splice("chat", {"messages": [{"role": "user", "content": "q"}]}, token_ids_upstream=True)
    s.start_leg()
    chunk = {"id": "c", "created": 1, "model": "m", "choices": [
        {"index": 0, "delta": {"reasoning_content": "hmm"}, "finish_reason": None,
         "token_ids": [5]}]}  # fmt: skip
    out, oc = s.absorb(json.dumps(chunk))
    assert b"hmm" in out and oc is LegOutcome.MORE
    assert not s.continuable


@settings(max_examples=200, deadline=None)
@given(
    cuts=st.lists(st.integers(min_value=0, max_value=40), min_size=0, max_size=4),
    held=st.sets(st.integers(min_value=0, max_value=59)),
    chat=st.booleans(),
)
def test_any_cuts_and_held_back_tokens_splice_to_the_uninterrupted_run(
    cuts: list[int], held: set[int], chat: bool
) -> None:
    """The pure core against the test replica's greedy model: legs cut after any number of
    chunks, tokens whose text is held back anywhere; the client's text and ids are the
    uninterrupted run's, and each continuation prompt is the exact splice."""
    total = 60
    if chat:
        body = {"messages": [{"role": "user", "content": "hi there"}], "max_tokens": total}
        prompt_ids = chat_prompt(body)
    else:
        body = {"prompt": "hi there", "max_tokens": total}
        prompt_ids = [BOS, *tokenize("hi there")]
    ref = greedy(prompt_ids, total)
    s = Splice("chat" if chat else "completions", {**body, "return_token_ids": True},
               token_ids_upstream=True)  # fmt: skip
    out: list[dict[str, Any]] = []
    legs = [*cuts, None]
    for cut in legs:
        leg_body = s.start_leg()
        if s.leg_original:
            leg_prompt = prompt_ids
        else:
            assert leg_body["prompt"][: len(prompt_ids)] == prompt_ids
            leg_prompt = leg_body["prompt"]
        limit = leg_body.get("max_tokens", total)
        toks = greedy(leg_prompt, limit)
        pending = ""
        chunks = []
        if s.leg_kind == "chat":
            role = {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "finish_reason": None,
            }
            chunks.append({"choices": [role], "prompt_token_ids": leg_prompt})
        for i, t in enumerate(toks):
            text = pending + detok(t)
            pending = ""
            last = i == len(toks) - 1
            if (len(leg_prompt) + i) % 60 in held and not last:
                pending, text = text, ""
            choice: dict[str, Any] = {"index": 0, "finish_reason": "length" if last else None,
                                      "token_ids": [t]}  # fmt: skip
            if s.leg_kind == "chat":
                choice["delta"] = {"content": text} if text else {}
            else:
                choice["text"] = text
                if i == 0:
                    choice["prompt_token_ids"] = leg_prompt
            chunks.append({"choices": [choice]})
        finished = False
        for n, chunk in enumerate(chunks):
            if cut is not None and n >= cut:
                break
            chunk.update(id=f"id{s.leg}", created=s.leg, model="m")
            data, outcome = s.absorb(json.dumps(chunk))
            if data:
                out.append(json.loads(data[6:]))
            finished = outcome is LegOutcome.FINISHED
        if finished:
            break
        if s.remaining_tokens() == 0:
            out.append(json.loads(s.length_final_bytes()[6:]))
            break
    key = "text" if not chat else None
    text = "".join(
        (ch["text"] if key else ch["delta"].get("content") or "")
        for c in out
        for ch in c["choices"]
    )
    ids = [t for c in out for ch in c["choices"] for t in (ch.get("token_ids") or [])]
    assert ids == ref
    assert text == "".join(detok(t) for t in ref)
    assert len({c["id"] for c in out}) == 1  # the first upstream that answered
    assert [ch["finish_reason"] for c in out for ch in c["choices"] if ch["finish_reason"]] == [
        "length"
    ]
