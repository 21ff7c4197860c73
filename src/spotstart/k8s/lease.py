"""Leader election over a ``coordination.k8s.io/v1`` Lease, as client-go does it: a holder
renews every ``retry_period_s``; a candidate takes the lease only once its record has not
changed for ``lease_duration_s`` by *its own* clock (so clock skew between nodes never hands
the lease over early), and every write carries the resourceVersion it read, so the API server
lets exactly one of two racing candidates win (409 Conflict for the other). A leader that could
not renew for ``renew_deadline_s`` stops acting before anyone else may take over."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from lightkube import AsyncClient
from lightkube.resources.coordination_v1 import Lease
from lightkube.types import PatchType

from spotstart.k8s.api import api_status, is_transient, pause

log = logging.getLogger("spotstart.k8s")


def micro_time(wall_s: float) -> str:
    """The API's MicroTime: RFC 3339 with microseconds, UTC."""
    return datetime.fromtimestamp(wall_s, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class LeaseTiming:
    lease_duration_s: float = 15.0
    renew_deadline_s: float = 10.0
    retry_period_s: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.retry_period_s < self.renew_deadline_s < self.lease_duration_s:
            raise ValueError("need 0 < retry period < renew deadline < lease duration")


class LeaderElector:
    """Holds (or waits for) one Lease. ``is_leader`` is True only while the last successful
    renewal is younger than the renew deadline."""

    def __init__(
        self,
        client: AsyncClient,
        namespace: str,
        name: str,
        identity: str,
        timing: LeaseTiming = LeaseTiming(),
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.timing = timing
        self._clock = clock
        self._wall = wall
        self._on_change = on_change
        self._renewed_at: float | None = None
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self._was_leader = False
        self.transitions_seen = 0

    @property
    def is_leader(self) -> bool:
        return (
            self._renewed_at is not None
            and self._clock() - self._renewed_at < self.timing.renew_deadline_s
        )

    def _note(self) -> None:
        now = self.is_leader
        if now != self._was_leader:
            self._was_leader = now
            log.info(
                "leader election: %s %s lease %s/%s",
                self.identity,
                "acquired" if now else "lost",
                self.namespace,
                self.name,
            )
            if self._on_change is not None:
                self._on_change(now)

    async def try_acquire_or_renew(self) -> bool:
        """One attempt; True when this candidate holds the lease afterwards."""
        try:
            lease = await self.client.get(Lease, self.name, namespace=self.namespace)
        except Exception as exc:
            if api_status(exc) != 404:
                raise
            return await self._create()
        spec = lease.spec
        holder = spec.holderIdentity if spec is not None else None
        record = (
            holder,
            spec.renewTime if spec is not None else None,
            spec.leaseDurationSeconds if spec is not None else None,
            spec.leaseTransitions if spec is not None else None,
        )
        now = self._clock()
        if record != self._observed:
            self._observed = record
            self._observed_at = now
        duration = float(
            (spec.leaseDurationSeconds if spec is not None else None)
            or self.timing.lease_duration_s
        )
        mine = holder == self.identity
        if holder and not mine and now < self._observed_at + duration:
            return False  # held by someone else and not expired by our clock
        transitions = (spec.leaseTransitions if spec is not None else None) or 0
        wall = micro_time(self._wall())
        body: dict[str, Any] = {
            "metadata": {"resourceVersion": lease.metadata.resourceVersion}
            if lease.metadata is not None and lease.metadata.resourceVersion
            else {},
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": int(self.timing.lease_duration_s),
                "renewTime": wall,
            },
        }
        if not mine:
            body["spec"]["acquireTime"] = wall
            body["spec"]["leaseTransitions"] = transitions + (1 if holder else 0)
        try:
            await self.client.patch(
                Lease, self.name, body, namespace=self.namespace, patch_type=PatchType.MERGE
            )
        except Exception as exc:
            if api_status(exc) == 409:
                return False  # another candidate wrote first
            raise
        self._renewed_at = now
        if not mine:
            self.transitions_seen += 1
        return True

    async def _create(self) -> bool:
        wall = micro_time(self._wall())
        lease: Lease = Lease.from_dict(  # type: ignore[assignment]
            {
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {
                    "holderIdentity": self.identity,
                    "leaseDurationSeconds": int(self.timing.lease_duration_s),
                    "acquireTime": wall,
                    "renewTime": wall,
                    "leaseTransitions": 0,
                },
            }
        )
        try:
            await self.client.create(lease)
        except Exception as exc:
            if api_status(exc) == 409:
                return False
            raise
        self._renewed_at = self._clock()
        self.transitions_seen += 1
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """Acquire and renew until ``stop``; then hand the lease back (empty holder, as
        client-go's ReleaseOnCancel does) so a successor need not wait out the duration."""
        while not stop.is_set():
            try:
                await self.try_acquire_or_renew()
            except Exception as exc:
                if not is_transient(exc):
                    log.warning("leader election: %s", exc)
                else:
                    log.info("leader election: API unavailable (%s); retrying", api_status(exc))
            self._note()
            await pause(stop, self.timing.retry_period_s)
        await self.release()

    async def release(self) -> None:
        if not self.is_leader:
            return
        self._renewed_at = None
        self._note()
        try:
            await self.client.patch(
                Lease,
                self.name,
                {"spec": {"holderIdentity": None, "leaseDurationSeconds": 1}},
                namespace=self.namespace,
                patch_type=PatchType.MERGE,
            )
        except Exception as exc:
            log.info("leader election: could not release the lease: %s", exc)
