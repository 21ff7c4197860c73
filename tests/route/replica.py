"""A test replica that speaks vLLM 0.32's OpenAI SSE shape (what its
``completion_stream_generator`` and ``chat_completion_stream_generator`` write, with
``exclude_unset``: ``prompt_token_ids`` on the first chunk, each token's ``token_ids``, the last
token's chunk carrying the finish_reason, a usage chunk with ``choices: []``, ``[DONE]``) over a
deterministic greedy "model": the next token is a function of the last three.

Its tokenizer round-trips generated text exactly (token k is `` t{k}``), so a text
continuation splices exactly too; a guard-like drain writes ``: spotstart-drain deadline_ms=N``
to streams sent with ``X-Spotstart-Continue: 1`` and cuts them at the deadline. Faults: cut the
connection, abort, end without a finish, hostile events, fixed status answers."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

BOS, END = 1, 1004
ROLES = {"system": 1001, "user": 1002, "assistant": 1003}
MAX_MODEL_LEN = 4096
MODEL = "tiny-greedy"


def tokenize(text: str) -> list[int]:
    out = []
    for piece in re.findall(r" ?[^ ]+| +", text):
        m = re.fullmatch(r" t(\d+)", piece)
        if m and 3 <= int(m.group(1)) < 1000:
            out.append(int(m.group(1)))
        else:
            out.append(2000 + zlib.crc32(piece.encode()) % 1000)
    return out


def detok(token: int) -> str:
    return f" t{token}"


def next_token(ids: list[int]) -> int:
    a = ids[-1] if ids else 0
    b = ids[-2] if len(ids) > 1 else 0
    c = ids[-3] if len(ids) > 2 else 0
    return 3 + (a * 31 + b * 17 + c * 7 + 5) % 997


def greedy(prompt_ids: list[int], n: int) -> list[int]:
    ids = list(prompt_ids)
    for _ in range(n):
        ids.append(next_token(ids))
    return ids[len(prompt_ids) :]


def chat_prompt(body: dict[str, Any]) -> list[int]:
    messages = body["messages"]
    cont = body.get("continue_final_message", False)
    gen = body.get("add_generation_prompt", True)
    ids = [BOS]
    for i, m in enumerate(messages):
        ids.append(ROLES[m["role"]])
        ids += tokenize(m["content"])
        if not (cont and i == len(messages) - 1):
            ids.append(END)
    if gen:
        ids.append(ROLES["assistant"])
    return ids


@dataclass
class Replica:
    token_delay_s: float = 0.001
    ready: bool = True
    draining: bool = False
    drain_deadline_ms: int = 200
    drain_after: int | None = None  # drain (like a notice) once a stream reached N tokens
    cut_after: int | None = None  # abort the connection after N tokens
    abort_after: int | None = None  # finish_reason "abort" after N tokens
    stall_after: int | None = None  # go silent after N tokens, the connection held open
    end_after: int | None = None  # end the body after N tokens: no finish, no [DONE]
    hostile: str | None = None  # "huge_event", "huge_line", "garbage", "not_sse"
    hostile_after: int = 3
    hold_back: bool = True  # tokens k % 10 == 0 come with an empty text (held-back bytes)
    status: int | None = None  # answer every generation with this status
    pad_bytes: int = 0  # non-streaming answers carry this much padding
    requests: list[tuple[str, dict[str, str], Any]] = field(default_factory=list)
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    streamed: asyncio.Event = field(default_factory=asyncio.Event)  # a stream sent tokens
    streamed_tokens: int = 0
    port: int = 0
    _deadline: float = 0.0
    _runner: web.AppRunner | None = None

    def drain(self) -> None:
        self.ready = False
        self.draining = True
        self._deadline = time.monotonic() + self.drain_deadline_ms / 1000
        self.drained.set()

    async def start(self, port: int = 0) -> None:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/big", self._big)
        app.router.add_route("*", "/{tail:.*}", self._other)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _readyz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok") if self.ready else web.Response(status=503, text="no")

    async def _big(self, request: web.Request) -> web.StreamResponse:
        """3 MiB in 64 KiB writes; with ?cut=1 the connection is aborted after 1 MiB."""
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await resp.prepare(request)
        for i in range(48):
            if request.query.get("cut") and i == 16:
                assert request.transport is not None
                request.transport.abort()
                return resp
            await resp.write(b"b" * (64 << 10))
        await resp.write_eof()
        return resp

    async def _other(self, request: web.Request) -> web.Response:
        body = await request.read()
        # raw_path: aiohttp's path_qs shows a target "//x" as "////x"
        self.requests.append((request.raw_path, dict(request.headers), body))
        return web.json_response({"path": request.path_qs, "method": request.method})

    def _refuse(self) -> web.Response | None:
        if self.draining:
            return web.Response(status=503, text="draining", headers={"Retry-After": "1"})
        if self.status is not None:
            return web.Response(status=self.status, text=f"status {self.status}")
        return None

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(("/v1/completions", dict(request.headers), body))
        refused = self._refuse()
        if refused is not None:
            return refused
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompt_ids = [BOS, *tokenize(prompt)]
        elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            prompt_ids = list(prompt)
        else:
            return _error(400, "prompt must be a string or token ids here")
        return await self._generate(request, body, "completions", prompt_ids)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(("/v1/chat/completions", dict(request.headers), body))
        refused = self._refuse()
        if refused is not None:
            return refused
        if body.get("continue_final_message") and body.get("add_generation_prompt", True):
            return _error(
                400, "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
            )
        if body.get("continue_final_message") and body["messages"][-1]["role"] != "assistant":
            return _error(400, "continue_final_message needs a final assistant message")
        return await self._generate(request, body, "chat", chat_prompt(body))

    async def _generate(
        self, request: web.Request, body: dict[str, Any], kind: str, prompt_ids: list[int]
    ) -> web.StreamResponse:
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
        if max_tokens is None:
            max_tokens = MAX_MODEL_LEN - len(prompt_ids)
        if max_tokens < 1 or len(prompt_ids) + max_tokens > MAX_MODEL_LEN:
            return _error(
                400,
                f"max_tokens {max_tokens} and prompt {len(prompt_ids)} tokens: "
                f"more than the model's {MAX_MODEL_LEN}",
            )
        n = body.get("n") or 1
        ids_wanted = body.get("return_token_ids") is True
        rid = ("cmpl-" if kind == "completions" else "chatcmpl-") + uuid.uuid4().hex
        created = int(time.time())
        obj = "text_completion" if kind == "completions" else "chat.completion.chunk"
        if not body.get("stream"):
            return self._whole(body, kind, prompt_ids, max_tokens, n, rid, created, ids_wanted)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        cont = request.headers.get("X-Spotstart-Continue") == "1"

        def event(choices: list[dict[str, Any]], **top: Any) -> bytes:
            doc = {"id": rid, "object": obj, "created": created, "model": MODEL, "choices": choices}
            doc.update(top)
            return f"data: {json.dumps(doc)}\n\n".encode()

        if kind == "chat":
            for i in range(n):
                await resp.write(
                    event(
                        [
                            {
                                "index": i,
                                "delta": {"role": "assistant", "content": ""},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ],
                        prompt_token_ids=prompt_ids if ids_wanted else None,
                    )
                )
        seqs = [list(prompt_ids) + ([i] if i else []) for i in range(n)]
        held = [""] * n
        commented = False
        transport = request.transport
        for gen in range(1, max_tokens + 1):
            await asyncio.sleep(self.token_delay_s)
            if self.draining:
                if cont and not commented:
                    await resp.write(
                        f": spotstart-drain deadline_ms={self.drain_deadline_ms}\n\n".encode()
                    )
                    commented = True
                if time.monotonic() >= self._deadline:
                    assert transport is not None
                    transport.abort()
                    return resp
            if self.cut_after is not None and gen > self.cut_after:
                assert transport is not None
                transport.abort()
                return resp
            if self.stall_after is not None and gen > self.stall_after:
                await asyncio.sleep(3600)  # silent, the connection held open
            if self.end_after is not None and gen > self.end_after:
                await resp.write_eof()
                return resp
            if self.abort_after is not None and gen > self.abort_after:
                await resp.write(event([_choice(kind, 0, "", "abort", None, None)]))
                await resp.write(b"data: [DONE]\n\n")
                return resp
            if self.hostile is not None and gen > self.hostile_after:
                await resp.write(_hostile(self.hostile))
                await resp.write_eof()
                return resp
            finish = "length" if gen == max_tokens else None
            for i in range(n):
                tok = next_token(seqs[i])
                seqs[i].append(tok)
                # like vLLM's detokenizer on a token that ends inside a UTF-8 character: this
                # chunk's text is empty, its text comes with the next token's
                text = held[i] + detok(tok)
                held[i] = ""
                if self.hold_back and tok % 10 == 0 and finish is None:
                    held[i], text = text, ""
                first_ids = (
                    prompt_ids if (kind == "completions" and gen == 1 and ids_wanted) else None
                )
                await resp.write(
                    event(
                        [
                            _choice(
                                kind,
                                i,
                                text,
                                finish,
                                [tok] if ids_wanted else None,
                                first_ids,
                            )
                        ]
                    )
                )
            self.streamed_tokens += 1
            if self.streamed_tokens >= 20:
                self.streamed.set()
            if self.drain_after is not None and gen == self.drain_after and not self.draining:
                self.drain()
        options = body.get("stream_options") or {}
        if options.get("include_usage"):
            usage = {
                "prompt_tokens": len(prompt_ids),
                "completion_tokens": max_tokens * n,
                "total_tokens": len(prompt_ids) + max_tokens * n,
            }
            await resp.write(event([], usage=usage))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    def _whole(
        self,
        body: dict[str, Any],
        kind: str,
        prompt_ids: list[int],
        max_tokens: int,
        n: int,
        rid: str,
        created: int,
        ids_wanted: bool,
    ) -> web.Response:
        toks = greedy(prompt_ids, max_tokens)
        finish = "length"
        if self.abort_after is not None:
            toks, finish = toks[: self.abort_after], "abort"
        text = "".join(detok(t) for t in toks)
        if kind == "completions":
            choice: dict[str, Any] = {"index": 0, "text": text, "finish_reason": finish}
            obj = "text_completion"
        else:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
            }
            obj = "chat.completion"
        usage = {
            "prompt_tokens": len(prompt_ids),
            "completion_tokens": len(toks),
            "total_tokens": len(prompt_ids) + len(toks),
        }
        doc: dict[str, Any] = {
            "id": rid,
            "object": obj,
            "created": created,
            "model": MODEL,
            "choices": [choice],
            "usage": usage,
        }
        if self.pad_bytes:
            doc["pad"] = "p" * self.pad_bytes
        return web.json_response(doc)


def _choice(
    kind: str,
    index: int,
    text: str,
    finish: str | None,
    ids: list[int] | None,
    prompt_ids: list[int] | None,
) -> dict[str, Any]:
    if kind == "completions":
        return {
            "index": index,
            "text": text,
            "logprobs": None,
            "finish_reason": finish,
            "stop_reason": None,
            "prompt_token_ids": prompt_ids,
            "token_ids": ids,
        }
    delta = {"content": text} if text else {}
    out: dict[str, Any] = {
        "index": index,
        "delta": delta,
        "logprobs": None,
        "finish_reason": finish,
        "token_ids": ids,
    }
    if finish is not None:
        out["stop_reason"] = None
    return out


def _hostile(kind: str) -> bytes:
    if kind == "huge_event":  # many lines, each under the line bound, one event over its bound
        return b"".join(b"data: " + b"x" * 60000 + b"\n" for _ in range(100)) + b"\n"
    if kind == "huge_line":
        return b"data: " + b"y" * (3 << 20) + b"\n\n"
    if kind == "garbage":
        return b"data: {not json\n\n"
    if kind == "wrong_index":
        return b'data: {"choices": [{"index": 7, "text": "zzz"}]}\n\n'
    raise ValueError(kind)


def _error(status: int, message: str) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": "BadRequestError", "code": status}}, status=status
    )


def reference(kind: str, body: dict[str, Any], max_tokens: int) -> tuple[str, list[int]]:
    """What an uninterrupted greedy run generates: its text and token ids."""
    prompt_ids = [BOS, *tokenize(body["prompt"])] if kind == "completions" else chat_prompt(body)
    toks = greedy(prompt_ids, max_tokens)
    return "".join(detok(t) for t in toks), toks
