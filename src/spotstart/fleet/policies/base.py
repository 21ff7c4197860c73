"""What every fleet policy shares: the `FleetPolicy` interface and small counting helpers."""

from __future__ import annotations

from collections.abc import Iterable

from spotstart.fleet.model import FleetState, Launch, ReplicaKind, ReplicaView, Terminate
from spotstart.fleet.simulator import FleetPolicy

__all__ = [
    "FleetPolicy",
    "alive",
    "launch_committed",
    "ready",
    "release_newest",
    "zones_by_price",
]


def alive(state: FleetState, kind: ReplicaKind) -> list[ReplicaView]:
    """Replicas of ``kind`` that are not on their way out (noticed replicas do not count)."""
    return [r for r in state.replicas if r.kind is kind and not r.is_noticed]


def ready(state: FleetState, kind: ReplicaKind) -> list[ReplicaView]:
    """Replicas of ``kind`` serving now and not noticed."""
    return [r for r in state.replicas if r.kind is kind and r.is_ready]


def release_newest(replicas: Iterable[ReplicaView], count: int) -> list[Terminate]:
    """Terminate ``count`` replicas: those still starting first, then the newest."""
    order = sorted(replicas, key=lambda r: (r.is_ready, -r.launched_s, -r.replica_id))
    return [Terminate(r.replica_id) for r in order[: max(0, count)]]


def zones_by_price(state: FleetState, *, on_demand: bool = False) -> list[str]:
    """Zone names, cheapest first (stable on ties: config order)."""
    key = (lambda z: z.on_demand_per_hour) if on_demand else (lambda z: z.spot_per_hour)
    return [z.name for z in sorted(state.zones, key=key)]


def launch_committed(state: FleetState) -> list[Launch]:
    """Launches for the committed nodes the fleet pays for but does not run yet (first round
    of a tick only; in the cheapest on-demand zone)."""
    have = len(alive(state, ReplicaKind.COMMITTED))
    if state.round != 0 or have >= state.committed_replicas:
        return []
    zone = zones_by_price(state, on_demand=True)[0]
    return [Launch(ReplicaKind.COMMITTED, (zone,)) for _ in range(state.committed_replicas - have)]
