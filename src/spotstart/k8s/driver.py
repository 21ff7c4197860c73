"""The cluster driver of the fleet policies: pods in, replica counts out. Pure (no API calls,
no clock): the same `FleetPolicy` objects `spotstart plan` replays over traces decide here from
what the pods of the two Deployments say, so a policy is tested once and runs in both places.

How a cluster maps onto the simulator's model:

* A pod of ``NAME-spot`` / ``NAME-ondemand`` is a replica of kind spot / on-demand; its zone is
  its node's ``topology.kubernetes.io/zone`` (a pod not yet on a node is counted in the
  emptiest zone, where the zone spread constraint would put it).
* Ready (the guard's /readyz) -> READY; on a node, not ready -> starting (ready expected at
  creation + cold start); not on a node -> provisioning; unschedulable for longer than
  ``stockout_after_s`` -> a failed launch (reported once, never expected to be ready).
* The guard's notice annotation, a deletion, or a node shutdown -> NOTICED (not counted as
  alive: the replacement starts now, while the pod drains). Only the annotation and a node
  shutdown are preemptions; a deletion (a rollout, our own scale-down) is not.
* Actions become absolute replica counts per Deployment (idempotent: a retried or repeated
  reconcile never adds twice): alive + launches - releases, plus the noticed pods the
  ReplicaSet still counts (so a replacement starts at the notice, not after the pod is gone).
  Which pods go on a scale-down is steered with ``controller.kubernetes.io/pod-deletion-cost``.
  Zone lists of spot launches are left to the scheduler and the spread constraint.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from spotstart.fleet.model import (
    Action,
    BecameReady,
    Event,
    FleetState,
    Launch,
    Launched,
    LaunchFailed,
    Phase,
    Preempted,
    ReplicaKind,
    ReplicaView,
    Terminate,
    Zone,
)
from spotstart.fleet.record import ZoneObservation
from spotstart.fleet.simulator import FleetPolicy
from spotstart.guard.kube import DEADLINE_ANNOTATION, NOTICE_ANNOTATION

CAPACITY_LABEL = "spotstart.dev/capacity"  # spot | ondemand, set by `spotstart k8s render`
ZONE_LABEL = "topology.kubernetes.io/zone"
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
KINDS = {"spot": ReplicaKind.SPOT, "ondemand": ReplicaKind.ON_DEMAND}
# status.reason of pods the kubelet stopped because its node shut down (graceful node shutdown)
SHUTDOWN_REASONS = frozenset({"Shutdown", "NodeShutdown", "Terminated"})


def parse_time(value: Any) -> float | None:
    """RFC 3339 (as the API writes it) -> epoch seconds; None when absent or unreadable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


@dataclass(frozen=True)
class PodInfo:
    """What the driver reads from one pod (times in epoch seconds)."""

    name: str
    kind: ReplicaKind
    created_s: float
    node: str = ""
    ready: bool = False
    ready_since_s: float | None = None
    deleting_at_s: float | None = None
    notice: str = ""
    notice_deadline_s: float | None = None
    unschedulable_since_s: float | None = None
    finished: bool = False
    node_shutdown: bool = False


def pod_info(raw: Mapping[str, Any]) -> PodInfo | None:
    """A pod object as the API returns it -> `PodInfo`; None when it is not one of ours (no
    capacity label or an unknown value: names from outside are matched, never trusted)."""
    meta = raw.get("metadata") or {}
    kind = KINDS.get(str((meta.get("labels") or {}).get(CAPACITY_LABEL, "")))
    name = meta.get("name")
    if kind is None or not isinstance(name, str) or not name:
        return None
    annotations = meta.get("annotations") or {}
    status = raw.get("status") or {}
    conditions = {
        c.get("type"): c for c in status.get("conditions") or [] if isinstance(c, Mapping)
    }
    ready = conditions.get("Ready", {})
    scheduled = conditions.get("PodScheduled", {})
    unschedulable = (
        scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable"
    )
    phase = status.get("phase")
    created = parse_time(meta.get("creationTimestamp"))
    return PodInfo(
        name=name,
        kind=kind,
        created_s=created if created is not None else 0.0,
        node=str((raw.get("spec") or {}).get("nodeName") or ""),
        ready=ready.get("status") == "True" and phase == "Running",
        ready_since_s=parse_time(ready.get("lastTransitionTime")),
        deleting_at_s=parse_time(meta.get("deletionTimestamp")),
        notice=str(annotations.get(NOTICE_ANNOTATION, "")),
        notice_deadline_s=parse_time(annotations.get(DEADLINE_ANNOTATION)),
        unschedulable_since_s=(
            (parse_time(scheduled.get("lastTransitionTime")) or created or 0.0)
            if unschedulable
            else None
        ),
        finished=phase in ("Succeeded", "Failed"),
        node_shutdown=phase == "Failed" and status.get("reason") in SHUTDOWN_REASONS,
    )


@dataclass(frozen=True)
class ClusterSpec:
    """The fleet the driver keeps: zones (prices only order the policy's choices), the cold
    starts the policy plans with, the cloud's notice, the on-demand ceiling."""

    zones: tuple[Zone, ...]
    spot_cold_start_s: float = 300.0
    on_demand_cold_start_s: float = 300.0
    preemption_notice_s: float = 30.0
    max_on_demand: int = 1_000
    stockout_after_s: float = 120.0


@dataclass(frozen=True)
class Decision:
    """One reconcile's outcome: the replica counts to set, the pods to remove first on a
    scale-down, what the policy saw and what it asked."""

    spot_replicas: int
    on_demand_replicas: int
    release: tuple[str, ...]
    actions: tuple[Action, ...]
    events: tuple[Event, ...]
    state: FleetState
    capped: bool = False  # the policy wanted more on-demand than max_on_demand
    names: Mapping[int, str] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for logs and Kubernetes Events."""
        launches = [a for a in self.actions if isinstance(a, Launch)]
        spot = sum(1 for a in launches if a.kind is ReplicaKind.SPOT)
        od = sum(1 for a in launches if a.kind is ReplicaKind.ON_DEMAND)
        seen = []
        for e in self.events:
            if isinstance(e, Preempted):
                seen.append(f"notice on {self.names.get(e.replica_id, e.replica_id)}")
            elif isinstance(e, LaunchFailed):
                seen.append(f"{e.kind.value} launch stuck (no capacity)")
        parts = [f"spot={self.spot_replicas}", f"ondemand={self.on_demand_replicas}"]
        if spot or od or self.release:
            parts.append(f"(launch spot {spot}, on-demand {od}; release {len(self.release)})")
        if seen:
            parts.append("after " + ", ".join(seen))
        if self.capped:
            parts.append("capped at max_on_demand")
        return " ".join(parts)


@dataclass
class _Seen:
    launched: bool = False
    ready: bool = False
    noticed: bool = False
    stuck: bool = False


class ClusterDriver:
    """Turns successive pod snapshots into policy decisions. Keeps the policy (stateful) and
    what it has already reported, so each event reaches the policy once."""

    def __init__(self, policy: FleetPolicy, spec: ClusterSpec, start_s: float) -> None:
        self.policy = policy
        self.spec = spec
        self.start_s = start_s
        self._ids: dict[str, int] = {}
        self._seen: dict[str, _Seen] = {}
        self._tick = 0
        self._zone_names = tuple(z.name for z in spec.zones)

    def replica_id(self, name: str) -> int:
        if name not in self._ids:
            self._ids[name] = len(self._ids)
        return self._ids[name]

    def _zones(self, pods: Sequence[PodInfo], zone_of: Mapping[str, str]) -> dict[str, str]:
        known = {p.name: zone_of.get(p.node, "") for p in pods}
        count = dict.fromkeys(self._zone_names, 0)
        for p in pods:
            if p.kind is ReplicaKind.SPOT and known[p.name] in count:
                count[known[p.name]] += 1
        out = {}
        for p in sorted(pods, key=lambda p: (p.created_s, p.name)):
            zone = known[p.name]
            if zone not in count:  # not on a node yet, or a zone not in the config
                zone = min(self._zone_names, key=lambda n: count[n])
                if p.kind is ReplicaKind.SPOT:
                    count[zone] += 1
            out[p.name] = zone
        return out

    def step(
        self,
        now_s: float,
        target: int,
        pods: Sequence[PodInfo],
        zone_of: Mapping[str, str],
    ) -> Decision:
        """Decide from ``pods`` (those of both Deployments) at wall time ``now_s``;
        ``zone_of`` maps node names to their zone label."""
        spec = self.spec
        t = now_s - self.start_s
        live = [p for p in pods if not p.finished or p.node_shutdown]
        live.sort(key=lambda p: (p.created_s, p.name))
        zones = self._zones(live, zone_of)
        views: list[ReplicaView] = []
        events: list[Event] = []
        counted_noticed = {ReplicaKind.SPOT: 0, ReplicaKind.ON_DEMAND: 0}
        for p in live:
            rid = self.replica_id(p.name)
            seen = self._seen.setdefault(p.name, _Seen())
            zone = zones[p.name]
            cold = (
                spec.spot_cold_start_s
                if p.kind is ReplicaKind.SPOT
                else spec.on_demand_cold_start_s
            )
            created = p.created_s - self.start_s
            preempted = bool(p.notice) or p.node_shutdown
            if p.node and zone_of.get(p.node) and not seen.launched:
                seen.launched = True
                events.append(Launched(rid, p.kind, zone))
            if preempted or p.deleting_at_s is not None:
                ends = p.notice_deadline_s or p.deleting_at_s or now_s
                if preempted and not seen.noticed:
                    seen.noticed = True
                    events.append(Preempted(rid, zone, ends - self.start_s))
                if p.deleting_at_s is None and not p.finished:
                    counted_noticed[p.kind] += 1  # the ReplicaSet still counts it
                views.append(
                    ReplicaView(
                        rid,
                        p.kind,
                        zone,
                        created,
                        created + cold,
                        Phase.NOTICED,
                        ends - self.start_s,
                    )
                )
                continue
            if p.ready:
                since = p.ready_since_s if p.ready_since_s is not None else p.created_s
                if not seen.ready:
                    seen.ready = True
                    events.append(BecameReady(rid, zone))
                views.append(
                    ReplicaView(rid, p.kind, zone, created, since - self.start_s, Phase.READY)
                )
                continue
            ready_at = created + cold
            phase = Phase.WEIGHT_LOAD if p.node else Phase.PROVISIONING
            stuck_since = p.unschedulable_since_s
            if stuck_since is not None and now_s - stuck_since >= spec.stockout_after_s:
                ready_at = math.inf  # the cluster found no node for it: do not wait on it
                if not seen.stuck:
                    seen.stuck = True
                    events.append(LaunchFailed(p.kind, self._zone_names))
            views.append(ReplicaView(rid, p.kind, zone, created, ready_at, phase))
        present = {p.name for p in pods}
        for name in [n for n in self._seen if n not in present]:
            del self._seen[name]
        state = FleetState(
            tick=self._tick,
            now_s=t,
            tick_seconds=0.0,
            target_replicas=target,
            zones=spec.zones,
            replicas=tuple(views),
            events=tuple(events),
            spot_cold_start_s=spec.spot_cold_start_s,
            on_demand_cold_start_s=spec.on_demand_cold_start_s,
            preemption_notice_s=spec.preemption_notice_s,
            on_demand_available=spec.max_on_demand > 0,
        )
        self._tick += 1
        actions = self.policy.decide(state)
        return self._decision(state, actions, live, counted_noticed)

    def _decision(
        self,
        state: FleetState,
        actions: list[Action],
        live: Sequence[PodInfo],
        counted_noticed: Mapping[ReplicaKind, int],
    ) -> Decision:
        names = {self._ids[p.name]: p.name for p in live}
        alive = {
            kind: {r.replica_id for r in state.replicas if r.kind is kind and not r.is_noticed}
            for kind in (ReplicaKind.SPOT, ReplicaKind.ON_DEMAND)
        }
        count = {kind: len(ids) for kind, ids in alive.items()}
        release: list[str] = []
        for a in actions:
            if isinstance(a, Launch) and a.kind in count:
                count[a.kind] += 1
            elif isinstance(a, Terminate):
                for kind, ids in alive.items():
                    if a.replica_id in ids:
                        count[kind] -= 1
                        release.append(names[a.replica_id])
        spot = max(0, count[ReplicaKind.SPOT]) + counted_noticed[ReplicaKind.SPOT]
        od_wanted = max(0, count[ReplicaKind.ON_DEMAND]) + counted_noticed[ReplicaKind.ON_DEMAND]
        od = min(od_wanted, self.spec.max_on_demand)
        return Decision(
            spot_replicas=spot,
            on_demand_replicas=od,
            release=tuple(release),
            actions=tuple(actions),
            events=state.events,
            state=state,
            capped=od_wanted > od,
            names=names,
        )


def observe_zones(
    decision: Decision,
    pods: Sequence[PodInfo],
    zone_of: Mapping[str, str],
    zones: Sequence[str],
    now_s: float,
    stockout_after_s: float,
) -> list[ZoneObservation]:
    """What one reconcile saw of each zone in ``zones``, for `spotstart.fleet.record`: our spot
    pods on a node there (by the node's zone label) and not under notice, deleting or done;
    the notices this step reported, in the zone of the noticed pod's node; and a spot pod
    unschedulable for ``stockout_after_s`` or longer, which marks every zone (the pods may go
    to any zone of the pool and the spread is ScheduleAnyway: none of them had a node). A node
    whose label names a zone not in ``zones`` counts nowhere."""
    by_name = {p.name: p for p in pods}
    alive = dict.fromkeys(zones, 0)
    notices = dict.fromkeys(zones, 0)
    stuck = False
    for p in pods:
        if p.kind is not ReplicaKind.SPOT:
            continue
        zone = zone_of.get(p.node, "") if p.node else ""
        gone = bool(p.notice) or p.node_shutdown or p.deleting_at_s is not None or p.finished
        if zone in alive and not gone:
            alive[zone] += 1
        since = p.unschedulable_since_s
        if not p.node and since is not None and now_s - since >= stockout_after_s:
            stuck = True
    for e in decision.events:
        if isinstance(e, Preempted):
            noticed = by_name.get(decision.names.get(e.replica_id, ""))
            if noticed is not None and noticed.kind is ReplicaKind.SPOT:
                zone = zone_of.get(noticed.node, "") if noticed.node else ""
                if zone in notices:
                    notices[zone] += 1
    return [ZoneObservation(z, alive[z], notices[z], stuck) for z in zones]
