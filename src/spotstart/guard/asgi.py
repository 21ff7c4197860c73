"""The guard's drain for Python servers, in-process: an ASGI middleware that answers a readiness
path, rejects new requests with 503 + Retry-After during a drain, counts in-flight requests and
lets the app ``await drain()``. Same DrainController as the proxy; no proxy, no subprocess.

Example::

    ctl = DrainController(DrainConfig(safety_margin_s=5), time.monotonic)
    app = DrainMiddleware(app, ctl)
    ...  # on a notice (a watcher, a SIGTERM handler):
    app.notify(notice)
    await app.drain()  # returns once in-flight requests are done or cut at the deadline
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Literal

from spotstart.guard.drain import Command, DrainController, NoticeDecision
from spotstart.guard.notice import PreemptionNotice

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class DrainMiddleware:
    """Wraps an ASGI app (FastAPI, Starlette, any) with the guard's drain behaviour."""

    def __init__(
        self, app: ASGIApp, controller: DrainController, readyz_path: str = "/readyz"
    ) -> None:
        self.app = app
        self.controller = controller
        self.readyz_path = readyz_path
        self._tasks: set[asyncio.Task[Any]] = set()
        self._cut: set[asyncio.Task[Any]] = set()
        self._changed = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)  # lifespan, websocket: untouched
            return
        if scope["path"] == self.readyz_path:
            ready = self.controller.ready
            await _respond(send, 200 if ready else 503, b"ready\n" if ready else b"draining\n")
            return
        if not self.controller.try_accept():
            retry = str(self.controller.retry_after_s).encode()
            await _respond(
                send, 503, b"draining\n", [(b"retry-after", retry), (b"connection", b"close")]
            )
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        outcome: Literal["ok", "failed", "cut"] = "failed"
        try:
            await self.app(scope, receive, send)
            outcome = "ok"
        except asyncio.CancelledError:
            if task in self._cut:
                outcome = "cut"
            raise
        finally:
            self._tasks.discard(task)
            self._cut.discard(task)
            self.controller.finish(outcome)
            self._changed.set()

    def notify(self, notice: PreemptionNotice) -> NoticeDecision:
        """Start (or tighten) a drain: readiness is false and new requests get 503 from now."""
        decision = self.controller.on_notice(notice)
        self._changed.set()
        return decision

    async def drain(self) -> None:
        """Wait until in-flight requests are done; cut those still running at the deadline."""
        while True:
            self._changed.clear()
            for command in self.controller.tick():
                if command is Command.CANCEL_IN_FLIGHT:
                    tasks = set(self._tasks)
                    self._cut |= tasks
                    for t in tasks:
                        t.cancel()
                    if tasks:
                        await asyncio.wait(tasks, timeout=1.0)
                elif command is Command.EXIT:
                    return
            wake = self.controller.next_wakeup()
            timeout = None if wake is None else max(0.0, wake - self.controller.now())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)


async def _respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    base = [(b"content-type", b"text/plain; charset=utf-8")]
    await send({"type": "http.response.start", "status": status, "headers": base + (headers or [])})
    await send({"type": "http.response.body", "body": body})
