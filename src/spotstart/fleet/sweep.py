"""Run every policy of a plan beside the offline optimum, and sweep cold-start time and zone
count."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from spotstart.fleet.config import PlanConfig
from spotstart.fleet.errors import OptimumNotFound
from spotstart.fleet.optimal import OptimalBound, offline_optimum
from spotstart.fleet.policies import make_policy
from spotstart.fleet.simulator import FleetRun, simulate


def run_policy(plan: PlanConfig, name: str, options: Mapping[str, Any]) -> FleetRun:
    """One policy, fresh, on the plan's trace. Its ``committed_replicas`` option buys that
    many committed-use nodes for its run only (paid whether used or not)."""
    opts = dict(options)
    committed = int(opts.pop("committed_replicas", 0))
    spec = replace(plan.spec, committed_replicas=committed)
    return simulate(spec, plan.capacity, plan.target, make_policy(name, **opts))


def run_plan(plan: PlanConfig) -> list[FleetRun]:
    """Each policy of ``plan``, fresh, on the plan's trace (see `run_policy`)."""
    return [run_policy(plan, name, opts) for name, opts in plan.policies]


def plan_optimum(plan: PlanConfig, **kw: Any) -> OptimalBound:
    """The offline optimum of ``plan`` at the best possible availability (committed nodes
    bought by the oracle as it likes, priced as the plan prices them)."""
    return offline_optimum(plan.spec, plan.capacity, plan.target, **kw)


def versus_optimum(run: FleetRun, bound: OptimalBound) -> dict[str, float]:
    """A policy's cost over the optimum's and its availability against the best possible."""
    return {
        "x_optimal_cost": run.cost / bound.cost if bound.cost > 0 else float("inf"),
        "availability_vs_best": run.availability - bound.availability,
    }


@dataclass(frozen=True)
class SweepPoint:
    """One policy at one sweep setting; ``x_optimal_cost`` when the optimum was computed."""

    policy: str
    axis: str  # "cold_start_s" or "zones"
    value: float
    availability: float
    cost_relative: float
    x_optimal_cost: float | None = None
    best_availability: float | None = None
    optimal_kind: str | None = None


def _points(
    plan: PlanConfig, axis: str, value: float, optimal: bool, **kw: Any
) -> list[SweepPoint]:
    bound = None
    if optimal:  # without a bound the point keeps its policies' figures, x_optimal_cost None
        with contextlib.suppress(OptimumNotFound):
            bound = plan_optimum(plan, **kw)
    out = []
    for run in run_plan(plan):
        extra: dict[str, Any] = {}
        if bound is not None:
            extra = {
                "x_optimal_cost": versus_optimum(run, bound)["x_optimal_cost"],
                "best_availability": bound.availability,
                "optimal_kind": bound.label,
            }
        out.append(
            SweepPoint(run.policy, axis, value, run.availability, run.cost_relative, **extra)
        )
    return out


def sweep_cold_start(
    plan: PlanConfig, seconds: Sequence[float], *, optimal: bool = False, **kw: Any
) -> list[SweepPoint]:
    """Availability and relative cost of every policy per cold-start time (and, with
    ``optimal``, each policy's cost over the offline optimum at that cold start)."""
    out: list[SweepPoint] = []
    for s in seconds:
        out += _points(plan.with_cold_start(s), "cold_start_s", s, optimal, **kw)
    return out


def sweep_zones(
    plan: PlanConfig, counts: Sequence[int] | None = None, *, optimal: bool = False, **kw: Any
) -> list[SweepPoint]:
    """Availability and relative cost of every policy on the first k zones, per k."""
    ks = counts or range(1, len(plan.spec.zones) + 1)
    out: list[SweepPoint] = []
    for k in ks:
        out += _points(plan.with_zones(k), "zones", k, optimal, **kw)
    return out
