"""A calm period before giving capacity back: any policy, wrapped so that it releases
on-demand replicas only once it has wanted them gone for ``calm_s`` seconds without a break
(the scale-down stabilization window of the Kubernetes HPA, applied to the on-demand fallback).
The simulator and the cluster controller wrap the same way, so both drive the same decisions."""

from __future__ import annotations

from spotstart.fleet.model import Action, FleetState, ReplicaKind, Terminate
from spotstart.fleet.simulator import FleetPolicy


class CalmRelease:
    """``inner``'s decisions, with its on-demand releases held back until it has asked for them
    continuously for ``calm_s`` seconds. Launches and spot releases pass at once."""

    def __init__(self, inner: FleetPolicy, calm_s: float) -> None:
        if calm_s < 0:
            raise ValueError(f"calm_s must be >= 0, got {calm_s}")
        self.inner = inner
        self.calm_s = calm_s
        self.name = inner.name
        self.wanted_since_s: float | None = None

    def decide(self, state: FleetState) -> list[Action]:
        actions = self.inner.decide(state)
        on_demand = {r.replica_id for r in state.replicas if r.kind is ReplicaKind.ON_DEMAND}
        releases = [a for a in actions if isinstance(a, Terminate) and a.replica_id in on_demand]
        if not releases:
            if state.round == 0:
                self.wanted_since_s = None  # the wish was broken: the calm starts over
            return actions
        if self.wanted_since_s is None:
            self.wanted_since_s = state.now_s
        if state.now_s - self.wanted_since_s >= self.calm_s:
            return actions
        return [a for a in actions if a not in releases]

    def quiet_until(self, state: FleetState) -> float:
        """The inner policy's, or the end of a calm period that is running."""
        inner = getattr(self.inner, "quiet_until", None)
        until = float(inner(state)) if inner is not None else state.now_s
        if self.wanted_since_s is not None:
            until = min(until, self.wanted_since_s + self.calm_s)
        return until
