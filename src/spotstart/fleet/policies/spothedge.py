"""SpotHedge, as described in the SkyServe paper (EuroSys 2025) and SkyPilot's
``sky/serve/spot_placer.py`` / ``autoscalers.py``, re-implemented over our simulator.

* Overprovision: keep ``target + num_extra`` spot replicas alive.
* Dynamic on-demand fallback: keep ``max(0, target - ready spot)`` on-demand replicas; release
  them as spot becomes ready.
* Placement: zones are ACTIVE or PREEMPTED. A launch goes to an active zone not yet hosting one
  of our replicas (else any active zone), the cheapest, ties broken at random (seeded). A zone
  turns PREEMPTED when a replica there is preempted or a launch there fails, and ACTIVE again
  after a successful launch there. When every zone is preempted, all are reset to active.

Differences from production SkyServe, on purpose and in its favour: it reacts at the preemption
notice (SkyServe notices the loss by probing, after the node is gone), and a failed launch is
retried in another zone within the same tick.
"""

from __future__ import annotations

import math
import random

from spotstart.fleet.model import (
    Action,
    FleetState,
    Launch,
    Launched,
    LaunchFailed,
    Preempted,
    ReplicaKind,
)
from spotstart.fleet.policies.base import alive, ready, release_newest

ACTIVE = "active"
PREEMPTED = "preempted"


class SpotHedge:
    """SkyServe's SpotHedge: ``num_extra`` spare spot replicas, dynamic on-demand fallback,
    active/preempted zone placement."""

    name = "spothedge"

    def __init__(self, num_extra: int = 1, seed: int = 0) -> None:
        self.num_extra = num_extra
        self._rng = random.Random(seed)
        self.status: dict[str, str] = {}

    def _observe(self, state: FleetState) -> None:
        if not self.status:
            self.status = {z.name: ACTIVE for z in state.zones}
        for e in state.events:
            if isinstance(e, Preempted):
                self.status[e.zone] = PREEMPTED
            elif isinstance(e, LaunchFailed) and e.kind is ReplicaKind.SPOT:
                for zone in e.zones:
                    self.status[zone] = PREEMPTED
            elif isinstance(e, Launched) and e.kind is ReplicaKind.SPOT:
                self.status[e.zone] = ACTIVE

    def _select_zone(self, state: FleetState, current: list[str]) -> str:
        active = [z for z in state.zones if self.status[z.name] == ACTIVE]
        if not active:
            for name in self.status:
                self.status[name] = ACTIVE
            active = list(state.zones)
        candidates = [z for z in active if z.name not in current] or active
        cheapest = min(z.spot_per_hour for z in candidates)
        return self._rng.choice([z.name for z in candidates if z.spot_per_hour == cheapest])

    def decide(self, state: FleetState) -> list[Action]:
        self._observe(state)
        actions: list[Action] = []
        spot = alive(state, ReplicaKind.SPOT)
        want = state.target_replicas + self.num_extra
        if len(spot) > want:
            actions += release_newest(spot, len(spot) - want)
        else:
            current = [r.zone for r in spot]
            for _ in range(want - len(spot)):
                zone = self._select_zone(state, current)
                current.append(zone)
                actions.append(Launch(ReplicaKind.SPOT, (zone,)))
        od = alive(state, ReplicaKind.ON_DEMAND)
        od_want = max(0, state.target_replicas - len(ready(state, ReplicaKind.SPOT)))
        if len(od) > od_want:
            actions += release_newest(od, len(od) - od_want)
        elif state.round == 0 and state.on_demand_available:
            zone = min(state.zones, key=lambda z: z.on_demand_per_hour).name
            actions += [Launch(ReplicaKind.ON_DEMAND, (zone,)) for _ in range(od_want - len(od))]
        return actions

    def quiet_until(self, state: FleetState) -> float:
        """Counts alone decide: nothing changes without an event or a phase change."""
        return math.inf
