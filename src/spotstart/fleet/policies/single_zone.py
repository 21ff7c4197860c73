"""Spot in one zone: the naive setup, retried every tick when the zone has no capacity."""

from __future__ import annotations

import math

from spotstart.fleet.model import Action, FleetState, Launch, ReplicaKind
from spotstart.fleet.policies.base import alive, release_newest


class SpotSingleZone:
    """Keep ``target`` spot replicas in ``zone`` (default: the first zone of the config)."""

    name = "spot_single"

    def __init__(self, zone: str | None = None) -> None:
        self.zone = zone

    def decide(self, state: FleetState) -> list[Action]:
        zone = self.zone or state.zones[0].name
        have = alive(state, ReplicaKind.SPOT)
        gap = state.target_replicas - len(have)
        if gap < 0:
            return list(release_newest(have, -gap))
        if state.round > 0:  # it just failed: the zone is full until the next tick
            return []
        return [Launch(ReplicaKind.SPOT, (zone,)) for _ in range(gap)]

    def quiet_until(self, state: FleetState) -> float:
        """Counts alone decide: nothing changes without an event or a phase change."""
        return math.inf
