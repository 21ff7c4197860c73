"""Azure watcher (Scheduled Events): polls ``/metadata/scheduledevents`` once a second, reads the
events again only when ``DocumentIncarnation`` changed, and reports Preempt (Spot eviction,
>= 30 s), Terminate and, as early signals, Reboot/Redeploy/Freeze. Can approve an event
(``StartRequests``) so the platform goes ahead without waiting for ``NotBefore``.
The first request on a VM can take up to two minutes while the service starts: we just retry.

Docs: https://learn.microsoft.com/azure/virtual-machines/linux/scheduled-events,
https://learn.microsoft.com/azure/virtual-machines/spot-vms
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import os
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
    MalformedMetadata,
    PollConfig,
    WarningLimiter,
    client_session,
    resolve_metadata_url,
    run_pollers,
    timeout,
)

logger = logging.getLogger("spotstart.guard.watchers.azure")

EVENTS_PATH = "/metadata/scheduledevents"
# IMDS instance metadata: this VM's name, as Scheduled Events list it in ``Resources``.
NAME_PATH = "/metadata/instance/compute/name"
NAME_API_VERSION = "2021-02-01"
EVENT_KINDS: dict[str, NoticeKind] = {
    "Preempt": NoticeKind.PREEMPTION,
    "Terminate": NoticeKind.TERMINATION,
    "Reboot": NoticeKind.RESTART,
    "Redeploy": NoticeKind.RESTART,
    "Freeze": NoticeKind.MIGRATION,  # a pause of seconds; the VM and its processes survive
}


@dataclass(frozen=True)
class AzureWatcherConfig:
    """``report_terminate`` / ``report_maintenance`` add those event types to Preempt.
    ``acknowledge``: approve Preempt/Terminate events as soon as they are reported (otherwise
    call :meth:`AzureWatcher.acknowledge` once drained). Events of an availability set or scale
    set reach every member: only those whose ``Resources`` name this VM are reported. The name
    is ``resource_name`` if given, else IMDS ``compute/name``, asked before the first poll (no
    event is acted on while it is unknown)."""

    metadata_url: str | None = None
    resource_name: str | None = None
    api_version: str = "2020-07-01"
    report_terminate: bool = True
    report_maintenance: bool = True
    acknowledge: bool = False
    poll: PollConfig = field(default_factory=PollConfig)

    def kind_of(self, event_type: str) -> NoticeKind | None:
        kind = EVENT_KINDS.get(event_type)
        if kind is NoticeKind.TERMINATION and not self.report_terminate:
            return None
        if kind in (NoticeKind.RESTART, NoticeKind.MIGRATION) and not self.report_maintenance:
            return None
        return kind


@dataclass(frozen=True)
class ScheduledEvent:
    event_id: str
    event_type: str
    status: str
    not_before: str  # RFC 1123, "" once started
    resources: tuple[str, ...] = ()


@dataclass(frozen=True)
class ScheduledEvents:
    incarnation: int
    events: tuple[ScheduledEvent, ...]


def parse_scheduled_events(body: bytes) -> ScheduledEvents:
    """Parse the scheduledevents document; raise MalformedMetadata for anything else."""
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise MalformedMetadata("not JSON") from exc
    if not isinstance(data, dict):
        raise MalformedMetadata("not a JSON object")
    incarnation, events = data.get("DocumentIncarnation"), data.get("Events")
    if not isinstance(incarnation, int) or isinstance(incarnation, bool):
        raise MalformedMetadata("no integer DocumentIncarnation")
    if not isinstance(events, list):
        raise MalformedMetadata("no Events list")
    parsed = []
    for event in events:
        if not isinstance(event, dict):
            raise MalformedMetadata("event is not an object")
        fields = [event.get(k) for k in ("EventId", "EventType", "EventStatus", "NotBefore")]
        if not all(isinstance(f, str) for f in fields) or not fields[0]:
            raise MalformedMetadata(
                f"event without EventId/EventType/EventStatus/NotBefore: {event}"
            )
        resources = event.get("Resources", [])
        if not isinstance(resources, list) or not all(isinstance(r, str) for r in resources):
            raise MalformedMetadata(f"event Resources is not a list of names: {event}")
        event_id, event_type, status, not_before = (str(f) for f in fields)
        parsed.append(ScheduledEvent(event_id, event_type, status, not_before, tuple(resources)))
    return ScheduledEvents(incarnation, tuple(parsed))


def names_this_vm(resources: tuple[str, ...], vm_name: str) -> bool:
    """Whether an event's ``Resources`` include this VM. Azure names are case-insensitive;
    scale-set instances are listed with a leading underscore (``_myvmss_3``) where
    ``compute/name`` says ``myvmss_3``."""
    want = vm_name.strip().lstrip("_").casefold()
    return bool(want) and any(r.strip().lstrip("_").casefold() == want for r in resources)


def event_notice(
    event: ScheduledEvent, kind: NoticeKind, received_at: float, wall_now: float
) -> PreemptionNotice:
    """Deadline: ``NotBefore`` moved onto the monotonic clock; an empty NotBefore (the event has
    started) or one in the past means now."""
    left_s = 0.0
    if event.not_before:
        try:
            when = email.utils.parsedate_to_datetime(event.not_before)
        except (TypeError, ValueError) as exc:
            raise MalformedMetadata(f"bad NotBefore {event.not_before!r}") from exc
        left_s = max(0.0, when.timestamp() - wall_now)
    detail = {
        "event_id": event.event_id,
        "event_type": event.event_type,
        "event_status": event.status,
        "not_before": event.not_before,
    }
    return PreemptionNotice(kind, "azure", received_at, received_at + left_s, detail)


class AzureWatcher:
    """Watches Azure Scheduled Events; reports each event (by EventId) once.

    Example::

        watcher = AzureWatcher(AzureWatcherConfig(metadata_url="http://127.0.0.1:8170"))
        async for notice in watcher.watch():
            ...  # drain, then:
            await watcher.acknowledge(notice.detail["event_id"])
    """

    name = "azure"

    def __init__(
        self,
        config: AzureWatcherConfig | None = None,
        *,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config or AzureWatcherConfig()
        self._clock = clock
        self._wall_clock = wall_clock
        env = os.environ if environ is None else environ
        self.base_url = resolve_metadata_url("azure", self.config.metadata_url, env)
        self.vm_name: str | None = self.config.resource_name
        self._incarnation: int | None = None
        self._seen: set[str] = set()
        self._others: set[str] = set()  # event ids for other VMs, logged once

    @property
    def _url(self) -> str:
        return f"{self.base_url}{EVENTS_PATH}"

    @property
    def _params(self) -> dict[str, str]:
        return {"api-version": self.config.api_version}

    async def watch(self) -> AsyncGenerator[PreemptionNotice, None]:
        async with (
            client_session() as session,
            contextlib.aclosing(
                run_pollers([lambda emit: self._poll_forever(session, emit)])
            ) as notices,
        ):
            async for notice in notices:
                yield notice

    async def acknowledge(self, event_id: str) -> bool:
        """Approve ``event_id`` (``StartRequests``): the platform may then act at once. True on
        success; failures are logged, never raised (the event still happens at NotBefore)."""
        try:
            async with (
                client_session() as session,
                session.post(
                    self._url,
                    params=self._params,
                    headers={"Metadata": "true"},
                    json={"StartRequests": [{"EventId": event_id}]},
                    timeout=timeout(self.config.poll.request_timeout_s),
                    allow_redirects=False,
                ) as resp,
            ):
                await resp.read()
                ok = resp.status == 200
                if not ok:
                    logger.warning("Azure: approving event %s: HTTP %s", event_id, resp.status)
                return ok
        except WATCH_ERRORS as exc:
            logger.warning("Azure: approving event %s: %s: %s", event_id, type(exc).__name__, exc)
            return False

    async def _poll_forever(self, session: aiohttp.ClientSession, emit: Emit) -> None:
        poll = self.config.poll
        warnings = WarningLimiter(logger, self._clock, poll.warn_interval_s)
        backoff = Backoff(poll.backoff_initial_s, poll.backoff_max_s)
        while True:
            try:
                if self.vm_name is None:
                    self.vm_name = await self._own_name(session)
                    logger.info("Azure: this VM is %r; acting on its events only", self.vm_name)
                async with session.get(
                    self._url,
                    params=self._params,
                    headers={"Metadata": "true"},
                    timeout=timeout(poll.request_timeout_s),
                    allow_redirects=False,
                ) as resp:
                    body = await resp.read()
                    status = resp.status
                if status != 200:
                    raise MalformedMetadata(f"HTTP {status}")
                document = parse_scheduled_events(body)
                notices = self._new_notices(document)
            except WATCH_ERRORS as exc:
                warnings.warn(f"Azure scheduled events {self._url}: {type(exc).__name__}: {exc}")
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            warnings.ok(f"Azure scheduled events {self._url}")
            for notice in notices:
                logger.warning("Azure %s notice: %s", notice.detail["event_type"], notice.detail)
                emit(notice)
                self._seen.add(notice.detail["event_id"])
                removal = notice.kind in (NoticeKind.PREEMPTION, NoticeKind.TERMINATION)
                if self.config.acknowledge and removal:
                    await self.acknowledge(notice.detail["event_id"])
            await asyncio.sleep(poll.poll_interval_s)

    async def _own_name(self, session: aiohttp.ClientSession) -> str:
        """This VM's name from IMDS (``compute/name``, text format)."""
        async with session.get(
            self.base_url + NAME_PATH,
            params={"api-version": NAME_API_VERSION, "format": "text"},
            headers={"Metadata": "true"},
            timeout=timeout(self.config.poll.request_timeout_s),
            allow_redirects=False,
        ) as resp:
            body = await resp.read()
            status = resp.status
        if status != 200:
            raise MalformedMetadata(
                f"{NAME_PATH}: HTTP {status}; no event is acted on until this VM's name is known"
            )
        try:
            name = body.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise MalformedMetadata(f"{NAME_PATH}: not text") from exc
        if not name or len(name) > 256 or not name.isprintable():
            raise MalformedMetadata(f"{NAME_PATH}: unusable VM name {name[:40]!r}")
        return name

    def _new_notices(self, document: ScheduledEvents) -> list[PreemptionNotice]:
        """Notices for events not reported yet; nothing when the incarnation is unchanged. Raises
        MalformedMetadata before anything is reported, so a bad document changes no state."""
        if document.incarnation == self._incarnation:
            return []
        now, wall_now = self._clock(), self._wall_clock()
        assert self.vm_name is not None, "events are read only once the VM's name is known"
        notices = []
        for event in document.events:
            kind = self.config.kind_of(event.event_type)
            if kind is None or event.event_id in self._seen:
                continue
            if not names_this_vm(event.resources, self.vm_name):
                if event.event_id not in self._others:
                    self._others.add(event.event_id)
                    logger.info(
                        "Azure %s event %s is for %s, not this VM (%s): ignored",
                        event.event_type,
                        event.event_id,
                        ", ".join(event.resources) or "no VM",
                        self.vm_name,
                    )
                continue
            notices.append(event_notice(event, kind, now, wall_now))
        self._incarnation = document.incarnation
        return notices
