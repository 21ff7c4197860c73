"""Fleet planning: replay spot fleet policies on capacity traces and compare cost and
availability. Pure core (traces, simulator, policies); rendering lives in `render`."""

from __future__ import annotations

from spotstart.fleet.config import PlanConfig, build_config, load_config
from spotstart.fleet.errors import ConfigError
from spotstart.fleet.model import (
    Action,
    FleetSpec,
    FleetState,
    Launch,
    Phase,
    ReplicaKind,
    ReplicaView,
    StartupPhases,
    Terminate,
    Zone,
)
from spotstart.fleet.policies import POLICIES, make_policy
from spotstart.fleet.simulator import FleetPolicy, FleetRun, simulate
from spotstart.fleet.sweep import SweepPoint, run_plan, sweep_cold_start, sweep_zones
from spotstart.fleet.traces import CapacityTrace, align, load_trace, resample_min

__all__ = [
    "POLICIES",
    "Action",
    "CapacityTrace",
    "ConfigError",
    "FleetPolicy",
    "FleetRun",
    "FleetSpec",
    "FleetState",
    "Launch",
    "Phase",
    "PlanConfig",
    "ReplicaKind",
    "ReplicaView",
    "StartupPhases",
    "SweepPoint",
    "Terminate",
    "Zone",
    "align",
    "build_config",
    "load_config",
    "load_trace",
    "make_policy",
    "resample_min",
    "run_plan",
    "simulate",
    "sweep_cold_start",
    "sweep_zones",
]
