"""A stand-in inference server for bench/guard: ``slots`` requests served at once (the batch),
each taking ``service_ms``; /sse streams ``n`` events ``gap`` s apart. Not a model: a shape."""

from __future__ import annotations

import argparse
import asyncio
import socket

from aiohttp import web


def build(slots: int, service_ms: float) -> web.Application:
    sem = asyncio.Semaphore(slots)

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def gen(_: web.Request) -> web.Response:
        async with sem:
            if service_ms > 0:
                await asyncio.sleep(service_ms / 1000)
            return web.json_response({"text": "x" * 256})

    async def sse(request: web.Request) -> web.StreamResponse:
        n, gap = int(request.query.get("n", "10")), float(request.query.get("gap", "0.05"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(n):
            await resp.write(f"data: token-{i}\n\n".encode())
            await asyncio.sleep(gap)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/gen", gen)
    app.router.add_get("/sse", sse)
    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--service-ms", type=float, default=20.0)
    a = p.parse_args()
    sock = socket.socket()
    sock.bind(("127.0.0.1", a.port))
    print(f"upstream listening on {sock.getsockname()[1]}", flush=True)
    web.run_app(build(a.slots, a.service_ms), sock=sock, print=None, access_log=None)


if __name__ == "__main__":
    main()
