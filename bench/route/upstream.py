"""A stand-in for vLLM's /v1/completions in bench/route: the same SSE and JSON shapes as vLLM 0.32
(``return_token_ids``: the first chunk's ``prompt_token_ids``, each chunk's ``token_ids``; a
prompt as a string or a list of ids; ``ignore_eos``; ``stream_options.include_usage``), a
deterministic greedy "model" (the next id is a function of the last three ids, so a continuation
from prompt + generated ids gives exactly the uninterrupted tokens), ``--tps`` tokens per second
per request (0: as fast as it can) and a prefill cost per prompt token. SIGTERM does what vLLM's
does by default: every request in flight ends with ``finish_reason: "abort"`` (a stream then
``[DONE]``; a whole answer a 200 with what it had), then the process exits. Not a model: a shape
that restarts in a second where vLLM takes a minute on these cores."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import time
import uuid
from typing import Any

from aiohttp import web

VOCAB = 1000


def next_id(ctx: list[int]) -> int:
    a, b, c = [0, 0, 0, *ctx][-3:]
    return (a * 7 + b * 31 + c * 131 + len(ctx)) % VOCAB + 1


def word(i: int) -> str:
    return f" w{i}"


def prompt_ids(prompt: Any) -> list[int]:
    if isinstance(prompt, list):
        return [int(x) for x in prompt]
    return [b % VOCAB + 1 for b in str(prompt).encode()]


def build(tps: float, prefill_us: float) -> tuple[web.Application, asyncio.Event]:
    stopping = asyncio.Event()

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        ids = prompt_ids(body.get("prompt", ""))
        n = int(body.get("max_tokens") or 16)
        with_ids = body.get("return_token_ids") is True
        rid = f"cmpl-{uuid.uuid4().hex[:16]}"
        created = int(time.time())
        await asyncio.sleep(len(ids) * prefill_us / 1e6)
        gap = 1.0 / tps if tps > 0 else 0.0
        ctx = list(ids)
        usage_opt = (body.get("stream_options") or {}).get("include_usage") is True

        def chunk(tok: int | None, finish: str | None, first: bool) -> bytes:
            choice: dict[str, Any] = {
                "index": 0,
                "text": word(tok) if tok is not None else "",
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": None,
            }
            if with_ids:
                choice["prompt_token_ids"] = ids if first else None
                choice["token_ids"] = [tok] if tok is not None else []
            doc = {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": body.get("model"),
                "choices": [choice],
            }
            return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"

        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            sent = 0
            finish = "length"
            while sent < n:
                if stopping.is_set():
                    finish = "abort"
                    await resp.write(chunk(None, "abort", sent == 0))
                    break
                tok = next_id(ctx)
                ctx.append(tok)
                sent += 1
                await resp.write(chunk(tok, "length" if sent == n else None, sent == 1))
                await asyncio.sleep(gap)
            if usage_opt and finish == "length":
                doc = {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "model": body.get("model"),
                    "choices": [],
                    "usage": {
                        "prompt_tokens": len(ids),
                        "completion_tokens": sent,
                        "total_tokens": len(ids) + sent,
                    },
                }
                await resp.write(b"data: " + json.dumps(doc).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        toks: list[int] = []
        finish = "length"
        while len(toks) < n:
            if stopping.is_set():
                finish = "abort"
                break
            tok = next_id(ctx)
            ctx.append(tok)
            toks.append(tok)
            await asyncio.sleep(gap)
        choice = {"index": 0, "text": "".join(word(t) for t in toks), "finish_reason": finish}
        if with_ids:
            choice["token_ids"] = toks
            choice["prompt_token_ids"] = ids
        return web.json_response(
            {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": body.get("model"),
                "choices": [choice],
                "usage": {
                    "prompt_tokens": len(ids),
                    "completion_tokens": len(toks),
                    "total_tokens": len(ids) + len(toks),
                },
            }
        )

    app = web.Application(client_max_size=64 << 20)
    app.router.add_get("/health", health)
    app.router.add_post("/v1/completions", completions)
    return app, stopping


async def serve(port: int, tps: float, prefill_us: float) -> None:
    app, stopping = build(tps, prefill_us)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    site = web.SockSite(runner, sock)
    await site.start()
    print(f"upstream listening on {sock.getsockname()[1]}", flush=True)
    done = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, done.set)
    await done.wait()
    stopping.set()  # vLLM's default: abort what is in flight
    await asyncio.sleep(0.3)
    await runner.cleanup()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--tps", type=float, default=40.0, help="tokens/s per request (0: unpaced)")
    p.add_argument("--prefill-us", type=float, default=20.0, help="per prompt token")
    a = p.parse_args()
    asyncio.run(serve(a.port, a.tps, a.prefill_us))


if __name__ == "__main__":
    main()
