"""Spot spread over zones, with and without a dynamic on-demand fallback."""

from __future__ import annotations

import math

from spotstart.fleet.model import Action, FleetState, Launch, LaunchFailed, ReplicaKind
from spotstart.fleet.policies.base import alive, ready, release_newest


def spread_launches(state: FleetState, count: int) -> list[Action]:
    """``count`` spot launches, each failing over across every zone, emptiest zone first
    (ties: config order), counting the launches planned here as if they landed first."""
    if count <= 0:
        return []
    per_zone = {z.name: 0 for z in state.zones}
    for r in alive(state, ReplicaKind.SPOT):
        per_zone[r.zone] += 1
    index = {z.name: i for i, z in enumerate(state.zones)}
    out: list[Action] = []
    for _ in range(count):
        order = tuple(sorted(per_zone, key=lambda n: (per_zone[n], index[n])))
        out.append(Launch(ReplicaKind.SPOT, order))
        per_zone[order[0]] += 1
    return out


def spot_failed_everywhere(state: FleetState) -> bool:
    """Within a tick: a spot launch over every zone just failed, so no zone has capacity."""
    return state.round > 0 and any(
        isinstance(e, LaunchFailed) and e.kind is ReplicaKind.SPOT for e in state.events
    )


class SpotSpread:
    """Keep ``target`` spot replicas spread over all zones; no on-demand."""

    name = "spot_spread"

    def decide(self, state: FleetState) -> list[Action]:
        have = alive(state, ReplicaKind.SPOT)
        gap = state.target_replicas - len(have)
        if gap < 0:
            return list(release_newest(have, -gap))
        if spot_failed_everywhere(state):
            return []
        return spread_launches(state, gap)

    def quiet_until(self, state: FleetState) -> float:
        """Counts alone decide: nothing changes without an event or a phase change."""
        return math.inf


class SpreadWithFallback:
    """Spot spread over all zones, plus on-demand for the gap between ready spot and target."""

    name = "spread_fallback"

    def decide(self, state: FleetState) -> list[Action]:
        spot = alive(state, ReplicaKind.SPOT)
        od = alive(state, ReplicaKind.ON_DEMAND)
        actions: list[Action] = []
        gap = state.target_replicas - len(spot)
        if gap < 0:
            actions += release_newest(spot, -gap)
        elif not spot_failed_everywhere(state):
            actions += spread_launches(state, gap)
        od_gap = max(0, state.target_replicas - len(ready(state, ReplicaKind.SPOT))) - len(od)
        if od_gap < 0:
            actions += release_newest(od, -od_gap)
        elif od_gap > 0 and state.on_demand_available and state.round == 0:
            cheapest = min(state.zones, key=lambda z: z.on_demand_per_hour).name
            actions += [Launch(ReplicaKind.ON_DEMAND, (cheapest,)) for _ in range(od_gap)]
        return actions

    def quiet_until(self, state: FleetState) -> float:
        """Counts alone decide: nothing changes without an event or a phase change."""
        return math.inf
