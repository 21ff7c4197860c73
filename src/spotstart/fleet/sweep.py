"""Run every policy of a plan, and sweep cold-start time and zone count."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from spotstart.fleet.config import PlanConfig
from spotstart.fleet.policies import make_policy
from spotstart.fleet.simulator import FleetRun, simulate


def run_plan(plan: PlanConfig) -> list[FleetRun]:
    """Each policy of ``plan``, fresh, on the plan's trace. A policy's ``committed_replicas``
    option buys that many committed-use nodes for its run only (paid whether used or not)."""
    runs = []
    for name, opts in plan.policies:
        options = dict(opts)
        committed = int(options.pop("committed_replicas", 0))
        spec = replace(plan.spec, committed_replicas=committed)
        runs.append(simulate(spec, plan.capacity, plan.target, make_policy(name, **options)))
    return runs


@dataclass(frozen=True)
class SweepPoint:
    """One policy at one sweep setting."""

    policy: str
    axis: str  # "cold_start_s" or "zones"
    value: float
    availability: float
    cost_relative: float


def sweep_cold_start(plan: PlanConfig, seconds: Sequence[float]) -> list[SweepPoint]:
    """Availability and relative cost of every policy per cold-start time."""
    out: list[SweepPoint] = []
    for s in seconds:
        for run in run_plan(plan.with_cold_start(s)):
            out.append(
                SweepPoint(run.policy, "cold_start_s", s, run.availability, run.cost_relative)
            )
    return out


def sweep_zones(plan: PlanConfig, counts: Sequence[int] | None = None) -> list[SweepPoint]:
    """Availability and relative cost of every policy on the first k zones, per k."""
    ks = counts or range(1, len(plan.spec.zones) + 1)
    out: list[SweepPoint] = []
    for k in ks:
        for run in run_plan(plan.with_zones(k)):
            out.append(SweepPoint(run.policy, "zones", k, run.availability, run.cost_relative))
    return out
