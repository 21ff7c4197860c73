"""Shared pieces of the notice watchers: poll/backoff settings, rate-limited warnings, fault
counting, bounded reads of metadata answers, endpoint resolution and running several pollers as
one supervised notice stream. Nothing cloud-specific here.

A metadata answer is a claim from whatever answered on the link-local address (the cloud's
server, or a captive portal, a misrouted proxy, a broken sidecar): it is read to at most
:data:`MAX_BODY_BYTES`, its content type and grammar are checked, and anything else is a
*fault*: counted, warned about once per interval, retried with backoff, and never read as
"preempted" nor as "not preempted for good"."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
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


# Every metadata answer a watcher reads is a few hundred bytes (an Azure document listing a
# scale set's events a few KiB): 64 KiB is far above any genuine answer and bounds what a
# misbehaving server can make the guard hold.
MAX_BODY_BYTES = 64 * 1024


class MalformedMetadata(ValueError):
    """A metadata answer we cannot read; never turned into a notice."""


# What a metadata request may fail with that says nothing about preemption: keep watching.
WATCH_ERRORS = (aiohttp.ClientError, TimeoutError, OSError, MalformedMetadata)


@dataclass
class Faults:
    """A watcher's faults (failed or malformed metadata answers) by endpoint: what a metric or a
    test reads. ``total`` only grows; ``last`` is the latest fault's one-line description."""

    total: int = 0
    by_endpoint: Counter[str] = field(default_factory=Counter)
    crashes: int = 0  # unexpected exceptions of the watcher's own code (bugs), each restarted
    last: str = ""

    def record(self, endpoint: str, description: str) -> None:
        self.total += 1
        self.by_endpoint[endpoint] += 1
        self.last = description


async def read_body(
    resp: aiohttp.ClientResponse,
    what: str,
    *,
    content_types: frozenset[str] | None = None,
    require_content_type: bool = False,
    limit: int = MAX_BODY_BYTES,
) -> bytes:
    """The body of ``resp``, read to at most ``limit`` bytes. MalformedMetadata for a longer
    answer (declared or sent), or a ``Content-Type`` outside ``content_types`` (compared on the
    media type, lower case; a missing header is a fault only if ``require_content_type``).
    The header checks come first, so a refused answer is never read at all."""
    if content_types is not None:
        raw = resp.headers.get("Content-Type")
        if raw is None:
            if require_content_type:
                raise MalformedMetadata(f"{what}: answer without a Content-Type")
        elif raw.split(";", 1)[0].strip().lower() not in content_types:
            raise MalformedMetadata(f"{what}: unexpected Content-Type {raw[:60]!r}")
    declared = resp.content_length
    if declared is not None and declared > limit:
        raise MalformedMetadata(f"{what}: answer of {declared} bytes, over the {limit}-byte bound")
    body = bytearray()
    while len(body) <= limit:
        chunk = await resp.content.read(limit + 1 - len(body))
        if not chunk:
            break
        body += chunk
    if len(body) > limit:
        raise MalformedMetadata(f"{what}: answer longer than the {limit}-byte bound")
    return bytes(body)


def json_document(body: bytes, what: str) -> dict[str, object]:
    """``body`` as a JSON object: strict UTF-8 (json.loads would also take UTF-16/32), no
    NaN/Infinity, and nesting too deep for the parser is a fault, not a crash."""
    try:
        text = body.decode("utf-8")
        data = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise MalformedMetadata(f"{what}: not a UTF-8 JSON document") from exc
    if not isinstance(data, dict):
        raise MalformedMetadata(f"{what}: not a JSON object")
    return data


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


@dataclass(frozen=True)
class PollConfig:
    """How a watcher polls and backs off. Failures (errors, 5xx, garbage, timeouts) wait
    ``backoff_initial_s`` doubling to ``backoff_max_s``; warnings repeat at most once per
    ``warn_interval_s`` (with a count of the ones suppressed).

    Memory: each poller holds at most one answer, read to at most ``MAX_BODY_BYTES`` (64 KiB):
    GCE runs 2 pollers, AWS and Azure 1, so a watcher holds at most 2 x 64 KiB of answers
    whatever the server sends."""

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
    """Logs a failing watcher's warnings at most once per interval, and once when it recovers.
    Given ``faults``, every warning is also counted there (under ``endpoint``)."""

    def __init__(
        self,
        logger: logging.Logger,
        clock: Clock,
        interval_s: float,
        *,
        faults: Faults | None = None,
        endpoint: str = "",
    ) -> None:
        self._logger = logger
        self._clock = clock
        self._interval = interval_s
        self._faults = faults
        self._endpoint = endpoint
        self._last: float | None = None
        self._suppressed = 0
        self._failing = False

    def warn(self, message: str) -> None:
        now = self._clock()
        self._failing = True
        if self._faults is not None:
            self._faults.record(self._endpoint, message)
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


class CrashLimiter:
    """Logs a crashed poller's traceback at most once per interval (a poller that crashes on
    every poll must not flood the log), with a count of the crashes not logged."""

    def __init__(self, what: str, clock: Clock, interval_s: float) -> None:
        self._what = what
        self._clock = clock
        self._interval = interval_s
        self._last: float | None = None
        self._suppressed = 0

    def crashed(self, exc: BaseException | None, delay_s: float) -> None:
        now = self._clock()
        if self._last is not None and now - self._last < self._interval:
            self._suppressed += 1
            return
        suffix = f" ({self._suppressed} more since the last report)" if self._suppressed else ""
        how = "crashed (a bug)" if exc is not None else "stopped (a bug)"
        _logger.error(
            "%s %s; restarted in %.1f s, no notice assumed%s",
            self._what,
            how,
            delay_s,
            suffix,
            exc_info=(type(exc), exc, exc.__traceback__) if exc is not None else None,
        )
        self._last = now
        self._suppressed = 0


async def supervise(
    run: Callable[[], Coroutine[Any, Any, None]],
    what: str,
    *,
    poll: PollConfig | None = None,
    clock: Clock = time.monotonic,
    faults: Faults | None = None,
) -> None:
    """Run ``run()`` for ever: if it raises (anything but cancellation) or returns, log it
    (traceback, once per interval), count it in ``faults.crashes``, wait with backoff and start
    it again. A watcher that died silently would be a missed preemption."""
    settings = poll or PollConfig()
    backoff = Backoff(settings.backoff_initial_s, settings.backoff_max_s)
    crashes = CrashLimiter(what, clock, settings.warn_interval_s)
    while True:
        error: Exception | None = None
        try:
            await run()
        except Exception as exc:
            error = exc
        if faults is not None:
            faults.crashes += 1
        delay = backoff.next_delay()
        crashes.crashed(error, delay)
        await asyncio.sleep(delay)


async def run_pollers(
    pollers: Sequence[Poller],
    *,
    what: str = "notice poller",
    poll: PollConfig | None = None,
    clock: Clock = time.monotonic,
    faults: Faults | None = None,
    names: Sequence[str] | None = None,
) -> AsyncGenerator[PreemptionNotice, None]:
    """Run ``pollers`` concurrently and yield what they emit, in arrival order. A poller that
    crashes (a bug: pollers handle I/O failures themselves) is logged (as ``what``, followed by
    its entry in ``names`` if given) and restarted with backoff (:func:`supervise`). Closing
    the generator cancels them all."""
    queue: asyncio.Queue[PreemptionNotice] = asyncio.Queue()
    labels = [f"{what} {name!r}" for name in names] if names else [what] * len(pollers)

    def supervised(poller: Poller, label: str) -> Coroutine[Any, Any, None]:
        return supervise(
            lambda: poller(queue.put_nowait), label, poll=poll, clock=clock, faults=faults
        )

    tasks = [
        asyncio.create_task(supervised(poller, label))
        for poller, label in zip(pollers, labels, strict=True)
    ]
    try:
        while True:
            yield await queue.get()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def watch_all(
    watchers: Sequence[NoticeWatcher],
) -> AsyncGenerator[PreemptionNotice, None]:
    """All ``watchers`` as one stream, in arrival order: what the drain side iterates.

    A watcher that crashes or ends (a bug; I/O failures never escape a watcher) is logged and
    started again with backoff while the others keep watching. Closing the stream (``aclose()``
    or cancelling the task that iterates it) closes every watcher, which restores signal
    handlers.

    Example::

        async for notice in watch_all(make_watchers(cloud, clock=clock)):
            controller.on_notice(notice)
    """

    def forwarder(watcher: NoticeWatcher) -> Poller:
        async def forward(emit: Emit) -> None:
            async for notice in watcher.watch():
                emit(notice)

        return forward

    pollers = [forwarder(w) for w in watchers]
    names = [w.name for w in watchers]
    async with contextlib.aclosing(
        run_pollers(pollers, what="notice watcher", names=names)
    ) as notices:
        async for notice in notices:
            yield notice
