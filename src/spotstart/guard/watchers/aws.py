"""AWS spot watcher (IMDSv2): takes a session token (PUT with a TTL), polls
``spot/instance-action`` (404 = nothing; else the action and its UTC ``time``, two minutes after
the notice) and ``events/recommendations/rebalance`` (an early signal without a deadline).
AWS recommends polling every 5 s; we poll every second since 2 minutes is all we get.

Docs: https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/configuring-instance-metadata-service.html,
https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/spot-instance-termination-notices.html,
https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/rebalance-recommendations.html
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
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
    MalformedMetadata,
    PollConfig,
    WarningLimiter,
    client_session,
    resolve_metadata_url,
    run_pollers,
    timeout,
)

logger = logging.getLogger("spotstart.guard.watchers.aws")

TOKEN_PATH = "/latest/api/token"
INSTANCE_ACTION_PATH = "/latest/meta-data/spot/instance-action"
REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
ACTIONS = frozenset({"terminate", "stop", "hibernate"})


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
    try:
        when = datetime.fromisoformat(text)
    except ValueError as exc:
        raise MalformedMetadata(f"not an ISO 8601 time: {text[:40]!r}") from exc
    if when.tzinfo is None:
        raise MalformedMetadata(f"time without a zone: {text[:40]!r}")
    return when


def _json_object(body: bytes) -> dict[str, object]:
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise MalformedMetadata("not JSON") from exc
    if not isinstance(data, dict):
        raise MalformedMetadata("not a JSON object")
    return data


def parse_instance_action(body: bytes) -> tuple[str, datetime]:
    """``{"action": "terminate", "time": "2017-09-18T08:22:00Z"}`` -> (action, time)."""
    data = _json_object(body)
    action, when = data.get("action"), data.get("time")
    if action not in ACTIONS or not isinstance(when, str):
        raise MalformedMetadata(f"unexpected instance-action {str(data)[:80]}")
    return str(action), parse_utc(when)


def parse_rebalance(body: bytes) -> datetime:
    """``{"noticeTime": "2020-10-27T08:22:00Z"}`` -> the notice time."""
    when = _json_object(body).get("noticeTime")
    if not isinstance(when, str):
        raise MalformedMetadata("rebalance recommendation without noticeTime")
    return parse_utc(when)


def interruption_notice(
    action: str, when: datetime, received_at: float, wall_now: float
) -> PreemptionNotice:
    """The deadline moves the cloud's wall-clock ``time`` onto the monotonic clock: received_at
    plus the seconds left by the wall clock (0 if the time is already past)."""
    deadline = received_at + max(0.0, when.timestamp() - wall_now)
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

    async def watch(self) -> AsyncGenerator[PreemptionNotice, None]:
        async with (
            client_session() as session,
            contextlib.aclosing(
                run_pollers([lambda emit: self._poll_forever(session, emit)])
            ) as notices,
        ):
            async for notice in notices:
                yield notice

    async def _poll_forever(self, session: aiohttp.ClientSession, emit: Emit) -> None:
        poll = self.config.poll
        warnings = WarningLimiter(logger, self._clock, poll.warn_interval_s)
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
                ("action", body.decode()),
                lambda now: interruption_notice(action, when, now, self._wall_clock()),
            )
        if self.config.rebalance:
            body = await self._get(session, REBALANCE_PATH)
            if body is not None:
                notice_time = parse_rebalance(body)
                window = self.config.rebalance_window_s
                self._report(
                    emit,
                    ("rebalance", body.decode()),
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
                body = await resp.read()
                status = resp.status
            if status == 200:
                return body
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
            body = await resp.read()
            status = resp.status
        if status != 200:
            raise MalformedMetadata(f"token PUT: HTTP {status}")
        try:
            token = body.decode("ascii").strip()
        except UnicodeDecodeError as exc:
            raise MalformedMetadata("token is not ASCII") from exc
        if not token or not token.isprintable() or len(token) > 4096:
            raise MalformedMetadata("token PUT: unusable token")
        self._token = token
        self._token_renew_at = now + 0.8 * ttl
        return token
