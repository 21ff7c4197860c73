"""On-demand only: ``target`` on-demand replicas in the cheapest zone. The cost baseline."""

from __future__ import annotations

import math

from spotstart.fleet.model import Action, FleetState, Launch, ReplicaKind
from spotstart.fleet.policies.base import alive, release_newest, zones_by_price


class OnDemandOnly:
    """Keep exactly ``target`` on-demand replicas."""

    name = "on_demand"

    def decide(self, state: FleetState) -> list[Action]:
        have = alive(state, ReplicaKind.ON_DEMAND)
        gap = state.target_replicas - len(have)
        if gap < 0:
            return list(release_newest(have, -gap))
        if state.round > 0:
            return []
        zone = zones_by_price(state, on_demand=True)[0]
        return [Launch(ReplicaKind.ON_DEMAND, (zone,)) for _ in range(gap)]

    def quiet_until(self, state: FleetState) -> float:
        """Counts alone decide: nothing changes without an event or a phase change."""
        return math.inf
