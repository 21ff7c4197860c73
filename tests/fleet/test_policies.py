"""Simulator invariants over random traces (hypothesis) and the policies' decisions."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spotstart.fleet import (
    FleetSpec,
    FleetState,
    Launch,
    ReplicaKind,
    StartupPhases,
    Zone,
    make_policy,
    simulate,
)
from spotstart.fleet.errors import ConfigError
from spotstart.fleet.model import Phase, Preempted, ReplicaView
from spotstart.fleet.policies import POLICIES, SpotHedge, SpotSpread, WarmHedge

INSTANT = StartupPhases(0.0, 0.0, 0.0)
DEFAULT = StartupPhases()


@st.composite
def traces(draw: st.DrawFn, max_zones: int = 4) -> np.ndarray:
    zones = draw(st.integers(1, max_zones))
    ticks = draw(st.integers(1, 30))
    flat = draw(st.lists(st.integers(0, 3), min_size=zones * ticks, max_size=zones * ticks))
    return np.array(flat, dtype=np.int64).reshape(zones, ticks)


def make_spec(
    n_zones: int, startup: StartupPhases = DEFAULT, notice: float = 60.0, committed: int = 0
) -> FleetSpec:
    zones = tuple(Zone(f"z{i}", 1.0 + 0.1 * i, 3.0 + 0.5 * i) for i in range(n_zones))
    return FleetSpec(
        zones=zones,
        tick_seconds=60.0,
        spot_startup=startup,
        on_demand_startup=startup,
        preemption_notice_s=notice,
        committed_replicas=committed,
        committed_per_hour=2.0,
    )


@settings(max_examples=40, deadline=None)
@given(cap=traces(), target=st.integers(1, 4))
def test_on_demand_only_gives_full_availability_at_cost_one(cap: np.ndarray, target: int) -> None:
    run = simulate(make_spec(cap.shape[0]), cap, target, make_policy("on_demand"))
    assert run.availability == 1.0
    assert run.cost_relative == pytest.approx(1.0)


@settings(max_examples=25, deadline=None)
@given(
    cap=traces(),
    target=st.integers(1, 4),
    name=st.sampled_from(sorted(POLICIES)),
    cold=st.sampled_from([0.0, 30.0, 120.0, 600.0]),
)
def test_every_policy_keeps_the_books_consistent(
    cap: np.ndarray, target: int, name: str, cold: float
) -> None:
    committed = 1 if name == "committed_burst" else 0
    spec = make_spec(cap.shape[0], StartupPhases(cold, 0.0, 0.0), committed=committed)
    run = simulate(spec, cap, target, make_policy(name))
    assert 0.0 <= run.availability <= 1.0
    assert run.cost >= run.spot_cost - 1e-12  # never cheaper than its spot-only part
    assert run.cost == pytest.approx(run.spot_cost + run.on_demand_cost + run.committed_cost)
    assert run.time_below_target_s == pytest.approx(run.horizon_s * (1 - run.availability))
    assert (run.ready_replicas >= -1e-9).all()
    assert run.cost_per_tick.sum() == pytest.approx(run.cost)
    # spot replica-hours never exceed the capacity the trace offered, plus notice periods
    offered_s = cap.sum() * 60.0 + run.preemptions * spec.preemption_notice_s
    assert run.spot_replica_hours <= offered_s / 3600.0 + 1e-9


@settings(max_examples=60, deadline=None)
@given(cap=traces(max_zones=5), target=st.integers(1, 5), extra=traces(max_zones=3))
def test_more_zones_never_lower_spread_availability_with_instant_startup(
    cap: np.ndarray, target: int, extra: np.ndarray
) -> None:
    ticks = min(cap.shape[1], extra.shape[1])
    base, more = cap[:, :ticks], np.vstack([cap[:, :ticks], extra[:, :ticks]])
    few = simulate(make_spec(base.shape[0], INSTANT, 0.0), base, target, SpotSpread())
    many = simulate(make_spec(more.shape[0], INSTANT, 0.0), more, target, SpotSpread())
    assert many.availability >= few.availability
    # and with instant startup it is exactly the share of ticks with enough total capacity
    assert few.availability == pytest.approx(float((base.sum(0) >= target).mean()))


def state(replicas: tuple[ReplicaView, ...] = (), **kw: object) -> FleetState:
    base = dict(
        tick=5,
        now_s=300.0,
        tick_seconds=60.0,
        target_replicas=2,
        zones=(Zone("a", 1.0, 3.0), Zone("b", 0.5, 3.0), Zone("c", 1.0, 3.0)),
        replicas=replicas,
        spot_cold_start_s=600.0,
        on_demand_cold_start_s=600.0,
        preemption_notice_s=120.0,
    )
    base.update(kw)
    return FleetState(**base)  # type: ignore[arg-type]


def spot(rid: int, zone: str, phase: Phase = Phase.READY) -> ReplicaView:
    return ReplicaView(rid, ReplicaKind.SPOT, zone, 0.0, 0.0, phase)


def test_spothedge_overprovisions_and_prefers_cheap_unused_active_zones() -> None:
    actions = SpotHedge(num_extra=1).decide(state())
    spots = [a for a in actions if isinstance(a, Launch) and a.kind is ReplicaKind.SPOT]
    assert len(spots) == 3
    assert spots[0].zones == ("b",)  # the cheapest
    assert {a.zones[0] for a in spots} == {"a", "b", "c"}
    ods = [a for a in actions if isinstance(a, Launch) and a.kind is ReplicaKind.ON_DEMAND]
    assert len(ods) == 2  # no ready spot yet: fallback covers the whole target


def test_spothedge_moves_a_zone_to_preempted_and_resets_when_all_are() -> None:
    hedge = SpotHedge(num_extra=0)
    hedge.decide(state(replicas=(spot(1, "a"), spot(2, "c"))))
    hedge.decide(state(replicas=(spot(2, "c"),), events=(Preempted(1, "a", 300.0),)))
    assert hedge.status["a"] == "preempted"
    for z in ("b", "c"):
        hedge.status[z] = "preempted"
    hedge._select_zone(state(), [])
    assert set(hedge.status.values()) == {"active"}


def test_warm_hedge_holds_no_spare_when_the_notice_covers_the_cold_start() -> None:
    policy = WarmHedge(calm_hours=None)
    assert policy.spares(state(spot_cold_start_s=120.0)) == 0
    assert policy.spares(state(spot_cold_start_s=600.0)) == 1


def test_warm_hedge_drops_its_spare_after_calm_hours_without_preemption() -> None:
    policy = WarmHedge(calm_hours=1.0)
    assert policy.spares(state()) == 0  # nothing preempted yet
    policy.decide(state(events=(Preempted(1, "a", 300.0),)))
    assert policy.spares(state(now_s=300.0 + 3599)) == 1
    assert policy.spares(state(now_s=300.0 + 3601)) == 0


def test_warm_hedge_skips_on_demand_that_would_arrive_after_starting_spot() -> None:
    starting = ReplicaView(3, ReplicaKind.SPOT, "a", 200.0, 320.0, Phase.PROVISIONING)
    actions = WarmHedge(num_extra=0).decide(state(replicas=(spot(1, "b"), starting)))
    assert actions == []


def test_spread_prefers_the_emptiest_zone() -> None:
    actions = SpotSpread().decide(state(replicas=(spot(1, "a"),)))
    assert actions == [Launch(ReplicaKind.SPOT, ("b", "c", "a"))]


def test_unknown_policy_and_bad_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown"):
        make_policy("cheapest")
    with pytest.raises(ConfigError, match="bad options"):
        make_policy("spothedge", n_extra=1)
