"""Committed-use baseline plus spot burst: ``committed`` discounted nodes always on, the rest
of the target on spot spread over zones."""

from __future__ import annotations

import math

from spotstart.fleet.model import Action, FleetState, ReplicaKind
from spotstart.fleet.policies.base import alive, launch_committed, release_newest
from spotstart.fleet.policies.spread import spot_failed_everywhere, spread_launches


class CommittedBaseline:
    """Use every committed node the fleet pays for; cover the rest with spread spot."""

    name = "committed_burst"

    def decide(self, state: FleetState) -> list[Action]:
        spot = alive(state, ReplicaKind.SPOT)
        actions: list[Action] = list(launch_committed(state))
        gap = max(0, state.target_replicas - state.committed_replicas) - len(spot)
        if gap < 0:
            actions += release_newest(spot, -gap)
        elif not spot_failed_everywhere(state):
            actions += spread_launches(state, gap)
        return actions

    def quiet_until(self, state: FleetState) -> float:
        """Counts alone decide: nothing changes without an event or a phase change."""
        return math.inf
