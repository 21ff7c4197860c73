"""The offline optimum: hand-computed values on small traces, and never above what a policy
pays for the same availability (hypothesis over random small traces, every policy)."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spotstart.fleet import (
    Action,
    FleetPolicy,
    FleetSpec,
    FleetState,
    Launch,
    ReplicaKind,
    StartupPhases,
    Terminate,
    Zone,
    build_config,
    simulate,
)
from spotstart.fleet.optimal import best_availability, offline_optimum
from spotstart.fleet.policies import POLICIES, CalmRelease, make_policy
from spotstart.fleet.sweep import plan_optimum, run_plan, versus_optimum

HOUR = 3600.0
HALF_HOUR = StartupPhases(provision_s=1200.0, image_pull_s=300.0, weight_load_s=300.0)


def hourly(
    zones: int, notice_s: float, *, on_demand: bool = True, committed_per_hour: float = 0.0
) -> FleetSpec:
    """1-hour ticks, spot 1.0/h, on-demand 3.0/h, 30-minute cold starts."""
    return FleetSpec(
        zones=tuple(Zone(n, 1.0, 3.0) for n in "abc"[:zones]),
        tick_seconds=HOUR,
        spot_startup=HALF_HOUR,
        on_demand_startup=HALF_HOUR,
        preemption_notice_s=notice_s,
        on_demand_available=on_demand,
        committed_per_hour=committed_per_hour,
    )


def test_spot_all_the_time_costs_spot_all_the_time() -> None:
    b = offline_optimum(hourly(1, 600.0), [[1, 1, 1, 1]], 1)
    assert (b.kind, b.method) == ("optimal", "milp")
    assert b.cost == pytest.approx(4.0)
    assert b.cost_relative == pytest.approx(4.0 / 12.0)
    assert b.availability == 1.0


def test_a_notice_as_long_as_the_cold_start_bridges_two_zones() -> None:
    # a serves [0, 2h) and its 30-minute notice; b launched at 2h is ready at 2.5h:
    # 2.5 h of a + 2 h of b
    b = offline_optimum(hourly(2, 1800.0), [[1, 1, 0, 0], [0, 0, 1, 1]], 1)
    assert b.cost == pytest.approx(4.5)


def test_a_short_notice_needs_on_demand_launched_an_hour_ahead() -> None:
    # with 10 minutes of notice the gap [2h10m, 2.5h) must be covered: on-demand launched at
    # 1h (ready 1.5h) until 3h, a released at 2h (no notice needed), b from 2h:
    # 2 h of a + 2 h x 3.0 on-demand + 2 h of b
    b = offline_optimum(hourly(2, 600.0), [[1, 1, 0, 0], [0, 0, 1, 1]], 1)
    assert b.cost == pytest.approx(10.0)


def test_the_outage_and_return_of_one_zone() -> None:
    # a up [0,2h), down [2h,4h), up again: on-demand [1h, 5h) bridges it, a relaunched at 4h
    b = offline_optimum(hourly(1, 600.0), [[1, 1, 0, 0, 1, 1]], 1)
    assert b.cost == pytest.approx(2.0 + 4 * 3.0 + 2.0)
    assert b.cost_per_tick is not None  # the schedule, tick by tick
    assert b.cost_per_tick.tolist() == pytest.approx([1.0, 4.0, 3.0, 3.0, 4.0, 1.0])


def test_committed_nodes_when_spot_never_comes() -> None:
    b = offline_optimum(hourly(1, 0.0, committed_per_hour=1.89), [[0, 0, 0, 0]], 1)
    assert b.cost == pytest.approx(4 * 1.89)
    assert b.cost_per_tick is not None
    assert b.cost_per_tick.tolist() == pytest.approx([1.89] * 4)


def test_without_on_demand_the_best_possible_is_what_spot_allows() -> None:
    s = hourly(1, 600.0, on_demand=False)
    cap = [[1, 1, 0, 1]]
    # [0, 2h) + the notice's 10 minutes + [3.5h, 4h) after the relaunch at 3h
    best = (2 * HOUR + 600.0 + 1800.0) / (4 * HOUR)
    assert best_availability(s, cap, 1) == pytest.approx(best)
    b = offline_optimum(s, cap, 1)
    assert b.availability == pytest.approx(best)
    assert b.cost == pytest.approx(2.0 + 600.0 / HOUR + 1.0)
    # a lower availability can be bought for less: skip the relaunch
    cheaper = offline_optimum(s, cap, 1, availability=(2 * HOUR + 600.0) / (4 * HOUR))
    assert cheaper.cost == pytest.approx(2.0 + 600.0 / HOUR)


def test_too_large_for_the_milp_gives_the_lp_relaxation_as_a_lower_bound() -> None:
    s = hourly(2, 600.0)
    cap = [[1, 1, 0, 0, 1, 1], [0, 1, 1, 0, 0, 1]]
    exact = offline_optimum(s, cap, 2)
    lp = offline_optimum(s, cap, 2, exact_max_variables=1)
    assert (lp.kind, lp.method) == ("lower_bound", "lp-relaxation")
    assert lp.label == "lower bound (lp-relaxation)"
    assert lp.cost <= exact.cost + 1e-9


def test_a_search_cut_short_still_gives_a_proven_lower_bound() -> None:
    rng = np.random.default_rng(7)
    s = replace(hourly(3, 600.0, on_demand=False), tick_seconds=600.0)
    cap = rng.integers(0, 3, size=(3, 400))
    share = 0.8 * best_availability(s, cap, 3)
    exact = offline_optimum(s, cap, 3, availability=share)
    cut = offline_optimum(s, cap, 3, availability=share, time_limit_s=1e-3)
    assert cut.kind == "lower_bound" and cut.method in ("milp-dual-bound", "lp-relaxation")
    assert cut.cost <= exact.cost + 1e-6
    assert cut.cost_per_tick is None  # no schedule to draw


def test_the_plan_reports_every_policy_against_the_optimum() -> None:
    doc = {
        "tick_seconds": 600,
        "startup": {"provision_seconds": 60, "image_pull_seconds": 30, "weight_load_seconds": 30},
        "target": {"replicas": 2},
        "zones": [
            {"name": f"z{i}", "synthetic": {"hours": 24, "mean_up_hours": 4, "seed": i}}
            for i in range(3)
        ],
    }
    plan = build_config(doc)
    bound = plan_optimum(plan)
    for run in run_plan(plan):
        v = versus_optimum(run, bound)
        assert v["x_optimal_cost"] == pytest.approx(run.cost / bound.cost)
        if run.availability >= bound.availability - 1e-12:
            assert v["x_optimal_cost"] >= 1 - 1e-9, run.policy  # no policy beats the oracle


# -- the bound never sits above a policy at the same availability ---------------------------


@st.composite
def fleets(draw: st.DrawFn) -> tuple[FleetSpec, np.ndarray, int]:
    zones = draw(st.integers(1, 3))
    ticks = draw(st.integers(2, 9))
    dt = 60.0
    cap = np.array(
        draw(
            st.lists(
                st.lists(st.integers(0, 2), min_size=ticks, max_size=ticks),
                min_size=zones,
                max_size=zones,
            )
        )
    )
    spot_cold = draw(st.sampled_from([0.0, 30.0, 60.0, 90.0, 150.0]))
    od_cold = spot_cold + draw(st.sampled_from([0.0, 20.0, 60.0]))
    spec = FleetSpec(
        zones=tuple(
            Zone(f"z{i}", draw(st.sampled_from([0.5, 1.0, 1.3])), 3.0) for i in range(zones)
        ),
        tick_seconds=dt,
        spot_startup=StartupPhases(spot_cold, 0.0, 0.0),
        on_demand_startup=StartupPhases(od_cold, 0.0, 0.0),
        preemption_notice_s=draw(st.sampled_from([0.0, 30.0, 60.0, 100.0])),
        on_demand_available=draw(st.booleans()),
        committed_per_hour=draw(st.sampled_from([0.0, 1.89])),
        warm_start=draw(st.booleans()),
    )
    return spec, cap, draw(st.integers(1, 3))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fleets())
def test_no_policy_pays_less_than_the_bound_for_its_availability(
    fleet: tuple[FleetSpec, np.ndarray, int],
) -> None:
    spec, cap, target = fleet
    best = best_availability(spec, cap, target)
    for name in POLICIES:
        options = {"calm_hours": 0.01} if name == "warm_hedge" else {}
        committed = 1 if name == "committed_burst" and spec.committed_per_hour > 0 else 0
        s = replace(spec, committed_replicas=committed)
        run = simulate(s, cap, target, make_policy(name, **options))
        assert run.availability <= best + 1e-9, name
        bound = offline_optimum(s, cap, target, availability=run.availability)
        assert bound.kind == "optimal"
        assert bound.cost <= run.cost + 1e-6 * max(1.0, run.cost), (name, bound, run.summary())


class RandomPolicy:
    """Any schedule at all: random launches of every kind and random releases, so the bound
    is held against schedules no sensible policy would pick."""

    name = "random"

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def decide(self, state: FleetState) -> list[Action]:
        if state.round > 0:
            return []
        actions: list[Action] = []
        zones = [z.name for z in state.zones]
        for r in state.replicas:
            if self.rng.random() < 0.2:
                actions.append(Terminate(r.replica_id))
        for _ in range(self.rng.randint(0, 2)):
            kind = self.rng.choice(list(ReplicaKind))
            actions.append(Launch(kind, tuple(self.rng.sample(zones, len(zones)))))
        return actions


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fleets(), st.integers(0, 2**16))
def test_no_schedule_at_all_pays_less_than_the_bound_for_its_availability(
    fleet: tuple[FleetSpec, np.ndarray, int], seed: int
) -> None:
    spec, cap, target = fleet
    s = replace(spec, committed_replicas=seed % 3)
    run = simulate(s, cap, target, RandomPolicy(seed))
    assert run.availability <= best_availability(s, cap, target) + 1e-9
    bound = offline_optimum(s, cap, target, availability=run.availability)
    assert bound.cost <= run.cost + 1e-6 * max(1.0, run.cost), (bound, run.summary())


# -- the simulator's skipping of quiet ticks changes nothing ---------------------------------


@settings(max_examples=40, deadline=None)
@given(fleets(), st.integers(0, 2))
def test_skipping_quiet_ticks_gives_the_exhaustive_replay(
    fleet: tuple[FleetSpec, np.ndarray, int], repeat: int
) -> None:
    spec, cap, target = fleet
    cap = np.repeat(cap, 1 + 10 * repeat, axis=1)  # long quiet stretches
    for name in POLICIES:
        for wrap in (False, True):
            options = {"calm_hours": 0.2} if name == "warm_hedge" else {}

            def policy(name: str = name, wrap: bool = wrap, opts: dict = options) -> FleetPolicy:  # type: ignore[type-arg]
                p = make_policy(name, **opts)
                return CalmRelease(p, 150.0) if wrap else p

            fast = simulate(spec, cap, target, policy())
            slow = simulate(spec, cap, target, policy(), exhaustive=True)
            for key, value in slow.summary().items():
                got = fast.summary()[key]
                if isinstance(value, float):
                    assert math.isclose(got, value, rel_tol=1e-9, abs_tol=1e-6), (name, key)
                else:
                    assert got == value, (name, key)
            np.testing.assert_allclose(fast.ready_replicas, slow.ready_replicas, atol=1e-9)
            np.testing.assert_allclose(fast.cost_per_tick, slow.cost_per_tick, atol=1e-9)


def test_a_presolve_optimum_its_own_relaxation_beats_is_solved_again() -> None:
    """HiGHS's presolve (scipy 1.17) called 0.0083 optimal here, where a free committed node
    keeps everything covered at no cost (hypothesis found it)."""
    phases = StartupPhases(provision_s=60.0, image_pull_s=0.0, weight_load_s=0.0)
    spec = FleetSpec(
        zones=(Zone("z0", 0.5, 3.0), Zone("z1", 0.5, 3.0)),
        tick_seconds=60.0,
        spot_startup=phases,
        on_demand_startup=phases,
        preemption_notice_s=30.0,
        on_demand_available=False,
        committed_replicas=1,
        committed_per_hour=0.0,
    )
    bound = offline_optimum(spec, [[0, 0, 0, 2], [0, 0, 2, 1]], 1, availability=0.0)
    assert bound.kind == "optimal" and bound.cost == 0.0, bound
    best = offline_optimum(spec, [[0, 0, 0, 2], [0, 0, 2, 1]], 1)
    assert best.availability == 1.0 and best.cost == 0.0, best
