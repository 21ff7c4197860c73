"""AWS spot watcher (IMDSv2): takes a session token (PUT with a TTL), polls
``spot/instance-action`` (404 = nothing; else the action and its UTC ``time``, two minutes after
the notice) and ``events/recommendations/rebalance`` (an early signal without a deadline).
AWS recommends polling every 5 s; we poll every second since 2 minutes is all we get.

Docs: https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/configuring-instance-metadata-service.html,
https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/spot-instance-termination-notices.html,
https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/rebalance-recommendations.html

What is believed: a token only of the IMDSv2 token alphabet and at most 1 KiB, its TTL (if the
answer states one) within what was asked; a document only with status 200 (404: "no notice"), a
plain content type (IMDS sends ``text/plain``) if any, at most 64 KiB, strict UTF-8 JSON, an
``action`` in {terminate, stop, hibernate} and an RFC 3339 ``time`` with its zone. Anything
else is a fault: retried with backoff, counted in ``faults``, never a notice and never "no
notice". A notice's deadline is at most the two documented minutes after it is read, whatever
``time`` says (a far-off time from a skewed clock must not delay the drain). IMDS answers only
the instance that asks, so no instance identity is needed to attribute a notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

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
    json_document,
    read_body,
    resolve_metadata_url,
    run_pollers,
    timeout,
)

logger = logging.getLogger("spotstart.guard.watchers.aws")

TOKEN_PATH = "/latest/api/token"
INSTANCE_ACTION_PATH = "/latest/meta-data/spot/instance-action"
REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
ACTIONS = frozenset({"terminate", "stop", "hibernate"})
# AWS: "a warning that is issued two minutes before Amazon EC2 stops or terminates".
INTERRUPTION_WINDOW_S = 120.0
# IMDS answers its documents (JSON ones included) as text/plain.
CONTENT_TYPES = frozenset({"text/plain", "application/json", "application/octet-stream"})
# IMDSv2 tokens are base64 (about 56 characters); the alphabet keeps a token out of header
# syntax, the bound keeps a portal's page from becoming one.
_TOKEN = re.compile(r"[A-Za-z0-9+/=_.-]{1,1024}")
MAX_TOKEN_BYTES = 1024
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})")


@dataclass(frozen=True)
class AwsWatcherConfig:
    """``token_ttl_s`` (1..21600) is asked for each IMDSv2 token; a token is renewed after 80 %
    of it, and at once on a 401. A rebalance recommendation carries no deadline:
    ``rebalance_window_s`` is the one we report (the earliest a 2-minute notice could end)."""

    metadata_url: str | None = None
    token_ttl_s: int = 21600
    rebalance: bool = True
    rebalance_window_s: float = 120.0
    poll: PollConfig = field(default_factory=PollConfig)

    def __post_init__(self) -> None:
        if not 1 <= self.token_ttl_s <= 21600:
            raise ValueError("AwsWatcherConfig.token_ttl_s must be within 1..21600")


def parse_utc(text: str) -> datetime:
    """An RFC 3339 date-time with its zone (``2017-09-18T08:22:00Z``); MalformedMetadata for
    anything else (a date alone, a time without a zone, ISO 8601's basic format...)."""
    if not _RFC3339.fullmatch(text):
        raise MalformedMetadata(f"not an RFC 3339 time: {text[:40]!r}")
    # A leap second (23:59:60) is a real instant datetime cannot hold: read as :59, the
    # deadline one second early, never a fault that hides the notice.
    text = text[:17] + "59" + text[19:] if text[17:19] == "60" else text
    try:
        when = datetime.fromisoformat(text.upper().replace("Z", "+00:00").replace(" ", "T"))
    except ValueError as exc:  # 2026-13-45T...: the right shape, not a date
        raise MalformedMetadata(f"not an RFC 3339 time: {text[:40]!r}") from exc
    if when.tzinfo is None:
        raise MalformedMetadata(f"time without a zone: {text[:40]!r}")
    return when


def parse_instance_action(body: bytes) -> tuple[str, datetime]:
    """``{"action": "terminate", "time": "2017-09-18T08:22:00Z"}`` -> (action, time)."""
    data = json_document(body, "instance-action")
    action, when = data.get("action"), data.get("time")
    if not isinstance(action, str) or action not in ACTIONS or not isinstance(when, str):
        raise MalformedMetadata(f"unexpected instance-action {str(data)[:80]}")
    return action, parse_utc(when)


def parse_rebalance(body: bytes) -> datetime:
    """``{"noticeTime": "2020-10-27T08:22:00Z"}`` -> the notice time."""
    when = json_document(body, "rebalance recommendation").get("noticeTime")
    if not isinstance(when, str):
        raise MalformedMetadata("rebalance recommendation without noticeTime")
    return parse_utc(when)


def parse_token(body: bytes, ttl_header: str | None, asked_ttl_s: int) -> tuple[str, int]:
    """An IMDSv2 token answer -> (token, TTL in seconds). The TTL is the one asked for unless
    the answer states a shorter one; a stated TTL that is not 1..asked is a fault."""
    try:
        token = body.decode("ascii")
    except UnicodeDecodeError as exc:
        raise MalformedMetadata("token PUT: token is not ASCII") from exc
    if token.endswith("\n"):  # line framing, as GCE's values
        token = token[:-1]
    if not _TOKEN.fullmatch(token):
        raise MalformedMetadata(f"token PUT: not an IMDSv2 token: {token[:40]!r}")
    ttl = asked_ttl_s
    if ttl_header is not None:
        # ASCII digits: str.isdigit() also takes "²", which int() refuses (a crash, not a fault)
        if (
            not ttl_header.isascii()
            or not ttl_header.isdigit()
            or not 1 <= int(ttl_header) <= asked_ttl_s
        ):
            raise MalformedMetadata(f"token PUT: TTL {ttl_header[:20]!r} not within 1..{ttl}")
        ttl = int(ttl_header)
    return token, ttl


def interruption_notice(
    action: str, when: datetime, received_at: float, wall_now: float
) -> PreemptionNotice:
    """The deadline moves the cloud's wall-clock ``time`` onto the monotonic clock: received_at
    plus the seconds left by the wall clock (0 if the time is already past), never more than
    the two documented minutes (our wall clock may lag the cloud's)."""
    left_s = min(INTERRUPTION_WINDOW_S, max(0.0, when.timestamp() - wall_now))
    deadline = received_at + left_s
    detail = {"action": action, "time": when.strftime("%Y-%m-%dT%H:%M:%SZ")}
    return PreemptionNotice(NoticeKind.PREEMPTION, "aws", received_at, deadline, detail)


class _Unauthorized(Exception):
    pass


class AwsWatcher:
    """Watches an EC2 instance's IMDSv2 for spot interruption and rebalance notices; each
    distinct notice body is reported once.

    Example::

        watcher = AwsWatcher(AwsWatcherConfig(metadata_url="http://127.0.0.1:8169"))
        async for notice in watcher.watch(): ...
    """

    name = "aws"

    def __init__(
        self,
        config: AwsWatcherConfig | None = None,
        *,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config or AwsWatcherConfig()
        self._clock = clock
        self._wall_clock = wall_clock
        env = os.environ if environ is None else environ
        self.base_url = resolve_metadata_url("aws", self.config.metadata_url, env)
        self._token: str | None = None
        self._token_renew_at = 0.0
        self._seen: set[tuple[str, str]] = set()
        self.faults = Faults()

    async def watch(self) -> AsyncGenerator[PreemptionNotice, None]:
        async with (
            client_session() as session,
            contextlib.aclosing(
                run_pollers(
                    [lambda emit: self._poll_forever(session, emit)],
                    what="AWS watcher",
                    poll=self.config.poll,
                    clock=self._clock,
                    faults=self.faults,
                )
            ) as notices,
        ):
            async for notice in notices:
                yield notice

    async def _poll_forever(self, session: aiohttp.ClientSession, emit: Emit) -> None:
        poll = self.config.poll
        warnings = WarningLimiter(
            logger, self._clock, poll.warn_interval_s, faults=self.faults, endpoint="imds"
        )
        backoff = Backoff(poll.backoff_initial_s, poll.backoff_max_s)
        while True:
            try:
                await self._poll_once(session, emit)
            except WATCH_ERRORS as exc:
                warnings.warn(f"AWS IMDS {self.base_url}: {type(exc).__name__}: {exc}")
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            warnings.ok(f"AWS IMDS {self.base_url}")
            await asyncio.sleep(poll.poll_interval_s)

    async def _poll_once(self, session: aiohttp.ClientSession, emit: Emit) -> None:
        body = await self._get(session, INSTANCE_ACTION_PATH)
        if body is not None:
            action, when = parse_instance_action(body)
            self._report(
                emit,
                ("action", f"{action} {when.isoformat()}"),
                lambda now: interruption_notice(action, when, now, self._wall_clock()),
            )
        if self.config.rebalance:
            body = await self._get(session, REBALANCE_PATH)
            if body is not None:
                notice_time = parse_rebalance(body)
                window = self.config.rebalance_window_s
                self._report(
                    emit,
                    ("rebalance", notice_time.isoformat()),
                    lambda now: PreemptionNotice(
                        NoticeKind.REBALANCE,
                        "aws",
                        now,
                        now + window,
                        {"noticeTime": notice_time.strftime("%Y-%m-%dT%H:%M:%SZ")},
                    ),
                )

    def _report(
        self, emit: Emit, key: tuple[str, str], make: Callable[[float], PreemptionNotice]
    ) -> None:
        if key in self._seen:
            return
        notice = make(self._clock())
        self._seen.add(key)
        logger.warning("AWS %s notice: %s", notice.kind.value, notice.detail)
        emit(notice)

    async def _get(self, session: aiohttp.ClientSession, path: str) -> bytes | None:
        """The body of ``path``, None on 404; renews the token once on a 401."""
        for attempt in (1, 2):
            token = await self._ensure_token(session)
            async with session.get(
                self.base_url + path,
                headers={"X-aws-ec2-metadata-token": token},
                timeout=timeout(self.config.poll.request_timeout_s),
                allow_redirects=False,
            ) as resp:
                status = resp.status
                if status == 200:
                    return await read_body(resp, path, content_types=CONTENT_TYPES)
            if status == 404:
                return None
            if status == 401 and attempt == 1:
                logger.info("AWS IMDS token refused (401); taking a new one")
                self._token = None
                continue
            raise MalformedMetadata(f"{path}: HTTP {status}")
        raise AssertionError("unreachable")

    async def _ensure_token(self, session: aiohttp.ClientSession) -> str:
        now = self._clock()
        if self._token is not None and now < self._token_renew_at:
            return self._token
        ttl = self.config.token_ttl_s
        async with session.put(
            self.base_url + TOKEN_PATH,
            headers={"X-aws-ec2-metadata-token-ttl-seconds": str(ttl)},
            timeout=timeout(self.config.poll.request_timeout_s),
            allow_redirects=False,
        ) as resp:
            if resp.status != 200:
                raise MalformedMetadata(f"token PUT: HTTP {resp.status}")
            body = await read_body(
                resp, "token PUT", content_types=CONTENT_TYPES, limit=MAX_TOKEN_BYTES
            )
            stated_ttl = resp.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
        token, ttl = parse_token(body, stated_ttl, ttl)
        self._token = token
        self._token_renew_at = now + 0.8 * ttl
        return token
