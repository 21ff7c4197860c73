"""Shared pieces of the notice watchers: poll/backoff settings, rate-limited warnings, endpoint
resolution and running several pollers as one notice stream. Nothing cloud-specific here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp

from spotstart.guard.notice import NoticeWatcher, PreemptionNotice

Clock = Callable[[], float]
Emit = Callable[[PreemptionNotice], None]
Poller = Callable[[Emit], Coroutine[Any, Any, None]]
Cloud = Literal["gce", "aws", "azure"]

_logger = logging.getLogger("spotstart.guard.watchers")


# Documented defaults; 169.254.169.254 is link-local and only answers on the cloud's own VMs.
DEFAULT_METADATA_URLS: dict[Cloud, str] = {
    "gce": "http://metadata.google.internal",
    "aws": "http://169.254.169.254",
    "azure": "http://169.254.169.254",
}


class MalformedMetadata(ValueError):
    """A metadata answer we cannot read; never turned into a notice."""


# What a metadata request may fail with that says nothing about preemption: keep watching.
WATCH_ERRORS = (aiohttp.ClientError, TimeoutError, OSError, MalformedMetadata)


@dataclass(frozen=True)
class PollConfig:
    """How a watcher polls and backs off. Failures (errors, 5xx, garbage, timeouts) wait
    ``backoff_initial_s`` doubling to ``backoff_max_s``; warnings repeat at most once per
    ``warn_interval_s`` (with a count of the ones suppressed)."""

    poll_interval_s: float = 1.0
    request_timeout_s: float = 2.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 10.0
    warn_interval_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("poll_interval_s", "request_timeout_s", "backoff_initial_s", "backoff_max_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PollConfig.{name} must be positive")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("PollConfig.backoff_max_s must be >= backoff_initial_s")


class Backoff:
    """Exponential backoff: ``next_delay()`` gives initial, 2x, 4x... up to the cap."""

    def __init__(self, initial_s: float, max_s: float) -> None:
        self._initial = initial_s
        self._max = max_s
        self._next = initial_s

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self._max, self._next * 2)
        return delay

    def reset(self) -> None:
        self._next = self._initial


class WarningLimiter:
    """Logs a failing watcher's warnings at most once per interval, and once when it recovers."""

    def __init__(self, logger: logging.Logger, clock: Clock, interval_s: float) -> None:
        self._logger = logger
        self._clock = clock
        self._interval = interval_s
        self._last: float | None = None
        self._suppressed = 0
        self._failing = False

    def warn(self, message: str) -> None:
        now = self._clock()
        self._failing = True
        if self._last is not None and now - self._last < self._interval:
            self._suppressed += 1
            return
        suffix = f" ({self._suppressed} similar warnings suppressed)" if self._suppressed else ""
        self._logger.warning("%s; no notice assumed, still watching%s", message, suffix)
        self._last = now
        self._suppressed = 0

    def ok(self, what: str) -> None:
        if self._failing:
            self._logger.info("%s answers again", what)
            self._failing = False


def resolve_metadata_url(cloud: Cloud, metadata_url: str | None, environ: Mapping[str, str]) -> str:
    """The metadata base URL: ``metadata_url`` if given, else the SDK override
    (``GCE_METADATA_HOST`` = host:port, ``AWS_EC2_METADATA_SERVICE_ENDPOINT`` = URL; Azure's
    SDKs have none, so ``SPOTSTART_AZURE_METADATA_URL``), else the cloud's documented address.
    No trailing slash."""
    if metadata_url:
        return metadata_url.rstrip("/")
    if cloud == "gce" and environ.get("GCE_METADATA_HOST"):
        return "http://" + environ["GCE_METADATA_HOST"].rstrip("/")
    if cloud == "aws" and environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT"):
        return environ["AWS_EC2_METADATA_SERVICE_ENDPOINT"].rstrip("/")
    if cloud == "azure" and environ.get("SPOTSTART_AZURE_METADATA_URL"):
        return environ["SPOTSTART_AZURE_METADATA_URL"].rstrip("/")
    return DEFAULT_METADATA_URLS[cloud]


def client_session() -> aiohttp.ClientSession:
    # trust_env=False: metadata servers must be reached directly, never through HTTP(S)_PROXY.
    return aiohttp.ClientSession(trust_env=False, auto_decompress=False)


def timeout(seconds: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=seconds)


async def run_pollers(
    pollers: Sequence[Poller],
) -> AsyncGenerator[PreemptionNotice, None]:
    """Run ``pollers`` concurrently and yield what they emit, in arrival order. A poller that
    crashes (a bug: pollers handle I/O failures themselves) re-raises here. Closing the
    generator cancels them all."""
    queue: asyncio.Queue[PreemptionNotice | BaseException] = asyncio.Queue()
    tasks = [asyncio.create_task(poller(queue.put_nowait)) for poller in pollers]

    def on_done(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            queue.put_nowait(task.exception() or RuntimeError("poller failed"))

    for task in tasks:
        task.add_done_callback(on_done)
    try:
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def watch_all(
    watchers: Sequence[NoticeWatcher],
) -> AsyncGenerator[PreemptionNotice, None]:
    """All ``watchers`` as one stream, in arrival order: what the drain side iterates.

    A watcher that crashes (a bug; I/O failures never escape a watcher) is logged and dropped,
    the others keep watching. Closing the stream (``aclose()`` or cancelling the task that
    iterates it) closes every watcher, which restores signal handlers.

    Example::

        async for notice in watch_all(make_watchers(cloud, clock=clock)):
            controller.on_notice(notice)
    """

    def forwarder(watcher: NoticeWatcher) -> Poller:
        async def forward(emit: Emit) -> None:
            try:
                async for notice in watcher.watch():
                    emit(notice)
            except Exception:
                _logger.exception(
                    "notice watcher %r crashed; the others keep watching", watcher.name
                )

        return forward

    async with contextlib.aclosing(run_pollers([forwarder(w) for w in watchers])) as notices:
        async for notice in notices:
            yield notice
