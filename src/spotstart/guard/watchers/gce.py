"""GCE/GKE preemption watcher: long-polls ``instance/preempted`` and ``instance/maintenance-event``
on the metadata server (``wait_for_change`` + ``last_etag``, so a change arrives at once without
tight polling). GCE gives 30 s between the notice and the stop, and 60 s before host maintenance.

Docs: https://cloud.google.com/compute/docs/metadata/querying-metadata#waitforchange,
https://cloud.google.com/compute/docs/instances/spot#detect-preemption,
https://cloud.google.com/compute/docs/metadata/getting-live-migration-notice

What is believed: an answer is a value only with status 200, ``Metadata-Flavor: Google``, a text
content type (GCE sends ``application/text``) if any, at most 64 KiB, and a value of the key's
grammar: ``preempted`` exactly ``TRUE`` or ``FALSE``, ``maintenance-event`` an upper-case
identifier (``NONE``, ``MIGRATE_ON_HOST_MAINTENANCE``...), each with at most one trailing
``\n`` (line framing; GCE sends none). Anything else (``TRUEX``, `` TRUE``, an HTML page) is a
fault: retried with backoff, counted in ``faults``, never a notice and never "no notice".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field

import aiohttp

from spotstart.guard.notice import NoticeKind, PreemptionNotice
from spotstart.guard.watchers._common import (
    WATCH_ERRORS,
    Backoff,
    Clock,
    Emit,
    Faults,
    MalformedMetadata,
    PollConfig,
    WarningLimiter,
    client_session,
    read_body,
    resolve_metadata_url,
    run_pollers,
    timeout,
)

logger = logging.getLogger("spotstart.guard.watchers.gce")

PREEMPTED = "preempted"
MAINTENANCE_EVENT = "maintenance-event"
_MAINTENANCE_VALUE = re.compile(r"[A-Z][A-Z_]{1,63}")
# GCE's ETags are 16 hex digits; whatever we accept is sent back as ``last_etag``.
_ETAG = re.compile(r"[A-Za-z0-9_-]{1,128}")
CONTENT_TYPES = frozenset({"application/text", "text/plain"})


@dataclass(frozen=True)
class GceWatcherConfig:
    """``preemption_window_s``: notice to stop (GCE documents 30 s); ``maintenance_window_s``:
    maintenance-event to the event (60 s). ``long_poll_timeout_s`` is sent as ``timeout_sec``."""

    metadata_url: str | None = None
    preemption_window_s: float = 30.0
    maintenance_window_s: float = 60.0
    long_poll_timeout_s: int = 20
    poll: PollConfig = field(default_factory=PollConfig)


def parse_value(key: str, body: bytes) -> str:
    """The metadata value of ``key``, checked; raise MalformedMetadata for anything else.
    ``preempted`` is exactly ``TRUE``/``FALSE``; one trailing newline is line framing, any
    other byte (spaces, ``TRUEX``, ``true``) makes the answer a fault."""
    try:
        value = body.decode("ascii")
    except UnicodeDecodeError as exc:
        raise MalformedMetadata(f"{key}: not ASCII text") from exc
    if value.endswith("\n"):
        value = value[:-1]
    if key == PREEMPTED and value in ("TRUE", "FALSE"):
        return value
    if key == MAINTENANCE_EVENT and _MAINTENANCE_VALUE.fullmatch(value):
        return value
    raise MalformedMetadata(f"{key}: unexpected value {value[:40]!r}")


def checked_etag(raw: str | None) -> str | None:
    """The ETag to long-poll on, or None (plain polling) when absent or not an ETag."""
    return raw if raw is not None and _ETAG.fullmatch(raw) else None


def notice_for(
    key: str, value: str, received_at: float, config: GceWatcherConfig
) -> PreemptionNotice | None:
    """Pure mapping of a (checked) metadata value to a notice, or None for "nothing pending".

    ``TERMINATE_ON_HOST_MAINTENANCE`` is a TERMINATION: the VM stops at the event, it is not
    moved. ``MIGRATE_ON_HOST_MAINTENANCE`` is a MIGRATION: the VM is live-migrated and keeps
    running (nothing to drain unless asked); any future value is a MAINTENANCE early signal.
    """
    detail = {"key": key, "value": value}
    if key == PREEMPTED:
        if value != "TRUE":
            return None
        deadline = received_at + config.preemption_window_s
        return PreemptionNotice(NoticeKind.PREEMPTION, "gce", received_at, deadline, detail)
    if value == "NONE":
        return None
    if value.startswith("TERMINATE"):
        kind = NoticeKind.TERMINATION
    elif value.startswith("MIGRATE"):
        kind = NoticeKind.MIGRATION
    else:
        kind = NoticeKind.MAINTENANCE
    deadline = received_at + config.maintenance_window_s
    return PreemptionNotice(kind, "gce", received_at, deadline, detail)


class GceWatcher:
    """Watches one GCE VM's metadata server; yields each notice once (again only after the value
    went back to its "nothing pending" state and changed again).

    Example::

        async for notice in GceWatcher(GceWatcherConfig()).watch():
            drain.begin(notice)
    """

    name = "gce"

    def __init__(
        self,
        config: GceWatcherConfig | None = None,
        *,
        clock: Clock = time.monotonic,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config or GceWatcherConfig()
        self._clock = clock
        env = os.environ if environ is None else environ
        self.base_url = resolve_metadata_url("gce", self.config.metadata_url, env)
        self.faults = Faults()
        # the last value seen per key: survives a restart of a crashed poller, so a notice
        # already reported is not reported again
        self._current = {PREEMPTED: "FALSE", MAINTENANCE_EVENT: "NONE"}

    async def watch(self) -> AsyncGenerator[PreemptionNotice, None]:
        async with client_session() as session:
            pollers = [
                lambda emit, key=key: self._follow(session, key, emit)
                for key in (PREEMPTED, MAINTENANCE_EVENT)
            ]
            notices_of = run_pollers(
                pollers,
                what="GCE watcher",
                names=[PREEMPTED, MAINTENANCE_EVENT],
                poll=self.config.poll,
                clock=self._clock,
                faults=self.faults,
            )
            async with contextlib.aclosing(notices_of) as notices:
                async for notice in notices:
                    yield notice

    async def _follow(self, session: aiohttp.ClientSession, key: str, emit: Emit) -> None:
        poll = self.config.poll
        url = f"{self.base_url}/computeMetadata/v1/instance/{key}"
        warnings = WarningLimiter(
            logger, self._clock, poll.warn_interval_s, faults=self.faults, endpoint=key
        )
        backoff = Backoff(poll.backoff_initial_s, poll.backoff_max_s)
        etag: str | None = None
        while True:
            params: dict[str, str] = {}
            request_timeout_s = poll.request_timeout_s
            if etag is not None:
                params = {
                    "wait_for_change": "true",
                    "last_etag": etag,
                    "timeout_sec": str(self.config.long_poll_timeout_s),
                }
                request_timeout_s += self.config.long_poll_timeout_s
            started = self._clock()
            try:
                async with session.get(
                    url,
                    params=params,
                    headers={"Metadata-Flavor": "Google"},
                    timeout=timeout(request_timeout_s),
                    allow_redirects=False,
                ) as resp:
                    if resp.status != 200:
                        raise MalformedMetadata(f"HTTP {resp.status}")
                    if resp.headers.get("Metadata-Flavor") != "Google":
                        raise MalformedMetadata("answer lacks Metadata-Flavor: Google")
                    new_etag = checked_etag(resp.headers.get("ETag"))
                    body = await read_body(resp, key, content_types=CONTENT_TYPES)
                value = parse_value(key, body)
            except WATCH_ERRORS as exc:
                warnings.warn(f"GCE metadata {url}: {type(exc).__name__}: {exc}")
                etag = None  # start over with a plain read
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            warnings.ok(f"GCE metadata {url}")
            if value != self._current[key]:
                self._current[key] = value
                notice = notice_for(key, value, self._clock(), self.config)
                if notice is not None:
                    logger.warning("GCE %s = %s: %s notice", key, value, notice.kind.value)
                    emit(notice)
            returned_early = self._clock() - started < poll.poll_interval_s
            if new_etag is None or (new_etag == etag and returned_early):
                # The server cannot long-poll (or answered at once without a change): plain polling.
                await asyncio.sleep(poll.poll_interval_s)
            etag = new_etag
