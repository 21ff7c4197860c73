"""WarmHedge, our policy: SpotHedge's skeleton made aware of the replica's cold start and of
each zone's recent history.

* Committed nodes first: the fleet's committed replicas (bought for the horizon, paid
  whether used or not) carry the base; spot and on-demand cover the rest.
* Replace on notice, and place by history: a spot launch fails over across zones ordered by
  (our replicas there, time since that zone last preempted us or refused a launch, the
  ``zone_rank`` learnt from an earlier window, price), so zones with long recent uptime come
  first; ``pack`` fills the most trusted zone before spreading (one notice instead of one per
  zone when zones fail together).
* Spare spot only as warm capacity, only when it can help: when the cold start fits inside
  the preemption notice a replacement launched at the notice is ready in time, so no spare is
  held; otherwise ``num_extra`` spares, dropped after ``calm_hours`` without a preemption.
* On-demand only where it arrives first: on-demand covers the gap between ready spot and the
  target, minus spot replicas that will be ready before an on-demand node launched now could
  be; it is kept until the spot replicas are READY, then released.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from spotstart.fleet.model import (
    Action,
    FleetState,
    Launch,
    LaunchFailed,
    Preempted,
    ReplicaKind,
)
from spotstart.fleet.policies.base import alive, launch_committed, ready, release_newest
from spotstart.fleet.policies.spread import spot_failed_everywhere


class WarmHedge:
    """Cold-start-aware hedging; see the module docstring."""

    name = "warm_hedge"

    def __init__(
        self,
        num_extra: int | None = None,
        calm_hours: float | None = 3.0,
        spare_on_demand: bool | None = None,
        zone_rank: Sequence[str] | None = None,
        pack: bool = False,
    ) -> None:
        self.num_extra = num_extra
        self.calm_hours = calm_hours
        self.spare_on_demand = spare_on_demand
        # zones by trust learnt from the past (most trusted first); with ``pack`` the fleet
        # fills the most trusted zone before the next instead of spreading
        self.zone_rank = {name: i for i, name in enumerate(zone_rank or ())}
        self.pack = pack
        self.last_bad_s: dict[str, float] = {}
        self.last_preemption_s = -math.inf

    def _observe(self, state: FleetState) -> None:
        for e in state.events:
            if isinstance(e, Preempted):
                self.last_bad_s[e.zone] = state.now_s
                self.last_preemption_s = state.now_s
            elif isinstance(e, LaunchFailed) and e.kind is ReplicaKind.SPOT:
                for zone in e.zones:
                    self.last_bad_s[zone] = state.now_s

    def spares(self, state: FleetState) -> int:
        """How many spare spot replicas to hold now."""
        if self.num_extra is not None:
            extra = self.num_extra
        else:
            extra = 0 if state.spot_cold_start_s <= state.preemption_notice_s else 1
        calm = self.calm_hours
        if calm is not None and state.now_s - self.last_preemption_s > calm * 3600.0:
            return 0
        return extra

    def _launches(self, state: FleetState, count: int) -> list[Action]:
        per_zone = {z.name: 0 for z in state.zones}
        for r in alive(state, ReplicaKind.SPOT):
            per_zone[r.zone] += 1
        price = {z.name: z.spot_per_hour for z in state.zones}
        index = {z.name: i for i, z in enumerate(state.zones)}
        rank = self.zone_rank
        unranked = len(rank)
        out: list[Action] = []
        for _ in range(count):
            order = tuple(
                sorted(
                    per_zone,
                    key=lambda n: (
                        0 if self.pack else per_zone[n],
                        self.last_bad_s.get(n, -math.inf),
                        rank.get(n, unranked),
                        price[n],
                        index[n],
                    ),
                )
            )
            out.append(Launch(ReplicaKind.SPOT, order))
            per_zone[order[0]] += 1
        return out

    def decide(self, state: FleetState) -> list[Action]:
        self._observe(state)
        actions: list[Action] = []
        # committed nodes the fleet pays for anyway carry the base; spot and on-demand the rest
        actions += launch_committed(state)
        committed = alive(state, ReplicaKind.COMMITTED)
        committed_ready = sum(1 for r in committed if r.is_ready)
        base = max(0, state.target_replicas - len(committed))
        spot = alive(state, ReplicaKind.SPOT)
        want = base + self.spares(state)
        launching_spot = 0
        if len(spot) > want:
            actions += release_newest(spot, len(spot) - want)
        elif len(spot) < want and not spot_failed_everywhere(state):
            launching_spot = want - len(spot)
            actions += self._launches(state, launching_spot)

        od = alive(state, ReplicaKind.ON_DEMAND)
        spot_ready = len(ready(state, ReplicaKind.SPOT))
        od_arrives_s = state.now_s + state.on_demand_cold_start_s
        spot_sooner = sum(1 for r in spot if not r.is_ready and r.ready_at_s <= od_arrives_s)
        if state.spot_cold_start_s <= state.on_demand_cold_start_s:
            spot_sooner += launching_spot  # if they land, they beat on-demand; if not, round 2
        spare_od = self.spare_on_demand
        if spare_od is None:
            spare_od = state.spot_cold_start_s > state.preemption_notice_s
        hold = max(0, state.target_replicas - committed_ready) + (
            self.spares(state) if spare_od else 0
        )
        keep = max(0, hold - spot_ready)
        od_ready = sum(1 for r in od if r.is_ready)
        od_gap = keep - spot_sooner - len(od)
        if od_gap > 0 and state.on_demand_available:
            zone = min(state.zones, key=lambda z: z.on_demand_per_hour).name
            actions += [Launch(ReplicaKind.ON_DEMAND, (zone,)) for _ in range(od_gap)]
        elif len(od) > keep:
            # release starting on-demand first; ready on-demand only once spot is ready
            starting = [r for r in od if not r.is_ready]
            excess = len(od) - max(keep - spot_sooner, 0)
            actions += release_newest(starting, min(excess, len(starting)))
            ready_excess = od_ready - keep
            if ready_excess > 0:
                actions += release_newest([r for r in od if r.is_ready], ready_excess)
        return actions

    def quiet_until(self, state: FleetState) -> float:
        """When the calm period ends, or a starting spot replica comes within an on-demand
        cold start of ready (it then counts as arriving first)."""
        now = state.now_s
        times = []
        if self.calm_hours is not None:
            times.append(self.last_preemption_s + self.calm_hours * 3600.0)
        for r in alive(state, ReplicaKind.SPOT):
            if not r.is_ready:
                times.append(r.ready_at_s - state.on_demand_cold_start_s)
        # a time within a second before now may flip by rounding at the next tick: wake then
        return min((x for x in times if x >= now - 1.0), default=math.inf)
