"""The pure parts: the bounded SSE reader and the splice's bookkeeping."""

from __future__ import annotations

import json

import pytest

from spotstart.route.splice import LegOutcome, Splice, UpstreamViolation
from spotstart.route.sse import Comment, Event, SSEError, SSEReader


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
