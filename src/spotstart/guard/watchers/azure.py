"""Azure watcher (Scheduled Events): polls ``/metadata/scheduledevents`` once a second, reads the
events again only when ``DocumentIncarnation`` changed, and reports Preempt (Spot eviction,
>= 30 s), Terminate and, as early signals, Reboot/Redeploy/Freeze. Can approve an event
(``StartRequests``) so the platform goes ahead without waiting for ``NotBefore``.
The first request on a VM can take up to two minutes while the service starts: we just retry.

Docs: https://learn.microsoft.com/azure/virtual-machines/linux/scheduled-events,
https://learn.microsoft.com/azure/virtual-machines/spot-vms,
https://learn.microsoft.com/azure/azure-resource-manager/management/resource-name-rules

What is believed. Every request carries ``Metadata: true`` (IMDS refuses others; a proxy that
answers without it is not IMDS). An answer is read only with status 200, IMDS's content type
(``text/plain`` for ``compute/name``, ``application/json`` for the events) and at most 64 KiB:

- This VM's name (``compute/name``) must be an Azure VM resource name: 1-64 letters, digits,
  ``-``, ``_``, ``.``, starting with a letter or digit and not ending in ``.`` or ``-`` (the
  resource name, not the 15-character Windows host name), optionally followed by a scale-set
  instance suffix ``_<id>``. An HTML page, a sentence, an empty answer is a fault, never a name.
- The events document: a JSON object with an integer ``DocumentIncarnation`` and an ``Events``
  list. An event is read only with a GUID ``EventId``, an ``EventType`` word, an ``EventStatus``
  of Scheduled/Started, a ``NotBefore`` that is an RFC 1123 date with its zone (or empty once
  started) and ``Resources`` a list of names. A malformed event is a fault of that event alone:
  the others in the document are still read, and the document is read again (with backoff)
  until the event is readable. An unknown ``EventType`` is not a fault: it names no removal we
  know of, so it is logged once and not acted on.

While this VM's name is unknown (``compute/name`` faulting), events are still read but no
event is acted on or dismissed: Scheduled Events reach every member of an availability set or
scale set, and ``Resources`` is the only way to tell ours from a neighbour's. Acting on any
Preempt would drain every healthy replica whose IMDS misbehaves the same way (a proxy or portal
on the node image: the whole fleet) at each single eviction; acting on a lone Resources entry
is no better (a neighbour is often evicted alone). Instead the name is asked again at once and
at every poll while a removal event waits (it stays in the document until it is done), an error
names each such event once, and once the name is answered the waiting events are judged with
it, their deadlines still from ``NotBefore``. If IMDS never answers the name, the SIGTERM
watcher still sees the shutdown of an evicted VM; ``--azure-vm-name`` removes this dependency.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import os
import re
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field

import aiohttp

from spotstart.errors import UsageError
from spotstart.guard.notice import NoticeKind, PreemptionNotice
from spotstart.guard.watchers._common import (
    MAX_BODY_BYTES,
    WATCH_ERRORS,
    Backoff,
    Clock,
    Emit,
    Faults,
    MalformedMetadata,
    PollConfig,
    WarningLimiter,
    client_session,
    json_document,
    read_body,
    resolve_metadata_url,
    run_pollers,
    timeout,
)

logger = logging.getLogger("spotstart.guard.watchers.azure")

EVENTS_PATH = "/metadata/scheduledevents"
# IMDS instance metadata: this VM's name, as Scheduled Events list it in ``Resources``.
NAME_PATH = "/metadata/instance/compute/name"
NAME_API_VERSION = "2021-02-01"
# A VM resource name (1-64: letters, digits, '-', '_', '.'; starts alphanumeric, does not end in
# '.' or '-'), optionally a scale-set instance's "_<instance id>" (decimal, or hex when flexible).
_VM_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,62}[A-Za-z0-9_])?(?:_[A-Za-z0-9]{1,16})?")
# A Resources entry: the same names, scale-set instances listed with a leading "_". Checked
# loosely (a name, not a sentence or markup): it only ever compares equal to our checked name.
_RESOURCE = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_EVENT_ID = re.compile(r"[0-9A-Fa-f]{8}(?:-[0-9A-Fa-f]{4}){3}-[0-9A-Fa-f]{12}")  # a GUID
_EVENT_TYPE = re.compile(r"[A-Za-z]{1,32}")
EVENT_STATUSES = frozenset({"Scheduled", "Started"})
# RFC 1123 (HTTP-date), e.g. "Mon, 19 Sep 2016 18:29:47 GMT": a zone is required, since a date
# without one would be read in local time.
_RFC1123 = re.compile(
    r"(?:(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), )?\d{1,2} "
    r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} \d{2}:\d{2}:\d{2} "
    r"(?:GMT|UTC|[+-]\d{4})"
)
NAME_CONTENT_TYPES = frozenset({"text/plain"})
EVENTS_CONTENT_TYPES = frozenset({"application/json"})
MAX_NAME_BYTES = 1024
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
    is ``resource_name`` if given (checked: a UsageError if it is not an Azure VM name), else
    IMDS ``compute/name``, asked at each poll until it answers a valid name; events seen
    before that are held, neither acted on nor dismissed (see the module docstring)."""

    metadata_url: str | None = None
    resource_name: str | None = None
    api_version: str = "2020-07-01"
    report_terminate: bool = True
    report_maintenance: bool = True
    acknowledge: bool = False
    poll: PollConfig = field(default_factory=PollConfig)

    def __post_init__(self) -> None:
        if self.resource_name is not None and not is_vm_name(self.resource_name):
            raise UsageError(
                f"Azure VM name {self.resource_name[:80]!r} is not an Azure VM resource name "
                "(1-64 letters, digits, '-', '_', '.'; a scale-set instance adds '_<id>'); "
                "give the name Scheduled Events list in Resources"
            )

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
    malformed: tuple[str, ...] = ()  # one line per event that could not be read


def is_vm_name(name: str) -> bool:
    """Whether ``name`` is an Azure VM resource name (or scale-set instance name)."""
    return len(name) <= 81 and _VM_NAME.fullmatch(name) is not None


def parse_vm_name(body: bytes) -> str:
    """IMDS ``compute/name`` (text format) -> this VM's name; MalformedMetadata for anything
    that is not an Azure VM name (one trailing newline is line framing)."""
    try:
        name = body.decode("ascii")
    except UnicodeDecodeError as exc:
        raise MalformedMetadata(f"{NAME_PATH}: not an Azure VM name (not ASCII)") from exc
    if name.endswith("\n"):
        name = name[:-1]
    if not is_vm_name(name):
        raise MalformedMetadata(f"{NAME_PATH}: not an Azure VM name: {name[:40]!r}")
    return name


def parse_not_before(text: str) -> float | None:
    """``NotBefore`` -> epoch seconds; None for "" (the event has started)."""
    if text == "":
        return None
    if not _RFC1123.fullmatch(text):
        raise MalformedMetadata(f"NotBefore {text[:40]!r} is not an RFC 1123 date")
    # A leap second (23:59:60) is a real instant datetime cannot hold: read as :59, the
    # deadline one second early, never a fault that hides the event.
    text = re.sub(r"(\d{2}:\d{2}):60 ", r"\1:59 ", text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError) as exc:  # the right shape, not a date (31 Feb...)
        raise MalformedMetadata(f"NotBefore {text[:40]!r} is not a date") from exc
    return when.timestamp()


def parse_event(event: object) -> ScheduledEvent:
    """One entry of ``Events``; MalformedMetadata (naming the field) if it cannot be read."""
    if not isinstance(event, dict):
        raise MalformedMetadata("an event that is not a JSON object")
    event_id = event.get("EventId")
    if not isinstance(event_id, str) or not _EVENT_ID.fullmatch(event_id):
        raise MalformedMetadata(f"event with EventId {str(event_id)[:40]!r}, not a GUID")
    event_type, status = event.get("EventType"), event.get("EventStatus")
    if not isinstance(event_type, str) or not _EVENT_TYPE.fullmatch(event_type):
        raise MalformedMetadata(f"event {event_id}: EventType {str(event_type)[:40]!r}")
    if status not in EVENT_STATUSES:
        raise MalformedMetadata(f"event {event_id}: EventStatus {str(status)[:40]!r}")
    not_before = event.get("NotBefore")
    if not isinstance(not_before, str):
        raise MalformedMetadata(f"event {event_id}: NotBefore is not a string")
    parse_not_before(not_before)
    resources = event.get("Resources", [])
    if not isinstance(resources, list) or not all(
        isinstance(r, str) and _RESOURCE.fullmatch(r) for r in resources
    ):
        raise MalformedMetadata(f"event {event_id}: Resources is not a list of VM names")
    return ScheduledEvent(event_id, event_type, str(status), not_before, tuple(resources))


def parse_scheduled_events(body: bytes) -> ScheduledEvents:
    """Parse the scheduledevents document; raise MalformedMetadata when the document itself
    cannot be read. Events that cannot be read are left out and described in ``malformed``."""
    data = json_document(body, EVENTS_PATH)
    incarnation, events = data.get("DocumentIncarnation"), data.get("Events")
    if not isinstance(incarnation, int) or isinstance(incarnation, bool) or incarnation < 0:
        raise MalformedMetadata("no integer DocumentIncarnation")
    if not isinstance(events, list):
        raise MalformedMetadata("no Events list")
    parsed, malformed = [], []
    for event in events:
        try:
            parsed.append(parse_event(event))
        except MalformedMetadata as exc:
            malformed.append(str(exc))
    return ScheduledEvents(incarnation, tuple(parsed), tuple(malformed))


def names_this_vm(resources: tuple[str, ...], vm_name: str) -> bool:
    """Whether an event's ``Resources`` include this VM. Azure names are case-insensitive;
    scale-set instances are listed with a leading underscore (``_myvmss_3``) where
    ``compute/name`` says ``myvmss_3``."""
    want = vm_name.strip().lstrip("_").casefold()
    return bool(want) and any(r.strip().lstrip("_").casefold() == want for r in resources)


# The longest notice Scheduled Events give (Terminate's configurable 5-15 min; Reboot,
# Redeploy and Freeze 15 min; Preempt 30 s): a NotBefore further off (a year-9999 date, our
# clock behind) is read as this far, never a deadline nothing can represent.
MAX_NOTICE_WINDOW_S = 15 * 60.0


def event_notice(
    event: ScheduledEvent, kind: NoticeKind, received_at: float, wall_now: float
) -> PreemptionNotice:
    """Deadline: ``NotBefore`` moved onto the monotonic clock, at most MAX_NOTICE_WINDOW_S
    away; an empty NotBefore (the event has started) or one in the past means now."""
    when = parse_not_before(event.not_before)
    left_s = 0.0 if when is None else min(MAX_NOTICE_WINDOW_S, max(0.0, when - wall_now))
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
        self.faults = Faults()
        # removal events seen while this VM's name was unknown: neither acted on nor dismissed
        self.unattributed: set[str] = set()
        self._incarnation: int | None = None
        self._seen: set[str] = set()
        self._others: set[str] = set()  # event ids for other VMs, logged once
        self._unknown_types: set[str] = set()  # event types we do not act on, logged once

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
                run_pollers(
                    [lambda emit: self._poll_forever(session, emit)],
                    what="Azure watcher",
                    poll=self.config.poll,
                    clock=self._clock,
                    faults=self.faults,
                )
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
                ok = resp.status == 200
                if not ok:
                    logger.warning("Azure: approving event %s: HTTP %s", event_id, resp.status)
                return ok
        except WATCH_ERRORS as exc:
            logger.warning("Azure: approving event %s: %s: %s", event_id, type(exc).__name__, exc)
            return False

    async def _poll_forever(self, session: aiohttp.ClientSession, emit: Emit) -> None:
        poll = self.config.poll
        warnings = WarningLimiter(
            logger, self._clock, poll.warn_interval_s, faults=self.faults, endpoint=EVENTS_PATH
        )
        name_warnings = WarningLimiter(
            logger, self._clock, poll.warn_interval_s, faults=self.faults, endpoint=NAME_PATH
        )
        event_warnings = WarningLimiter(
            logger, self._clock, poll.warn_interval_s, faults=self.faults, endpoint="event"
        )
        backoff = Backoff(poll.backoff_initial_s, poll.backoff_max_s)
        while True:
            faulted = False
            if self.vm_name is None:
                try:
                    self.vm_name = await self._own_name(session)
                    logger.info("Azure: this VM is %r; acting on its events only", self.vm_name)
                    name_warnings.ok(f"Azure IMDS {NAME_PATH}")
                except WATCH_ERRORS as exc:
                    faulted = True
                    name_warnings.warn(
                        f"Azure IMDS {self.base_url}{NAME_PATH}: {type(exc).__name__}: {exc}; "
                        "no event is acted on until this VM's name is known"
                    )
            try:
                document = await self._read_events(session)
                notices = self._new_notices(document)
            except WATCH_ERRORS as exc:
                warnings.warn(f"Azure scheduled events {self._url}: {type(exc).__name__}: {exc}")
                await asyncio.sleep(backoff.next_delay())
                continue
            warnings.ok(f"Azure scheduled events {self._url}")
            for problem in document.malformed:
                faulted = True
                event_warnings.warn(f"Azure scheduled events {self._url}: {problem}")
            for notice in notices:
                logger.warning("Azure %s notice: %s", notice.detail["event_type"], notice.detail)
                emit(notice)
                self._seen.add(notice.detail["event_id"])
                removal = notice.kind in (NoticeKind.PREEMPTION, NoticeKind.TERMINATION)
                if self.config.acknowledge and removal:
                    await self.acknowledge(notice.detail["event_id"])
            if not faulted:
                backoff.reset()
                event_warnings.ok(f"Azure scheduled events {self._url}")
                await asyncio.sleep(poll.poll_interval_s)
                continue
            delay = backoff.next_delay()
            if self.vm_name is None and self.unattributed:
                # an event that may be ours waits: ask the name again at the polling rate
                delay = min(delay, poll.poll_interval_s)
            await asyncio.sleep(delay)

    async def _read_events(self, session: aiohttp.ClientSession) -> ScheduledEvents:
        body = await self._get(session, self._url, self._params, EVENTS_PATH, EVENTS_CONTENT_TYPES)
        return parse_scheduled_events(body)

    async def _own_name(self, session: aiohttp.ClientSession) -> str:
        """This VM's name from IMDS (``compute/name``, text format), checked."""
        params = {"api-version": NAME_API_VERSION, "format": "text"}
        url = self.base_url + NAME_PATH
        body = await self._get(session, url, params, NAME_PATH, NAME_CONTENT_TYPES, MAX_NAME_BYTES)
        return parse_vm_name(body)

    async def _get(
        self,
        session: aiohttp.ClientSession,
        url: str,
        params: Mapping[str, str],
        what: str,
        content_types: frozenset[str],
        limit: int = MAX_BODY_BYTES,
    ) -> bytes:
        """One IMDS GET as Azure documents it (``Metadata: true``, no redirects): a 200 of
        one of ``content_types``, read to at most ``limit``; anything else MalformedMetadata."""
        async with session.get(
            url,
            params=params,
            headers={"Metadata": "true"},
            timeout=timeout(self.config.poll.request_timeout_s),
            allow_redirects=False,
        ) as resp:
            if resp.status != 200:
                raise MalformedMetadata(f"HTTP {resp.status}")
            return await read_body(
                resp, what, content_types=content_types, require_content_type=True, limit=limit
            )

    def _new_notices(self, document: ScheduledEvents) -> list[PreemptionNotice]:
        """Notices for events not reported yet; nothing when the incarnation is unchanged. While
        this VM's name is unknown, or an event could not be read, the incarnation is not
        recorded: the same document is judged again at the next poll."""
        if document.incarnation == self._incarnation:
            return []
        now, wall_now = self._clock(), self._wall_clock()
        notices = []
        for event in document.events:
            kind = self.config.kind_of(event.event_type)
            if event.event_type not in EVENT_KINDS and event.event_type not in self._unknown_types:
                self._unknown_types.add(event.event_type)
                logger.info(
                    "Azure event %s of unknown type %r: not acted on",
                    event.event_id,
                    event.event_type,
                )
            if kind is None or event.event_id in self._seen:
                continue
            if self.vm_name is None:
                self._wait_for_name(event)
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
        if self.vm_name is not None:
            self.unattributed.clear()
            if not document.malformed:
                self._incarnation = document.incarnation
        return notices

    def _wait_for_name(self, event: ScheduledEvent) -> None:
        if event.event_id in self.unattributed:
            return
        self.unattributed.add(event.event_id)
        logger.error(
            "Azure %s event %s for %s (NotBefore %s) while this VM's name is unknown "
            "(IMDS %s faulting): it may be this VM's; it is acted on as soon as the name is "
            "known. Pass --azure-vm-name to not depend on IMDS for it",
            event.event_type,
            event.event_id,
            ", ".join(event.resources) or "no VM",
            event.not_before or "now",
            NAME_PATH,
        )
