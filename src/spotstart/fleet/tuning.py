"""Honest evaluation of tuned policies: choose a policy's parameters on one part of a trace
(the training window), report it on another (the test window) beside the offline optimum of
that window. Nothing here is reported on the data it was chosen on.

The rule mirrors the goal a policy is held to (availability at a cost close to the
optimum's): among the settings that cost at most ``budget`` times the offline optimum of the
training window, the most available, then the cheapest; if none is that cheap, the cheapest
of those reaching the availability goal (the best possible there, or ``goal``, whichever is
lower), else the most available.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from spotstart.fleet.config import PlanConfig
from spotstart.fleet.errors import ConfigError
from spotstart.fleet.optimal import OptimalBound
from spotstart.fleet.simulator import FleetRun
from spotstart.fleet.sweep import plan_optimum, run_policy

GOAL_AVAILABILITY = 0.9995
COST_BUDGET = 1.10  # x the training window's optimum
# what `warm_hedge` may be tuned over: committed nodes bought for the base, and how long its
# spare is held after a preemption (None: always)
WARM_HEDGE_GRID: Mapping[str, Sequence[Any]] = {
    "committed_replicas": (0, 1, 2, 3),
    "calm_hours": (1.0, 3.0, 6.0, None),
    "pack": (False, True),
}


def rank_zones(plan: PlanConfig) -> tuple[str, ...]:
    """Zones by what the window showed, most trusted first: share of time with capacity, then
    fewest capacity drops, then most capacity on average."""
    cap = plan.capacity
    up = (cap > 0).mean(axis=1)
    drops = (np.diff(cap, axis=1) < 0).sum(axis=1)
    mean = cap.mean(axis=1)
    order = sorted(range(cap.shape[0]), key=lambda z: (-up[z], drops[z], -mean[z], z))
    return tuple(plan.spec.zones[z].name for z in order)


@dataclass(frozen=True)
class Tuned:
    """A policy tuned on ``train`` and replayed on ``test``."""

    policy: str
    options: Mapping[str, Any]
    train: FleetRun
    train_best_availability: float
    train_optimum: OptimalBound
    test: FleetRun
    train_ticks: tuple[int, int]
    test_ticks: tuple[int, int]
    candidates: int

    def summary(self) -> dict[str, Any]:
        """The split, the options chosen and both runs, JSON-ready."""
        return {
            "policy": self.policy,
            "train_ticks": list(self.train_ticks),
            "test_ticks": list(self.test_ticks),
            "tuned_options": {
                k: list(v) if isinstance(v, tuple) else v for k, v in self.options.items()
            },
            "candidates": self.candidates,
            "train": self.train.summary(),
            "train_optimal": self.train_optimum.summary(),
            "test": self.test.summary(),
        }

    def describe(self) -> str:
        opts = (
            ", ".join(
                f"{k}={v}" if k != "zone_rank" else f"zone_rank={','.join(v[:2])},..."
                for k, v in self.options.items()
            )
            or "defaults"
        )
        a, b = self.train_ticks
        return f"{opts} (chosen on ticks {a}-{b})"


def time_split(plan: PlanConfig, train_share: float = 0.5) -> tuple[PlanConfig, PlanConfig]:
    """The first ``train_share`` of the trace to train on, the rest to report on."""
    n = plan.capacity.shape[1]
    cut = round(n * train_share)
    if not 0 < cut < n:
        raise ConfigError(f"train share {train_share}: leaves no ticks on one side of {n}")
    return plan.window(0, cut), plan.window(cut, n)


def grid_options(grid: Mapping[str, Sequence[Any]], max_committed: int) -> list[dict[str, Any]]:
    """Every combination of ``grid`` (committed counts above ``max_committed`` dropped)."""
    keys = list(grid)
    out = []
    for values in itertools.product(*(grid[k] for k in keys)):
        opts = dict(zip(keys, values, strict=True))
        if int(opts.get("committed_replicas", 0)) <= max_committed:
            out.append(opts)
    return out


def choose(
    plan: PlanConfig,
    policy: str,
    candidates: Sequence[Mapping[str, Any]],
    *,
    goal: float = GOAL_AVAILABILITY,
    budget: float = COST_BUDGET,
    **optimum_kw: Any,
) -> tuple[Mapping[str, Any], FleetRun, OptimalBound]:
    """The candidate options the rule above picks on ``plan``; its run; the optimum there."""
    if not candidates:
        raise ConfigError(f"{policy}: nothing to tune over")
    optimum = plan_optimum(plan, **optimum_kw)
    runs = [(dict(c), run_policy(plan, policy, c)) for c in candidates]
    affordable = [cr for cr in runs if cr[1].cost <= budget * optimum.cost + 1e-9]
    if affordable:
        opts, run = max(affordable, key=lambda cr: (cr[1].availability, -cr[1].cost))
        return opts, run, optimum
    need = min(optimum.availability, goal) - 1e-12
    meeting = [cr for cr in runs if cr[1].availability >= need]
    if meeting:
        opts, run = min(meeting, key=lambda cr: cr[1].cost)
    else:
        opts, run = max(runs, key=lambda cr: (cr[1].availability, -cr[1].cost))
    return opts, run, optimum


def tune_out_of_sample(
    plan: PlanConfig,
    policy: str = "warm_hedge",
    grid: Mapping[str, Sequence[Any]] = WARM_HEDGE_GRID,
    *,
    train_share: float = 0.5,
    goal: float = GOAL_AVAILABILITY,
    **optimum_kw: Any,
) -> tuple[Tuned, OptimalBound]:
    """Tune ``policy`` on the first part of ``plan``'s trace, replay it on the rest; the
    optimum of the test window beside it."""
    train, test = time_split(plan, train_share)
    candidates = grid_options(grid, int(plan.target.max()))
    if policy == "warm_hedge":  # what the training window says about each zone
        ranked = rank_zones(train)
        candidates = [{**c, "zone_rank": ranked} for c in candidates]
    opts, train_run, train_optimum = choose(train, policy, candidates, goal=goal, **optimum_kw)
    cut = train.capacity.shape[1]
    tuned = Tuned(
        policy=policy,
        options=opts,
        train=train_run,
        train_best_availability=train_optimum.availability,
        train_optimum=train_optimum,
        test=run_policy(test, policy, opts),
        train_ticks=(0, cut),
        test_ticks=(cut, plan.capacity.shape[1]),
        candidates=len(candidates),
    )
    return tuned, plan_optimum(test, **optimum_kw)


__all__ = [
    "COST_BUDGET",
    "GOAL_AVAILABILITY",
    "WARM_HEDGE_GRID",
    "Tuned",
    "choose",
    "grid_options",
    "rank_zones",
    "time_split",
    "tune_out_of_sample",
]
