"""The guard's drain comment read by the real router: `spotstart route` in front of two real
guard processes, each in front of a test replica speaking vLLM's SSE shape
(tests/route/replica.py). A notice to the guard serving a stream: the router continues the
stream on the other replica when the comment comes, before the guard's cut, and the client gets
one stream equal to an uninterrupted greedy run's."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from spotstart.listen import ListenLimits
from spotstart.route.replicas import ReplicaSource
from spotstart.route.server import Router, RouterConfig
from tests.guard.test_proxy import Proc, start_guard
from tests.route.replica import Replica, reference


@pytest.fixture
async def replicas() -> AsyncIterator[list[Replica]]:
    out = [Replica(token_delay_s=0.01), Replica(token_delay_s=0.01)]
    for r in out:
        await r.start()
    yield out
    for r in out:
        await r.stop()


async def ready(url: str, proc: Proc) -> None:
    """Poll the guard's /readyz without blocking the loop the replicas answer on."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s:
        for _ in range(750):
            try:
                async with s.get(url + "/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.02)
    raise AssertionError(f"{url} not ready\n{proc.text}")


def generations(replica: Replica) -> list[dict[str, str]]:
    """The headers of each generation request the replica got (not the guard's health polls)."""
    return [h for path, h, _ in replica.requests if path == "/v1/completions"]


def wait_exit(proc: Proc, timeout_s: float) -> int:
    code = proc.popen.wait(timeout=timeout_s)
    proc.close()
    return code


async def test_a_notice_mid_stream_is_continued_on_the_other_replica_before_the_guards_cut(
    replicas: list[Replica],
) -> None:
    guards = [
        start_guard(
            f"http://127.0.0.1:{r.port}",
            "--cloud",
            "none",
            "--health-interval",
            "0.05",
            "--termination-window",
            "60",
            "--safety-margin",
            "5",
            "--replica-id",
            f"replica-{i}",
        )
        for i, r in enumerate(replicas)
    ]
    router: Router | None = None
    try:
        for proc, url in guards:
            await ready(url, proc)
        router = Router(
            RouterConfig(
                source=ReplicaSource(
                    addresses=tuple(("127.0.0.1", int(url.rsplit(":", 1)[1])) for _, url in guards)
                ),
                listen_port=0,
                poll_interval_s=0.05,
                shutdown_delay_s=0.0,
                limits=ListenLimits(max_connections=64, request_bodies=True),
            )
        )
        await router.start()
        await router.poll_once()
        body = {"model": "m", "prompt": "The quick brown fox", "max_tokens": 400, "stream": True}
        raw = b""
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s,
            s.post(f"http://127.0.0.1:{router.bound_port}/v1/completions", json=body) as resp,
        ):
            assert resp.status == 200
            # the notice goes to the guard whose replica is generating, some tokens in
            while raw.count(b"data: ") < 30:
                chunk = await resp.content.readany()
                assert chunk, raw
                raw += chunk
            (first,) = [i for i, r in enumerate(replicas) if generations(r)]
            guards[first][0].popen.send_signal(signal.SIGTERM)
            raw += await resp.content.read()
        code = await asyncio.to_thread(wait_exit, guards[first][0], 30)
    finally:
        if router is not None:
            await router.close()
        for proc, _ in guards:
            proc.stop()
    events: list[Any] = []
    for block in raw.decode().split("\n\n"):
        data = [ln[6:] for ln in block.split("\n") if ln.startswith("data: ")]
        if data:
            payload = "\n".join(data)
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    assert events[-1] == "[DONE]"
    chunks = [e for e in events if isinstance(e, dict)]
    assert len({c["id"] for c in chunks}) == 1
    finishes = [c["finish_reason"] for e in chunks for c in e["choices"] if c.get("finish_reason")]
    assert finishes == ["length"]
    text, _ = reference("completions", body, 400)
    assert "".join(c["text"] for e in chunks for c in e["choices"]) == text
    assert b"spotstart-drain" not in raw  # the comment is the router's, not the client's
    # both replicas generated; neither saw the router's header (the guard strips it)
    second = 1 - first
    assert generations(replicas[second]), "the stream was not continued on the other replica"
    for r in replicas:
        for headers in generations(r):
            assert not any(k.lower() == "x-spotstart-continue" for k in headers), headers
    # the router left the first guard's stream on the comment: nothing had to be cut
    log = guards[first][0].text
    assert code == 0, log
    assert " 0 dropped" in log and " 0 aborted" in log, log
