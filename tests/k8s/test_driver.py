"""The cluster driver: pods -> the policy's view -> replica counts. The same-decisions test
runs one scenario through `spotstart plan`'s simulator and, tick by tick, shows the pods that
fleet would have to a second copy of the same policy through the cluster driver: both must
decide the same launches and the same releases (zones aside: in a cluster the scheduler
places)."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest

from spotstart.fleet.model import (
    Action,
    FleetSpec,
    FleetState,
    Launch,
    ReplicaKind,
    StartupPhases,
    Terminate,
    Zone,
)
from spotstart.fleet.policies import CalmRelease, make_policy
from spotstart.fleet.simulator import FleetPolicy, simulate
from spotstart.k8s.driver import ClusterDriver, ClusterSpec, PodInfo, pod_info

START = 1_800_000_000.0
ZONES = (Zone("zone-a", 1.0, 3.0), Zone("zone-b", 1.1, 3.0), Zone("zone-c", 0.9, 3.0))


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Recording:
    """A policy that remembers what it saw and said in each tick's first round."""

    def __init__(self, inner: FleetPolicy) -> None:
        self.inner = inner
        self.name = inner.name
        self.log: list[tuple[FleetState, list[Action]]] = []

    def decide(self, state: FleetState) -> list[Action]:
        actions = self.inner.decide(state)
        if state.round == 0:
            self.log.append((state, actions))
        return actions


def pods_of(state: FleetState) -> list[dict[str, Any]]:
    """The pods the simulated fleet would have at this tick."""
    out = []
    for r in state.replicas:
        kind = "spot" if r.kind is ReplicaKind.SPOT else "ondemand"
        meta: dict[str, Any] = {
            "name": f"r{r.replica_id:05d}",
            "creationTimestamp": rfc3339(START + r.launched_s),
            "labels": {"spotstart.dev/capacity": kind},
        }
        conditions = []
        if r.is_ready:
            conditions.append(
                {
                    "type": "Ready",
                    "status": "True",
                    "lastTransitionTime": rfc3339(START + r.ready_at_s),
                }
            )
        if r.is_noticed:
            assert r.ends_at_s is not None
            meta["annotations"] = {
                "spotstart.dev/notice": "preemption",
                "spotstart.dev/notice-deadline": rfc3339(START + r.ends_at_s),
            }
        out.append(
            {
                "metadata": meta,
                "spec": {"nodeName": f"node-{r.zone}"},
                "status": {"phase": "Running", "conditions": conditions},
            }
        )
    return out


def tally(
    actions: list[Action], names: dict[int, str] | None = None
) -> tuple[Counter[str], set[str]]:
    launches = Counter(a.kind.value for a in actions if isinstance(a, Launch))
    released = {
        (names[a.replica_id] if names is not None else f"r{a.replica_id:05d}")
        for a in actions
        if isinstance(a, Terminate)
    }
    return launches, released


SCENARIO = np.full((3, 48), 2, dtype=np.int64)
SCENARIO[0, 8:20] = 0  # zone a preempts us and stays out
SCENARIO[:, 24:30] = 0  # then every zone stocks out
SCENARIO[1, 36:40] = 1  # a partial dip later


@pytest.mark.parametrize(
    ("policy", "options"),
    [
        ("spread_fallback", {}),
        ("spothedge", {"num_extra": 1}),
        ("warm_hedge", {"calm_hours": 0.25}),
    ],
)
def test_the_simulator_and_the_cluster_driver_decide_the_same(
    policy: str, options: dict[str, Any]
) -> None:
    phases = StartupPhases(60.0, 30.0, 30.0)
    spec = FleetSpec(
        zones=ZONES,
        tick_seconds=60.0,
        spot_startup=phases,
        on_demand_startup=phases,
        preemption_notice_s=30.0,
        warm_start=False,  # a cluster starts cold too (and sees no within-tick retries)
    )
    recorded = Recording(CalmRelease(make_policy(policy, **options), calm_s=180.0))
    simulate(spec, SCENARIO, 3, recorded)
    driver = ClusterDriver(
        CalmRelease(make_policy(policy, **options), calm_s=180.0),
        ClusterSpec(
            zones=ZONES,
            spot_cold_start_s=phases.cold_start_s,
            on_demand_cold_start_s=phases.cold_start_s,
            preemption_notice_s=30.0,
        ),
        start_s=START,
    )
    zone_of = {f"node-{z.name}": z.name for z in ZONES}
    compared = decided = 0
    for state, actions in recorded.log:
        pods = [p for p in (pod_info(raw) for raw in pods_of(state)) if p is not None]
        decision = driver.step(START + state.now_s, state.target_replicas, pods, zone_of)
        # the driver rebuilt the simulator's view
        sim_view = {
            f"r{r.replica_id:05d}": (r.kind, r.is_ready, r.is_noticed, r.ready_at_s)
            for r in state.replicas
        }
        drv_view = {
            decision.names[r.replica_id]: (r.kind, r.is_ready, r.is_noticed, r.ready_at_s)
            for r in decision.state.replicas
        }
        assert drv_view == sim_view, f"tick {state.tick}"
        assert tally(list(decision.actions), dict(decision.names)) == tally(actions), (
            f"tick {state.tick}"
        )
        compared += 1
        decided += bool(actions)
    assert compared == SCENARIO.shape[1]
    assert decided >= 4  # the scenario made the policy act, not just hold


def info(**kw: Any) -> PodInfo:
    base: dict[str, Any] = {"name": "p", "kind": ReplicaKind.SPOT, "created_s": START}
    base.update(kw)
    return PodInfo(**base)


def test_pods_that_are_not_ours_or_carry_odd_labels_are_ignored() -> None:
    assert (
        pod_info({"metadata": {"name": "x", "labels": {"spotstart.dev/capacity": "../spot"}}})
        is None
    )
    assert pod_info({"metadata": {"labels": {"spotstart.dev/capacity": "spot"}}}) is None
    assert pod_info({"metadata": {"name": "x"}}) is None
    p = pod_info(
        {
            "metadata": {
                "name": "x",
                "labels": {"spotstart.dev/capacity": "ondemand"},
                "annotations": {"spotstart.dev/notice-deadline": "not a time"},
            },
            "status": {"phase": "Running", "conditions": "garbage"},
        }
    )
    assert p is not None and p.kind is ReplicaKind.ON_DEMAND and p.notice_deadline_s is None


def driver(**kw: Any) -> ClusterDriver:
    spec = ClusterSpec(zones=ZONES, **kw)
    return ClusterDriver(make_policy("spread_fallback"), spec, start_s=START)


def test_a_noticed_pod_is_replaced_at_the_notice_and_on_demand_covers_the_gap() -> None:
    zone_of = {"n-a": "zone-a", "n-b": "zone-b"}
    pods = [
        info(name="a", node="n-a", ready=True, notice="preemption", notice_deadline_s=START + 30),
        info(name="b", node="n-b", ready=True),
    ]
    d = driver().step(START + 60, 2, pods, zone_of)
    # the ReplicaSet still counts the noticed pod, so spot goes to 3 for one new pod
    assert (d.spot_replicas, d.on_demand_replicas) == (3, 1)
    assert "notice on a" in d.summary()


def test_a_deleting_pod_is_no_preemption_and_is_not_counted_by_the_replicaset() -> None:
    zone_of = {"n-a": "zone-a", "n-b": "zone-b"}
    pods = [
        info(name="a", node="n-a", ready=True, deleting_at_s=START + 30),
        info(name="b", node="n-b", ready=True),
    ]
    d = driver().step(START + 60, 2, pods, zone_of)
    assert (d.spot_replicas, d.on_demand_replicas) == (2, 1)
    assert not [e for e in d.events if type(e).__name__ == "Preempted"]


def test_on_demand_is_capped_and_says_so() -> None:
    pods = [info(name=f"s{i}", unschedulable_since_s=START) for i in range(3)]
    d = driver(max_on_demand=1, stockout_after_s=60).step(START + 600, 3, pods, {})
    assert d.on_demand_replicas == 1 and d.capped
    assert "capped at max_on_demand" in d.summary()
    # and the stuck pods were reported as failed launches once, not on every step
    drv = driver(stockout_after_s=60)
    first = drv.step(START + 600, 3, pods, {})
    again = drv.step(START + 610, 3, pods, {})
    assert len(first.events) == 3 and not again.events


def test_unscheduled_pods_are_counted_where_the_spread_would_put_them() -> None:
    zone_of = {"n-a": "zone-a"}
    pods = [
        info(name="a", node="n-a", ready=True),
        info(name="p1", created_s=START + 1),
        info(name="p2", created_s=START + 2),
    ]
    d = driver().step(START + 10, 3, pods, zone_of)
    zones = sorted(r.zone for r in d.state.replicas)
    assert zones == ["zone-a", "zone-b", "zone-c"]
