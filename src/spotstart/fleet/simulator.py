"""Discrete-time replay of one fleet policy against a spot-capacity trace. Pure: arrays and
a policy in, a `FleetRun` out; no files, no clocks.

Time model (all times in seconds since the start, tick ``t`` covers ``[t*dt, (t+1)*dt)``):

* Capacity ``cap[z, t]`` is how many spot nodes zone ``z`` grants during tick ``t``. When our
  live spot replicas in ``z`` exceed it at the start of a tick, the excess (not-yet-ready first,
  then newest first) get a preemption notice and keep their node (and serve, if ready) for
  ``preemption_notice_s`` more seconds. The trace says *when* capacity went away; the notice is
  the cloud's documented warning (AWS 120 s, GCP 30 s).
* Decisions happen at tick starts. A policy may act several rounds per tick: a launch that found
  no capacity is reported at once and the policy may try elsewhere (a provisioner's failover
  takes seconds, far less than a 195 s tick).
* A replica is billed from its launch to its end, per second; it serves from
  ``launch + cold start`` to its end. Availability is the exact share of time with at least
  ``target`` replicas serving, computed inside each tick (cold starts need not align to ticks).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

from spotstart.fleet.model import (
    Action,
    BecameReady,
    Event,
    FleetSpec,
    FleetState,
    Launched,
    LaunchFailed,
    Phase,
    Preempted,
    ReplicaKind,
    ReplicaView,
    StartupPhases,
    Terminate,
)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


class FleetPolicy(Protocol):
    """The one interface every fleet policy implements (see `spotstart.fleet.policies`).

    A policy may also define ``quiet_until(state) -> float``: having just returned no actions
    for ``state`` (which held no events), the earliest time its answer could change while no
    event arrives, no replica changes phase and the target stays (``math.inf``: never). The
    simulator then skips the ticks in between, which is where most of a long trace's time
    goes. Early is always safe; late changes results. Without it, every tick is asked.
    """

    name: str

    def decide(self, state: FleetState) -> list[Action]:
        """Return the launches and terminations to apply now; ``[]`` to do nothing."""
        ...


@dataclass(frozen=True, eq=False)
class FleetRun:
    """The outcome of one policy on one trace. Costs are in the config's currency; relative cost
    is against holding exactly ``target`` replicas on the cheapest on-demand price."""

    policy: str
    horizon_s: float
    availability: float
    time_below_target_s: float
    cost: float
    reference_cost: float
    spot_cost: float
    on_demand_cost: float
    committed_cost: float
    spot_replica_hours: float
    on_demand_replica_hours: float
    committed_replica_hours: float
    preemptions: int
    launch_failures: int
    ready_replicas: FloatArray  # time-averaged serving replicas per tick
    target_replicas: IntArray
    cost_per_tick: FloatArray

    @property
    def cost_relative(self) -> float:
        return self.cost / self.reference_cost if self.reference_cost > 0 else math.inf

    def summary(self) -> dict[str, Any]:
        """The scalar results, JSON-ready."""
        return {
            "policy": self.policy,
            "availability": self.availability,
            "cost_relative": self.cost_relative,
            "cost": self.cost,
            "reference_cost": self.reference_cost,
            "spot_cost": self.spot_cost,
            "on_demand_cost": self.on_demand_cost,
            "committed_cost": self.committed_cost,
            "spot_replica_hours": self.spot_replica_hours,
            "on_demand_replica_hours": self.on_demand_replica_hours,
            "committed_replica_hours": self.committed_replica_hours,
            "preemptions": self.preemptions,
            "launch_failures": self.launch_failures,
            "time_below_target_s": self.time_below_target_s,
            "horizon_s": self.horizon_s,
        }


class _Replica:
    __slots__ = (
        "end_s",
        "kind",
        "launched_s",
        "noticed",
        "pull_at_s",
        "ready_at_s",
        "ready_reported",
        "rid",
        "view",
        "weights_at_s",
        "zone",
    )

    def __init__(
        self, rid: int, kind: ReplicaKind, zone: int, launched_s: float, phases: StartupPhases
    ) -> None:
        self.rid = rid
        self.kind = kind
        self.zone = zone
        self.launched_s = launched_s
        self.pull_at_s = launched_s + phases.provision_s
        self.weights_at_s = self.pull_at_s + phases.image_pull_s
        self.ready_at_s = self.weights_at_s + phases.weight_load_s
        self.end_s = math.inf
        self.noticed = False
        self.ready_reported = False
        self.view: ReplicaView | None = None

    def as_view(self, now_s: float, zone_name: str) -> ReplicaView:
        """The policy's view, rebuilt only when the phase changed (most ticks it does not)."""
        phase = self.phase(now_s)
        if self.view is None or self.view.phase is not phase:
            self.view = ReplicaView(
                self.rid,
                self.kind,
                zone_name,
                self.launched_s,
                self.ready_at_s,
                phase,
                self.end_s if self.noticed else None,
            )
        return self.view

    def phase(self, now_s: float) -> Phase:
        if self.noticed:
            return Phase.NOTICED
        if now_s >= self.ready_at_s:
            return Phase.READY
        if now_s >= self.weights_at_s:
            return Phase.WEIGHT_LOAD
        if now_s >= self.pull_at_s:
            return Phase.IMAGE_PULL
        return Phase.PROVISIONING


def _covered_seconds(
    full: int, partial: list[tuple[float, float]], need: int, t0: float, t1: float
) -> float:
    """Seconds of [t0, t1) during which at least ``need`` intervals overlap."""
    if need <= full:
        return t1 - t0
    if full + len(partial) < need:
        return 0.0
    edges: list[tuple[float, int]] = []
    for a, b in partial:
        edges.append((a, 1))
        edges.append((b, -1))
    edges.sort()
    count = full
    covered = 0.0
    last = t0
    for time_s, delta in edges:
        if count >= need:
            covered += time_s - last
        last = time_s
        count += delta
    if count >= need:
        covered += t1 - last
    return covered


def capacity_and_target(
    spec: FleetSpec, capacity: npt.ArrayLike, target: npt.ArrayLike | int
) -> tuple[IntArray, IntArray]:
    """The (zones x ticks) capacity and the per-tick target as int arrays, shapes checked."""
    cap: IntArray = np.asarray(capacity, dtype=np.int64)
    if cap.ndim != 2 or cap.shape[0] != len(spec.zones):
        raise ValueError(f"capacity must be (zones={len(spec.zones)}, ticks), got {cap.shape}")
    n_ticks = cap.shape[1]
    tgt: IntArray = (
        np.full(n_ticks, int(target), dtype=np.int64)
        if isinstance(target, int)
        else np.asarray(target, dtype=np.int64)
    )
    if tgt.shape != (n_ticks,):
        raise ValueError(f"target must have {n_ticks} ticks, got {tgt.shape}")
    return cap, tgt


class _Tick(NamedTuple):
    cost: float
    served: float
    covered: float
    spot_s: float
    spot_cost: float
    od_s: float
    od_cost: float
    committed_s: float


def _account(
    live: list[_Replica],
    t0: float,
    t1: float,
    need: int,
    spot_price: list[float],
    od_price: list[float],
    committed_cost: float,
) -> _Tick:
    """Billing and serving of ``live`` over [t0, t1)."""
    dt = t1 - t0
    full = 0
    partial: list[tuple[float, float]] = []
    served = 0.0
    tick_cost = committed_cost
    spot_s = od_s = committed_s = spot_cost = od_cost = 0.0
    for r in live:
        end = r.end_s
        if r.ready_at_s <= t0 and end >= t1 and r.launched_s <= t0:
            # the common case: up and serving all tick
            billed = dt
            served += dt
            full += 1
        else:
            a = r.launched_s if r.launched_s > t0 else t0
            b = end if end < t1 else t1
            billed = b - a if b > a else 0.0
            ra = r.ready_at_s if r.ready_at_s > t0 else t0
            if b > ra:
                served += b - ra
                partial.append((ra, b))
        if billed > 0.0:
            kind = r.kind
            if kind is ReplicaKind.SPOT:
                spot_s += billed
                c = billed * spot_price[r.zone]
                spot_cost += c
                tick_cost += c
            elif kind is ReplicaKind.ON_DEMAND:
                od_s += billed
                c = billed * od_price[r.zone]
                od_cost += c
                tick_cost += c
            else:
                committed_s += billed
    covered = _covered_seconds(full, partial, need, t0, t1)
    return _Tick(tick_cost, served, covered, spot_s, spot_cost, od_s, od_cost, committed_s)


def simulate(
    spec: FleetSpec,
    capacity: npt.ArrayLike,
    target: npt.ArrayLike | int,
    policy: FleetPolicy,
    *,
    max_rounds: int | None = None,
    exhaustive: bool = False,
) -> FleetRun:
    """Replay ``policy`` over ``capacity`` (zones x ticks, spot nodes obtainable).

    Ticks in which nothing can happen are accounted in bulk when the policy says when it may
    act next (``quiet_until``); ``exhaustive=True`` asks it every tick instead (the same
    result: the tests hold the two to it).

    Example::

        spec = FleetSpec(zones=(Zone("a", 1.0, 3.0),), tick_seconds=60)
        run = simulate(spec, [[1, 1, 0, 1]], 1, SpotSpread())
        run.availability, run.cost_relative
    """
    cap, tgt = capacity_and_target(spec, capacity, target)
    n_ticks = cap.shape[1]
    dt = float(spec.tick_seconds)
    zone_index = {z.name: i for i, z in enumerate(spec.zones)}
    zone_names = [z.name for z in spec.zones]
    spot_price = [z.spot_per_hour / 3600.0 for z in spec.zones]
    od_price = [z.on_demand_per_hour / 3600.0 for z in spec.zones]
    notice = float(spec.preemption_notice_s)
    rounds = max_rounds if max_rounds is not None else len(spec.zones) + 2
    spot_cold = spec.spot_startup.cold_start_s
    od_cold = spec.on_demand_startup.cold_start_s
    committed_per_s = spec.committed_replicas * spec.committed_per_hour / 3600.0

    cap_rows: list[list[int]] = cap.T.tolist()  # python ints: numpy scalars are slow here
    tgt_list: list[int] = tgt.tolist()
    live: list[_Replica] = []
    next_id = 0
    pending: list[Event] = []
    ready_series = np.zeros(n_ticks)
    cost_series = np.zeros(n_ticks)
    covered_total = 0.0
    spot_s = od_s = committed_s = 0.0
    spot_cost = od_cost = 0.0
    preemptions = launch_failures = 0
    spot_in_zone = [0] * len(spec.zones)  # live, un-noticed spot replicas per zone

    quiet_until = None if exhaustive else getattr(policy, "quiet_until", None)
    below: dict[tuple[int, int], list[int]] = {}  # (zone, k): ticks where cap < k
    target_changes: list[int] = (np.flatnonzero(np.diff(tgt) != 0) + 1).tolist()

    def next_wake(t: int, state: FleetState) -> int:
        """The first tick after ``t`` at which anything can happen (see quiet_until)."""
        assert quiet_until is not None
        q = float(quiet_until(state))
        wake = n_ticks if q == math.inf else max(t + 1, math.ceil(q / dt - 1e-9))
        for z, k in enumerate(spot_in_zone):
            if k > 0:
                ticks = below.get((z, k))
                if ticks is None:
                    ticks = below[(z, k)] = np.flatnonzero(cap[z] < k).tolist()
                i = bisect.bisect_right(ticks, t)
                if i < len(ticks) and ticks[i] < wake:
                    wake = ticks[i]
        i = bisect.bisect_right(target_changes, t)
        if i < len(target_changes) and target_changes[i] < wake:
            wake = target_changes[i]
        t0 = t * dt
        for r in live:
            for x in (r.pull_at_s, r.weights_at_s, r.ready_at_s, r.end_s):
                if x > t0 and x != math.inf:
                    k = int(x // dt)
                    k = k if k > t else t + 1
                    if k < wake:
                        wake = k
        return wake

    t = 0
    while t < n_ticks:
        t0 = t * dt
        t1 = t0 + dt
        cap_t = cap_rows[t]
        quiet = False
        need = tgt_list[t]
        events: list[Event] = pending
        pending = []
        # capacity shrank below our spot replicas: notice the excess
        for z, have in enumerate(spot_in_zone):
            excess = have - cap_t[z]
            if excess <= 0:
                continue
            victims = [
                r for r in live if r.zone == z and r.kind is ReplicaKind.SPOT and not r.noticed
            ]
            victims.sort(key=lambda r: (r.ready_at_s <= t0, -r.launched_s, -r.rid))
            for r in victims[:excess]:
                r.noticed = True
                r.end_s = min(r.end_s, t0 + notice)
                preemptions += 1
                events.append(Preempted(r.rid, spec.zones[z].name, r.end_s))
            spot_in_zone[z] -= excess
        for r in live:
            if not r.ready_reported and r.ready_at_s <= t0 and r.ready_at_s < r.end_s:
                r.ready_reported = True
                events.append(BecameReady(r.rid, spec.zones[r.zone].name))

        for round_no in range(rounds):
            state = FleetState(
                tick=t,
                now_s=t0,
                tick_seconds=dt,
                target_replicas=need,
                zones=spec.zones,
                replicas=tuple(r.as_view(t0, zone_names[r.zone]) for r in live),
                events=tuple(events),
                spot_cold_start_s=spot_cold,
                on_demand_cold_start_s=od_cold,
                preemption_notice_s=notice,
                committed_replicas=spec.committed_replicas,
                on_demand_available=spec.on_demand_available,
                round=round_no,
            )
            actions = policy.decide(state)
            if not actions:
                pending = []  # the policy has seen them
                quiet = round_no == 0 and not state.events and quiet_until is not None
                break
            events = []
            failed = False
            for action in actions:
                if isinstance(action, Terminate):
                    for r in live:
                        if r.rid == action.replica_id and r.end_s > t0:
                            if r.kind is ReplicaKind.SPOT and not r.noticed:
                                spot_in_zone[r.zone] -= 1
                            r.noticed = r.noticed or r.kind is ReplicaKind.SPOT
                            r.end_s = t0
                    continue
                placed = -1
                if action.kind is ReplicaKind.SPOT:
                    for name in action.zones:
                        z = zone_index[name]
                        if spot_in_zone[z] < cap_t[z]:
                            placed = z
                            break
                elif action.kind is ReplicaKind.ON_DEMAND:
                    if spec.on_demand_available:
                        placed = zone_index[action.zones[0]] if action.zones else 0
                else:
                    used = sum(1 for r in live if r.kind is ReplicaKind.COMMITTED and r.end_s > t0)
                    if used < spec.committed_replicas:
                        placed = zone_index[action.zones[0]] if action.zones else 0
                if placed < 0:
                    failed = True
                    launch_failures += 1
                    events.append(LaunchFailed(action.kind, action.zones))
                    continue
                phases = (
                    spec.spot_startup
                    if action.kind is ReplicaKind.SPOT
                    else (spec.on_demand_startup)
                )
                if t == 0 and spec.warm_start:
                    phases = StartupPhases(0.0, 0.0, 0.0)
                rep = _Replica(next_id, action.kind, placed, t0, phases)
                next_id += 1
                live.append(rep)
                if action.kind is ReplicaKind.SPOT:
                    spot_in_zone[placed] += 1
                events.append(Launched(rep.rid, action.kind, spec.zones[placed].name))
            live = [r for r in live if r.end_s > t0]
            pending = events
            # warm start: let the policy see its t=0 fleet ready and trim it before billing
            if not failed and not (t == 0 and spec.warm_start):
                break

        # account for [t0, t1)
        tick = _account(live, t0, t1, need, spot_price, od_price, committed_per_s * dt)
        skipped = 0
        if quiet:
            # nothing changes before the wake tick: every tick in between bills and serves
            # exactly as the next one does
            wake = min(next_wake(t, state), n_ticks)
            if wake > t + 1:
                rest = _account(
                    live, t1, t1 + dt, tgt_list[t + 1], spot_price, od_price, committed_per_s * dt
                )
                skipped = wake - t - 1
                ready_series[t + 1 : wake] = rest.served / dt
                cost_series[t + 1 : wake] = rest.cost
                covered_total += rest.covered * skipped
                spot_s += rest.spot_s * skipped
                spot_cost += rest.spot_cost * skipped
                od_s += rest.od_s * skipped
                od_cost += rest.od_cost * skipped
                committed_s += rest.committed_s * skipped
        covered_total += tick.covered
        spot_s += tick.spot_s
        spot_cost += tick.spot_cost
        od_s += tick.od_s
        od_cost += tick.od_cost
        committed_s += tick.committed_s
        ready_series[t] = tick.served / dt
        cost_series[t] = tick.cost
        t += 1 + skipped
        t_end = t * dt
        if any(r.end_s <= t_end for r in live):
            live = [r for r in live if r.end_s > t_end]

    horizon = n_ticks * dt
    reference = float(tgt.sum()) * dt * spec.reference_on_demand_per_hour / 3600.0
    committed_cost = committed_per_s * horizon
    return FleetRun(
        policy=policy.name,
        horizon_s=horizon,
        availability=covered_total / horizon if horizon > 0 else 1.0,
        time_below_target_s=horizon - covered_total,
        cost=spot_cost + od_cost + committed_cost,
        reference_cost=reference,
        spot_cost=spot_cost,
        on_demand_cost=od_cost,
        committed_cost=committed_cost,
        spot_replica_hours=spot_s / 3600.0,
        on_demand_replica_hours=od_s / 3600.0,
        committed_replica_hours=committed_s / 3600.0,
        preemptions=preemptions,
        launch_failures=launch_failures,
        ready_replicas=ready_series,
        target_replicas=tgt,
        cost_per_tick=cost_series,
    )
