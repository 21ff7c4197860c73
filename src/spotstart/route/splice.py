"""The pure core of continuation: what an OpenAI-compatible stream has generated so far, the
request that continues it on another replica, and the chunks the client sees (one id, one
index, one final ``finish_reason``, one usage). No sockets: the server feeds it parsed events.

Exact splices need token ids: vLLM returns them with ``return_token_ids: true`` (the
completion's ``prompt_token_ids`` and each chunk's ``token_ids``) and takes a prompt as a list
of ids on ``/v1/completions``. Chat takes no token ids as input in vLLM 0.32: a chat stream with
token ids is continued on ``/v1/completions`` (the chat's templated prompt ids + the generated
ids) and its chunks turned back into chat chunks; without ids, as text (the partial assistant
message, ``continue_final_message``), which re-tokenizes and is not exact (see router.md).

A chunk whose text is empty while it carries token ids holds bytes of an incomplete UTF-8
character (vLLM sends them with a later token's text): the splice is made at the last token
whose text was sent, the held ids are dropped and generated again."""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

__all__ = [
    "Kind",
    "LegOutcome",
    "NotContinuable",
    "Splice",
    "UpstreamViolation",
    "error_event",
    "kind_of",
]

Kind = Literal["completions", "chat"]


def kind_of(path: str) -> Kind | None:
    """The continuable endpoint a request path names, or None."""
    if path == "/v1/completions":
        return "completions"
    if path == "/v1/chat/completions":
        return "chat"
    return None


class UpstreamViolation(ValueError):
    """An upstream chunk that is not what an OpenAI-compatible server sends (the replica is
    broken or hostile): the leg is treated as cut."""


class NotContinuable(ValueError):
    """What was generated cannot be continued elsewhere (n > 1, tool calls, a list of prompts,
    more text than the router keeps)."""


class LegOutcome(Enum):
    MORE = "more"  # keep reading this upstream
    FINISHED = "finished"  # a finish_reason other than abort was passed on
    CUT = "cut"  # finish_reason abort: continue elsewhere


_STRUCTURED = (
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
)
# Chat request fields /v1/completions takes alike (vLLM sampling parameters), and those that
# only shape the templated prompt (already rendered in the prompt ids). A chat request with any
# other field set is continued as text.
_CHAT_TO_COMPLETIONS = frozenset(
    {
        "model", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
        "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias",
        "ignore_eos", "min_tokens", "skip_special_tokens", "spaces_between_special_tokens",
        "include_stop_str_in_output", "bad_words", "allowed_token_ids", "length_penalty",
        "user", "priority", "stream", "stream_options", "return_token_ids", "max_tokens",
        "max_completion_tokens", "n", "best_of",
    }
)  # fmt: skip
_CHAT_PROMPT_ONLY = frozenset(
    {
        "messages", "add_generation_prompt", "continue_final_message", "chat_template",
        "chat_template_kwargs", "documents", "add_special_tokens", "echo", "logprobs",
        "parallel_tool_calls", "tool_choice",
    }
)  # fmt: skip


MAX_HELD_IDS = 1024  # ids held back without text (vLLM: the few of one split UTF-8 character)
_PART_COST = 56  # bytes Python spends on a kept str besides its text, and its list slot
_ID_COST = 36  # a kept token id: an int object and its list slot


def _int_list(value: Any) -> list[int] | None:
    if isinstance(value, list) and all(type(v) is int and v >= 0 for v in value):
        return value
    return None


def _positive_int(value: Any) -> int | None:
    return value if type(value) is int and value > 0 else None


@dataclass
class _Meta:
    id: Any
    created: Any
    model: Any


class Splice:
    """One client request's stream across one or more upstream legs.

    Memory: the generated text once and its token ids, bounded together by ``max_kept_bytes``
    (counted with what Python spends on them: a string object per chunk, an int per id); past
    it the stream is passed on but no longer continuable, and what was kept is let go. Ids
    held back without text (a split UTF-8 character, a few at most) are bounded by
    ``MAX_HELD_IDS``: more is an upstream violation.
    """

    def __init__(
        self,
        kind: Kind,
        body: dict[str, Any],
        *,
        token_ids_upstream: bool,
        max_kept_bytes: int = 8 << 20,
    ) -> None:
        self.kind = kind
        self.body = body
        self.max_kept_bytes = max_kept_bytes
        self.client_wants_ids = body.get("return_token_ids") is True
        self.token_ids_upstream = token_ids_upstream or self.client_wants_ids
        options = body.get("stream_options")
        self.client_wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        self.why_not_continuable: str | None = self._static_obstacle()
        # several choices (or prompts): passed on as sent, rerun only while nothing was sent
        self.passthrough = self.why_not_continuable is not None
        self.meta: _Meta | None = None
        self.text_parts: list[str] = []
        self.text_bytes = 0  # what is kept: the text's bytes plus the objects that hold it
        self.keeping = True  # False past max_kept_bytes: nothing more is kept
        self.gen_ids: list[int] | None = [] if self.token_ids_upstream else None
        self.pending_ids: list[int] = []  # ids whose text the engine still holds back
        self.pending_chunks = 0  # the same without ids: chunks with an empty text
        self.sent_any = False  # an event reached the client
        self.role_sent = False  # chat: the role chunk reached the client
        self.leg_original = True  # the current leg is the original request (nothing generated)
        self.prompt_ids: list[int] | None = None
        self.prompt_ids_sent = False
        self.leg_kind: Kind = kind  # the endpoint of the current leg
        self.leg_path = "/v1/completions" if kind == "completions" else "/v1/chat/completions"
        self.tokens_sent = 0  # generated tokens passed to the client, all legs
        self.leg = -1
        self.leg_base_tokens = 0  # tokens sent before the current leg
        self.leg_prompt_tokens: int | None = None  # the current leg's usage.prompt_tokens
        self.first_prompt_tokens: int | None = None
        self.finish_reason: str | None = None
        self.extra_prefill_tokens = 0

    # -- what may be continued ------------------------------------------------------------------

    def _static_obstacle(self) -> str | None:
        body = self.body
        if body.get("n") not in (None, 1) or body.get("best_of") not in (None, 1):
            return "n > 1 or best_of > 1 (several choices are not continued)"
        for key in ("max_tokens", "max_completion_tokens", "min_tokens"):
            # the engine may take "30" or 30.0 as 30 (pydantic, lax): a limit the router
            # cannot reduce is never continued (the continuation would ask for all of it again)
            if body.get(key) is not None and type(body.get(key)) is not int:
                return f"a {key} that is not an integer"
        if body.get("use_beam_search") is True:
            return "beam search"
        if body.get("echo") is True:
            return "echo (the prompt comes back as generated text)"
        fmt = body.get("response_format")
        if (isinstance(fmt, dict) and fmt.get("type") not in (None, "text")) or any(
            body.get(k) for k in _STRUCTURED
        ):
            return "structured output (its grammar would start again mid-answer)"
        if self.kind == "completions":
            prompt = body.get("prompt")
            if not (isinstance(prompt, str) or _int_list(prompt) is not None):
                return "the prompt is not one string or one list of token ids"
            if body.get("suffix") is not None:
                return "a suffix"
        else:
            if not isinstance(body.get("messages"), list):
                return "no messages"
            if body.get("tools"):
                return "tools (a partial tool call is not continued)"
        return None

    @property
    def continuable(self) -> bool:
        return self.why_not_continuable is None

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    # -- upstream requests -------------------------------------------------------------------------

    def start_leg(self) -> dict[str, Any]:
        """The body for the next upstream leg: the original on the first (or while nothing was
        generated), else the continuation. Call only while :attr:`continuable` or on leg 0."""
        self.leg += 1
        self.pending_ids = []  # held-back ids are generated again
        self.pending_chunks = 0
        self.leg_base_tokens = self.tokens_sent
        self.leg_prompt_tokens = None
        self.leg_kind = self.kind
        # a leg sets top-level fields only (a copied messages list): no deep copy (a 13 MiB
        # request's held the event loop for a second, every leg)
        body = dict(self.body)
        body["stream"] = True
        if self.token_ids_upstream:
            body["return_token_ids"] = True
        self.leg_original = self.tokens_sent == 0 and not self.text_parts
        if self.leg_original:
            self.leg_path = (
                "/v1/completions" if self.kind == "completions" else "/v1/chat/completions"
            )
            return body
        for key in ("max_tokens", "max_completion_tokens"):
            limit = _positive_int(body.get(key))
            if limit is not None:
                body[key] = limit - self.tokens_sent
        min_tokens = _positive_int(body.get("min_tokens"))
        if min_tokens is not None:
            body["min_tokens"] = max(0, min_tokens - self.tokens_sent)
        exact = self.prompt_ids is not None and self.gen_ids is not None
        if self.kind == "completions":
            body["echo"] = False
            if exact:
                assert self.prompt_ids is not None and self.gen_ids is not None
                body["prompt"] = self.prompt_ids + self.gen_ids
            else:
                prompt = self.body["prompt"]
                if not isinstance(prompt, str):
                    raise NotContinuable("a token-id prompt without the generated token ids")
                body["prompt"] = prompt + self.text
        elif exact and self._chat_as_completions():
            assert self.prompt_ids is not None and self.gen_ids is not None
            out = {k: v for k, v in body.items() if k in _CHAT_TO_COMPLETIONS}
            limit = out.pop("max_completion_tokens", None)
            if limit is not None:
                out["max_tokens"] = min(limit, out.get("max_tokens", limit))
            out["prompt"] = self.prompt_ids + self.gen_ids
            self.leg_kind = "completions"
            self.leg_path = "/v1/completions"
            self.extra_prefill_tokens += self.tokens_sent
            return out
        else:
            messages = list(body["messages"])
            last = messages[-1] if messages else None
            if (
                self.body.get("continue_final_message") is True
                and isinstance(last, dict)
                and last.get("role") == "assistant"
                and isinstance(last.get("content"), str)
            ):
                messages[-1] = {**last, "content": last["content"] + self.text}
            else:
                messages.append({"role": "assistant", "content": self.text})
            body["messages"] = messages
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
            body["echo"] = False
        self.leg_path = "/v1/completions" if self.kind == "completions" else "/v1/chat/completions"
        self.extra_prefill_tokens += self.tokens_sent
        return body

    def _chat_as_completions(self) -> bool:
        return not any(
            value not in (None, False, [], {})
            for key, value in self.body.items()
            if key not in _CHAT_TO_COMPLETIONS and key not in _CHAT_PROMPT_ONLY
        ) and self.body.get("logprobs") in (None, False)

    def remaining_tokens(self) -> int | None:
        """Tokens still allowed by the request's limit, None without a limit."""
        limits = [
            v
            for v in (
                _positive_int(self.body.get(k)) for k in ("max_tokens", "max_completion_tokens")
            )
            if v is not None
        ]
        return min(limits) - self.tokens_sent if limits else None

    # -- upstream chunks ---------------------------------------------------------------------

    def absorb(self, data: str) -> tuple[bytes, LegOutcome]:
        """One upstream ``data:`` payload (not ``[DONE]``): the bytes to send the client (maybe
        none) and what the leg does next. Raises UpstreamViolation for what no engine sends."""
        try:
            chunk = json.loads(data)
        except ValueError as exc:
            raise UpstreamViolation("a data line that is not JSON") from exc
        if not isinstance(chunk, dict):
            raise UpstreamViolation("a chunk that is not an object")
        if "error" in chunk and "choices" not in chunk:
            raise UpstreamViolation(f"an error event: {str(chunk.get('error'))[:200]}")
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            raise UpstreamViolation("a chunk without choices")
        if self.meta is None:
            self.meta = _Meta(chunk.get("id"), chunk.get("created"), chunk.get("model"))
        usage = chunk.get("usage")
        if isinstance(usage, dict) and type(usage.get("prompt_tokens")) is int:
            self.leg_prompt_tokens = usage["prompt_tokens"]
            if self.leg_original and self.first_prompt_tokens is None:
                self.first_prompt_tokens = usage["prompt_tokens"]
        if self.passthrough:
            return self._pass_through(chunk)
        if not choices:
            return b"", LegOutcome.MORE  # the usage chunk: one of ours is sent at the end
        if len(choices) != 1 or not isinstance(choices[0], dict) or choices[0].get("index") != 0:
            raise UpstreamViolation("a chunk with other than one choice of index 0")
        choice: dict[str, Any] = choices[0]
        text, tool_or_reasoning = self._choice_text(choice)
        ids = _int_list(choice.get("token_ids")) if self.token_ids_upstream else None
        if self.token_ids_upstream and choice.get("token_ids") is not None and ids is None:
            raise UpstreamViolation("token_ids that are not a list of ids")
        if self.leg_original and self.prompt_ids is None:
            where = choice if self.kind == "completions" else chunk
            self.prompt_ids = _int_list(where.get("prompt_token_ids"))
            if self.prompt_ids is not None and self.first_prompt_tokens is None:
                self.first_prompt_tokens = len(self.prompt_ids)
        if tool_or_reasoning:
            self.why_not_continuable = "a tool call or reasoning in the answer"
        finish = choice.get("finish_reason")
        if finish is not None and not isinstance(finish, str):
            raise UpstreamViolation("a finish_reason that is not a string")
        # the generated part; ids whose chunk has no text are held back until text comes
        if text:
            if self.keeping:
                self.text_parts.append(text)
            self.text_bytes += len(text.encode("utf-8", "surrogatepass")) + _PART_COST
        self.text_bytes += _ID_COST * len(ids or ())
        if self.text_bytes > self.max_kept_bytes and self.keeping:
            self.keeping = False
            self.text_parts = []
            if self.gen_ids is not None:
                self.gen_ids = []
            if self.why_not_continuable is None:
                self.why_not_continuable = f"more than {self.max_kept_bytes} bytes generated"
        client_ids: list[int] | None = None
        if ids is not None and self.gen_ids is not None:
            if text or (finish is not None and finish != "abort"):
                client_ids = self.pending_ids + ids
                self.pending_ids = []
                if self.keeping:
                    self.gen_ids.extend(client_ids)
                self.tokens_sent += len(client_ids)
            else:
                if len(self.pending_ids) + len(ids) > MAX_HELD_IDS:
                    raise UpstreamViolation(f"more than {MAX_HELD_IDS} ids without text")
                self.pending_ids.extend(ids)
        elif self.gen_ids is not None and text:
            # an engine that said it returns ids and sent a chunk without them: no exact splice
            self.gen_ids = None
            self.tokens_sent += len(self.pending_ids) + 1
            self.pending_ids = []
        elif self.gen_ids is None and not self._is_role_chunk(choice, text, ids):
            # no ids: one token a chunk (what vLLM and TGI send; an estimate elsewhere), the
            # chunks without text counted when text follows
            if text or (finish is not None and finish != "abort"):
                self.tokens_sent += self.pending_chunks + 1
                self.pending_chunks = 0
            elif finish is None:
                self.pending_chunks += 1
        outcome = LegOutcome.MORE
        if finish == "abort":
            finish = None
            choice["finish_reason"] = None
            choice.pop("stop_reason", None)
            outcome = LegOutcome.CUT
        elif finish is not None:
            self.finish_reason = finish
            outcome = LegOutcome.FINISHED
        if self.role_sent and self._is_role_chunk(choice, text, ids):
            return b"", outcome
        if (
            not text
            and finish is None
            and not tool_or_reasoning
            and not self._is_role_chunk(choice, text, ids)
        ):
            return b"", outcome  # held back (or nothing to say)
        if self.leg_kind != self.kind:
            chunk, choice = self._as_chat(chunk, choice, text)
        return self._client_bytes(chunk, choice, client_ids), outcome

    def _as_chat(
        self, chunk: dict[str, Any], choice: dict[str, Any], text: str
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """A /v1/completions chunk of a chat continued by token ids, as a chat chunk."""
        out: dict[str, Any] = {
            "index": 0,
            "delta": {"content": text} if text else {},
            "logprobs": None,
            "finish_reason": choice.get("finish_reason"),
        }
        if choice.get("finish_reason") is not None:
            out["stop_reason"] = choice.get("stop_reason")
        new = {k: v for k, v in chunk.items() if k not in ("choices", "object")}
        new["object"] = "chat.completion.chunk"
        new["choices"] = [out]
        return new, out

    def _choice_text(self, choice: dict[str, Any]) -> tuple[str, bool]:
        if self.leg_kind == "completions":
            text = choice.get("text")
            if text is None:
                return "", False
            if not isinstance(text, str):
                raise UpstreamViolation("a text that is not a string")
            return text, False
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            raise UpstreamViolation("a chat chunk without a delta")
        content = delta.get("content")
        if content is not None and not isinstance(content, str):
            raise UpstreamViolation("a delta content that is not a string")
        extra = bool(
            delta.get("tool_calls") or delta.get("reasoning_content") or delta.get("reasoning")
        )
        return content or "", extra

    def _is_role_chunk(self, choice: dict[str, Any], text: str, ids: list[int] | None) -> bool:
        if self.kind != "chat":
            return False
        delta = choice.get("delta")
        return (
            isinstance(delta, dict)
            and "role" in delta
            and not text
            and not ids
            and choice.get("finish_reason") is None
        )

    def _client_bytes(
        self, chunk: dict[str, Any], choice: dict[str, Any], client_ids: list[int] | None
    ) -> bytes:
        assert self.meta is not None
        chunk["id"], chunk["created"], chunk["model"] = (
            self.meta.id,
            self.meta.created,
            self.meta.model,
        )
        chunk.pop("prompt_token_ids", None)
        choice.pop("prompt_token_ids", None)
        choice.pop("token_ids", None)
        if self.client_wants_ids:
            if not self.prompt_ids_sent and self.prompt_ids is not None:
                where = choice if self.kind == "completions" else chunk
                where["prompt_token_ids"] = self.prompt_ids
                self.prompt_ids_sent = True
            if client_ids is not None:
                choice["token_ids"] = client_ids
            elif self.kind == "completions" or "role" not in choice.get("delta", {}):
                choice["token_ids"] = None
        delta = choice.get("delta")
        if self.kind == "chat" and isinstance(delta, dict) and "role" in delta:
            if self.role_sent:
                delta.pop("role")
            self.role_sent = True
        usage = chunk.get("usage")
        if isinstance(usage, dict) and not self.leg_original:
            chunk["usage"] = self.usage()
        self.sent_any = True
        return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"

    def _pass_through(self, chunk: dict[str, Any]) -> tuple[bytes, LegOutcome]:
        """A request that is not continued (n > 1...): chunks as the upstream sent them, less
        the token ids the router asked for."""
        choices = chunk["choices"]
        finished = True
        for choice in choices:
            if isinstance(choice, dict):
                if not self.client_wants_ids:
                    choice.pop("token_ids", None)
                    choice.pop("prompt_token_ids", None)
                if choice.get("finish_reason") == "abort":
                    finished = False
        if not self.client_wants_ids:
            chunk.pop("prompt_token_ids", None)
        self.sent_any = True
        data = b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"
        return data, LegOutcome.MORE if finished else LegOutcome.CUT

    # -- the end -----------------------------------------------------------------------------

    def usage(self) -> dict[str, int]:
        """One usage for the whole request: the original prompt, every leg's completion."""
        prompt = self.first_prompt_tokens
        if prompt is None:
            prompt = (self.leg_prompt_tokens or 0) - self.leg_base_tokens
        prompt = max(0, prompt)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": self.tokens_sent,
            "total_tokens": prompt + self.tokens_sent,
        }

    def closing_bytes(self) -> bytes:
        """After the final chunk: the usage chunk when the client asked for it, then [DONE]."""
        out = b""
        if self.client_wants_usage and self.meta is not None and not self.passthrough:
            chunk = {
                "id": self.meta.id,
                "object": "text_completion"
                if self.kind == "completions"
                else "chat.completion.chunk",
                "created": self.meta.created,
                "model": self.meta.model,
                "choices": [],
                "usage": self.usage(),
            }
            out += b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"
        return out + b"data: [DONE]\n\n"

    def length_final_bytes(self) -> bytes:
        """The final chunk when the limit was reached exactly as a leg was cut."""
        self.finish_reason = "length"
        choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
        if self.kind == "completions":
            choice["text"] = ""
        else:
            choice["delta"] = {}
        chunk = {"choices": [choice]}
        return self._client_bytes(chunk, choice, [] if self.gen_ids is not None else None)


def error_event(message: str) -> bytes:
    """The SSE event that tells a client its stream was lost, then [DONE]."""
    doc = {"error": {"message": message, "type": "spotstart_route_lost", "code": 502}}
    return b"data: " + json.dumps(doc).encode() + b"\n\ndata: [DONE]\n\n"
