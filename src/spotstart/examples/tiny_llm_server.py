"""A tiny Llama-shaped inference server for `spotstart demo`: a real HTTP server that loads
its weights with `spotstart.load` (from object storage, a peer, or its cache) and computes
greedy next tokens with them. No tokenizer: prompts and answers are token ids.

    python examples/tiny_llm_server.py --model gs://bkt/llm/ --port 8000 [--cache-dir DIR]
        [--peers HOST:PORT,...] [--compile]

``--compile``: the forward pass goes through ``torch.compile`` (inductor, C++ on the CPU) with
dynamic shapes, compiled by the warm-up before /health answers 200: a compile phase whose
artifacts land in ``TORCHINDUCTOR_CACHE_DIR`` (and inductor's precompiled headers in
``$TMPDIR/torchinductor_<user>``), so a later start with those directories kept is warm.
The answers are the same greedy tokens as without it.

    GET  /health    200 once the weights are loaded (503 before)
    POST /generate  {"tokens": [1, 2, 3], "max_tokens": 4, "stream": false}
                    -> {"tokens": [...]}; with "stream": true, server-sent events
                    data: {"token": 17} ... data: [DONE]

The model (see ``make_checkpoint``): embed_tokens, N decoder layers (RMSNorm, multi-head
causal self-attention q/k/v/o, RMSNorm, SwiGLU gate/up/down), final norm, lm_head; the
tensor names and shapes of a Hugging Face Llama checkpoint, in BF16, computed in FP32."""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import torch
from aiohttp import web

HEAD_DIM = 64


def config_of(hidden: int, intermediate: int, layers: int, vocab: int) -> dict[str, int]:
    return {
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "vocab_size": vocab,
        "num_attention_heads": hidden // HEAD_DIM,
    }


def make_checkpoint(
    out: Path,
    hidden: int = 768,
    intermediate: int = 2048,
    layers: int = 8,
    vocab: int = 32000,
    shards: int = 2,
    seed: int = 0,
) -> int:
    """Write a Llama-shaped checkpoint (config.json, sharded safetensors + index); returns
    the tensor bytes."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    scale = hidden**-0.5

    def w(*shape: int) -> torch.Tensor:
        t: torch.Tensor = (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16)
        return t

    tensors: dict[str, torch.Tensor] = {"model.embed_tokens.weight": w(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        for proj in ("q", "k", "v", "o"):
            tensors[p + f"self_attn.{proj}_proj.weight"] = w(hidden, hidden)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        tensors[p + "mlp.gate_proj.weight"] = w(intermediate, hidden)
        tensors[p + "mlp.up_proj.weight"] = w(intermediate, hidden)
        tensors[p + "mlp.down_proj.weight"] = w(hidden, intermediate)
    tensors["model.norm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    tensors["lm_head.weight"] = w(vocab, hidden)
    out.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    per = -(-len(names) // shards)
    weight_map = {}
    for s in range(shards):
        part = names[s * per : (s + 1) * per]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, out / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    (out / "config.json").write_text(
        json.dumps({"model_type": "llama", **config_of(hidden, intermediate, layers, vocab)})
    )
    return total


class TinyLlama:
    def __init__(self, w: dict[str, torch.Tensor], compile: bool = False) -> None:
        self.w = w
        self.layers = 1 + max(int(k.split(".")[2]) for k in w if k.startswith("model.layers."))
        self.heads = w["model.embed_tokens.weight"].shape[1] // HEAD_DIM
        self._forward: Any = self.forward
        if compile:
            self._forward = torch.compile(self.forward, backend="inductor", dynamic=True)

    @staticmethod
    def _rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight

    @torch.inference_mode()
    def next_token(self, tokens: list[int]) -> int:
        return int(torch.argmax(self._forward(torch.tensor(tokens))))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """The last position's logits."""
        w = self.w
        x = w["model.embed_tokens.weight"][ids]
        n = x.shape[0]
        mask = torch.full((n, n), float("-inf")).triu(1)
        for i in range(self.layers):
            p = f"model.layers.{i}."
            h = self._rms(x, w[p + "input_layernorm.weight"])
            q, k, v = (
                (h @ w[p + f"self_attn.{m}_proj.weight"].T)
                .view(n, self.heads, HEAD_DIM)
                .transpose(0, 1)
                for m in "qkv"
            )
            att = torch.softmax(q @ k.transpose(1, 2) / HEAD_DIM**0.5 + mask, dim=-1)
            o = (att @ v).transpose(0, 1).reshape(n, -1)
            x = x + o @ w[p + "self_attn.o_proj.weight"].T
            h = self._rms(x, w[p + "post_attention_layernorm.weight"])
            gate = torch.nn.functional.silu(h @ w[p + "mlp.gate_proj.weight"].T)
            x = x + (gate * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
        last = self._rms(x[-1], w["model.norm.weight"])
        logits: torch.Tensor = last @ w["lm_head.weight"].T
        return logits


class Server:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.model: TinyLlama | None = None
        self.failed: str | None = None
        self.lock = asyncio.Lock()  # one forward at a time: the CPU is the accelerator here

    def load(self) -> None:
        import spotstart
        from spotstart import events
        from spotstart.fetch.peers import PeerSpec

        try:
            config = spotstart.FetchConfig(
                peers=PeerSpec.parse(self.args.peers) if self.args.peers else None
            )
            weights = spotstart.load(
                self.args.model, dtype=torch.float32, cache_dir=self.args.cache_dir, config=config
            )
            model = TinyLlama(weights, compile=self.args.compile)
            t0 = time.time()
            if self.args.compile:  # one token is a shape of its own for the compiler
                model.next_token([1])
            model.next_token([1, 2, 3])  # warm up: the first forward allocates (and compiles)
            detail = "first forward pass" + (" (torch.compile)" if self.args.compile else "")
            events.record("warmup", t0, time.time(), detail=detail)
            if self.args.compile:
                print(f"tiny-llm: torch.compile warm-up took {time.time() - t0:.2f} s", flush=True)
            self.model = model
            print(f"tiny-llm: {len(weights)} tensors loaded, serving", flush=True)
        except Exception as exc:
            self.failed = f"{type(exc).__name__}: {exc}"
            print(f"tiny-llm: loading failed: {self.failed}", flush=True)

    async def health(self, request: web.Request) -> web.Response:
        if self.model is not None:
            return web.Response(text="ok\n")
        return web.Response(
            status=500 if self.failed else 503, text=(self.failed or "loading") + "\n"
        )

    async def generate(self, request: web.Request) -> web.StreamResponse:
        if self.model is None:
            return web.Response(status=503, text="loading\n")
        body: dict[str, Any] = await request.json()
        tokens = [int(t) for t in body.get("tokens", [1])][:64] or [1]
        steps = max(1, min(int(body.get("max_tokens", 4)), 32))
        model = self.model
        if not body.get("stream"):
            out: list[int] = []
            for _ in range(steps):
                async with self.lock:
                    t = await asyncio.to_thread(model.next_token, tokens + out)
                out.append(t)
            return web.json_response({"tokens": out})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        out = []
        for _ in range(steps):
            async with self.lock:
                t = await asyncio.to_thread(model.next_token, tokens + out)
            out.append(t)
            await resp.write(f"data: {json.dumps({'token': t})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--cache-dir", type=Path)
    ap.add_argument("--peers")
    ap.add_argument("--compile", action="store_true", help="torch.compile the forward pass")
    args = ap.parse_args()
    torch.set_num_threads(1)
    server = Server(args)
    threading.Thread(target=server.load, daemon=True).start()
    app = web.Application()
    app.router.add_get("/health", server.health)
    app.router.add_post("/generate", server.generate)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, handle_signals=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
