"""The router in front of real `spotstart guard` processes (each in front of a test replica):
SIGTERM to the guard serving a stream makes it write its drain comment, and the router continues
the stream on the other guard's replica before the guard's deadline; the client's text is the
uninterrupted run's."""

from __future__ import annotations

import asyncio
import signal

from tests.guard.test_proxy import start_guard, wait_until_ready
from tests.route.conftest import MakeReplicas, MakeRouter, metric, sse
from tests.route.test_continue import assert_spliced


async def test_a_guard_s_drain_comment_moves_the_stream_to_the_other_replica(
    make_replicas: MakeReplicas, make_router: MakeRouter
) -> None:
    replicas = await make_replicas(2, token_delay_s=0.01, hold_back=True)
    guards = []
    try:
        for r in replicas:
            proc, url = await asyncio.to_thread(
                start_guard,
                f"http://{r.address}",
                "--cloud", "none", "--health-interval", "0.05",
                "--termination-window", "60", "--safety-margin", "5",
            )  # fmt: skip
            guards.append((proc, url))
            await asyncio.to_thread(wait_until_ready, url, 15.0, proc)
        addresses = [("127.0.0.1", int(u.rsplit(":", 1)[1])) for _, u in guards]
        router = await make_router([], addresses=addresses)
        assert len(router.replicas.ready()) == 2
        body = {"model": "m", "prompt": "guarded", "max_tokens": 300, "stream": True}

        async def notice_once_streaming() -> None:
            waits = [asyncio.create_task(r.streamed.wait()) for r in replicas]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
            serving = 0 if replicas[0].streamed.is_set() else 1
            guards[serving][0].popen.send_signal(signal.SIGTERM)

        notice = asyncio.create_task(notice_once_streaming())
        status, events, _ = await sse(router, "/v1/completions", body)
        await notice
        assert status == 200
        assert_spliced(events, "completions", 300, body)
        assert metric(router, "spotstart_route_continued_total") == 1
        assert metric(router, "spotstart_route_lost_total") == 0
        # both replicas generated: the continuation began before the guard's deadline (55 s)
        assert all(any(q[0] == "/v1/completions" for q in rep.requests) for rep in replicas)
    finally:
        for proc, _ in guards:
            proc.stop()
