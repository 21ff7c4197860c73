from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from spotstart.listen import ListenLimits
from spotstart.route.replicas import ReplicaSource
from spotstart.route.server import Router, RouterConfig
from tests.route.replica import Replica

MakeReplicas = Callable[..., Awaitable[list[Replica]]]
MakeRouter = Callable[..., Awaitable[Router]]


@pytest.fixture
async def make_replicas() -> AsyncIterator[MakeReplicas]:
    started: list[Replica] = []

    async def make(count: int = 2, **settings: Any) -> list[Replica]:
        out = []
        for _ in range(count):
            r = Replica(**settings)
            await r.start()
            started.append(r)
            out.append(r)
        return out

    yield make
    for r in started:
        await r.stop()


@pytest.fixture
async def make_router() -> AsyncIterator[MakeRouter]:
    started: list[Router] = []

    async def make(
        replicas: list[Replica], addresses: list[tuple[str, int]] | None = None, **settings: Any
    ) -> Router:
        if addresses is None:
            addresses = [("127.0.0.1", r.port) for r in replicas]
        config = RouterConfig(
            source=ReplicaSource(addresses=tuple(addresses)),
            listen_port=0,
            poll_interval_s=0.02,
            continue_timeout_s=settings.pop("continue_timeout_s", 2.0),
            backoff_s=0.001,
            shutdown_delay_s=0.0,
            limits=settings.pop("limits", ListenLimits(max_connections=64, request_bodies=True)),
            **settings,
        )
        router = Router(config)
        await router.start()
        await router.poll_once()
        started.append(router)
        return router

    yield make
    for router in started:
        await router.close()


def url(router: Router, path: str) -> str:
    return f"http://127.0.0.1:{router.bound_port}{path}"


async def sse(
    router: Router, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, list[Any], bytes]:
    """Status, the data payloads (JSON, or the string '[DONE]'), the raw body."""
    async with (
        aiohttp.ClientSession() as s,
        s.post(url(router, path), json=body, headers=headers or {}) as resp,
    ):
        raw = await resp.read()
        status = resp.status
    events: list[Any] = []
    for block in raw.decode().split("\n\n"):
        data = [ln[6:] for ln in block.split("\n") if ln.startswith("data: ")]
        if data:
            payload = "\n".join(data)
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return status, events, raw


def text_of(events: list[Any], kind: str = "completions") -> str:
    out = []
    for e in events:
        if isinstance(e, dict):
            for c in e.get("choices", []):
                out.append(c["text"] if kind == "completions" else c["delta"].get("content") or "")
    return "".join(out)


def metric(router: Router, name: str, labels: dict[str, str] | None = None) -> float:
    value = router.metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value
