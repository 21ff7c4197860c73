"""Out-of-sample tuning: parameters come from the training window only, the rule picks what it
says, and warm_hedge's tunable parts (committed base, packing by a learnt zone rank) work."""

from __future__ import annotations

import numpy as np
import pytest

from spotstart.fleet import FleetSpec, PlanConfig, StartupPhases, Zone, simulate
from spotstart.fleet.errors import ConfigError
from spotstart.fleet.policies import WarmHedge
from spotstart.fleet.sweep import plan_optimum, run_policy, versus_optimum
from spotstart.fleet.tuning import (
    choose,
    grid_options,
    rank_zones,
    time_split,
    tune_out_of_sample,
)

TWO_MIN = StartupPhases(60.0, 30.0, 30.0)


def plan(cap: np.ndarray, target: int = 3, notice_s: float = 120.0) -> PlanConfig:
    spec = FleetSpec(
        zones=tuple(Zone(f"z{i}", 1.0, 3.0) for i in range(cap.shape[0])),
        tick_seconds=300.0,
        spot_startup=TWO_MIN,
        on_demand_startup=TWO_MIN,
        preemption_notice_s=notice_s,
        committed_per_hour=1.89,
    )
    n = cap.shape[1]
    return PlanConfig(spec, cap, np.full(n, target, dtype=np.int64), (("warm_hedge", {}),))


def test_a_time_split_keeps_every_tick_once_and_in_order() -> None:
    p = plan(np.arange(20).reshape(2, 10) % 3)
    train, test = time_split(p, 0.3)
    assert train.capacity.tolist() == p.capacity[:, :3].tolist()
    assert test.capacity.tolist() == p.capacity[:, 3:].tolist()
    assert len(train.target) + len(test.target) == 10
    with pytest.raises(ConfigError, match="leaves no ticks"):
        time_split(p, 0.01)
    with pytest.raises(ConfigError, match="outside"):
        p.window(5, 11)


def test_zones_are_ranked_by_uptime_then_fewest_drops() -> None:
    cap = np.array(
        [
            [1, 0, 1, 0, 1, 1],  # up 4/6, two drops
            [2, 1, 2, 1, 2, 1],  # up 6/6, three drops
            [1, 1, 1, 1, 1, 1],  # up 6/6, none
            [0, 0, 1, 1, 1, 1],  # up 4/6, none
        ]
    )
    assert rank_zones(plan(cap)) == ("z2", "z1", "z3", "z0")


def test_grid_options_drop_committed_counts_above_the_target() -> None:
    opts = grid_options({"committed_replicas": (0, 1, 2, 3), "pack": (False, True)}, 2)
    assert len(opts) == 6 and max(o["committed_replicas"] for o in opts) == 2


def test_no_spot_at_all_buys_committed_for_the_whole_target() -> None:
    p = plan(np.zeros((2, 40), dtype=np.int64))
    opts, run, optimum = choose(p, "warm_hedge", grid_options({"committed_replicas": (0, 3)}, 3))
    assert opts["committed_replicas"] == 3
    assert run.availability == 1.0
    assert run.cost == pytest.approx(optimum.cost)  # committed all the time is the optimum


def test_plenty_of_spot_buys_no_committed() -> None:
    p = plan(np.full((3, 40), 2, dtype=np.int64))
    opts, run, _ = choose(p, "warm_hedge", grid_options({"committed_replicas": (0, 1, 3)}, 3))
    assert opts["committed_replicas"] == 0
    assert run.spot_replica_hours > 0 and run.committed_replica_hours == 0


def test_tuning_sees_the_training_window_only() -> None:
    # no spot at all in the first half, plenty in the second: what the first half teaches
    # (buy committed) is wrong for the second, and the report shows it
    cap = np.zeros((2, 80), dtype=np.int64)
    cap[:, 40:] = 3
    tuned, test_optimum = tune_out_of_sample(plan(cap))
    assert tuned.train_ticks == (0, 40) and tuned.test_ticks == (40, 80)
    assert tuned.options["committed_replicas"] == 3
    assert tuned.test.committed_replica_hours > 0
    assert versus_optimum(tuned.test, test_optimum)["x_optimal_cost"] > 1.5
    assert "chosen on ticks 0-40" in tuned.describe()


def test_warm_hedge_runs_its_base_on_committed_nodes() -> None:
    p = plan(np.full((2, 20), 1, dtype=np.int64))
    run = run_policy(p, "warm_hedge", {"committed_replicas": 1})
    assert run.availability == 1.0
    hours = 20 * 300 / 3600
    assert run.committed_replica_hours == pytest.approx(hours)
    assert run.spot_replica_hours == pytest.approx(2 * hours)
    assert run.on_demand_replica_hours == 0


def test_packing_by_rank_keeps_the_fleet_in_the_trusted_zone() -> None:
    # z0 loses all capacity at tick 5; z1 keeps three nodes throughout
    cap = np.array([[3] * 5 + [0] * 15, [3] * 20])
    p = plan(cap, notice_s=30.0)  # notice shorter than the cold start: every notice costs
    spread = simulate(p.spec, cap, p.target, WarmHedge(calm_hours=None))
    packed = simulate(
        p.spec, cap, p.target, WarmHedge(calm_hours=None, zone_rank=("z1", "z0"), pack=True)
    )
    # spread: two of four (three + the spare) in z0, noticed together, one spare: a gap
    assert spread.preemptions == 2 and spread.availability < 1.0
    # packed: three in z1, only the spare in z0
    assert packed.preemptions == 1 and packed.availability == 1.0
    assert packed.cost <= spread.cost
    assert plan_optimum(p).cost <= packed.cost
