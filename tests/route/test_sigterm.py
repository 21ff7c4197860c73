"""`spotstart route` as a real process: on SIGTERM /readyz turns 503, a stream in flight
finishes whole, then the process exits 0; a second router beside it serves the same replicas."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess

import aiohttp

from tests.conftest import spawn_cli
from tests.route.conftest import MakeReplicas
from tests.route.replica import reference


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _wait_ready(port: int, proc: subprocess.Popen[str]) -> None:
    async with aiohttp.ClientSession() as s:
        for _ in range(600):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                async with s.get(f"http://127.0.0.1:{port}/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError("the router never became ready")


async def test_sigterm_drains_streams_then_exits(make_replicas: MakeReplicas) -> None:
    replicas = await make_replicas(2, token_delay_s=0.01)
    spec = ",".join(r.address for r in replicas)
    ports = [_free_port(), _free_port()]
    procs = [
        spawn_cli(
            [
                "route",
                "--listen",
                f"127.0.0.1:{p}",
                "--replicas",
                spec,
                "--poll-interval",
                "0.05",
                "--shutdown-delay",
                "0.5",
            ]
        )
        for p in ports
    ]
    try:
        for port, proc in zip(ports, procs, strict=True):
            await _wait_ready(port, proc)
        body = {"model": "m", "prompt": "drain me", "max_tokens": 150, "stream": True}
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{ports[0]}/v1/completions", json=body) as resp:
                first = await resp.content.readuntil(b"\n\n")
                procs[0].send_signal(signal.SIGTERM)
                for _ in range(200):
                    async with s.get(f"http://127.0.0.1:{ports[0]}/readyz") as ready:
                        if ready.status == 503:
                            break
                    await asyncio.sleep(0.01)
                else:
                    raise AssertionError("/readyz stayed 200 after SIGTERM")
                rest = await resp.read()
            # the other router serves the same replicas meanwhile
            async with s.post(f"http://127.0.0.1:{ports[1]}/v1/completions", json=body) as other:
                assert other.status == 200
                other_raw = await other.read()
        text = ""
        for block in (first + rest).decode().split("\n\n"):
            if block.startswith("data: {"):
                text += json.loads(block[6:])["choices"][0]["text"]
        assert text == reference("completions", body, 150)[0]
        assert (first + rest).endswith(b"data: [DONE]\n\n")
        assert other_raw.endswith(b"data: [DONE]\n\n")
        _, err = await asyncio.to_thread(procs[0].communicate, None, 60)
        assert procs[0].returncode == 0, err
        assert re.search(r"signal: draining", err)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=30)
