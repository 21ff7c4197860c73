"""Fleet policies: each one file, each a small class with ``decide(state) -> list[Action]``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from spotstart.fleet.errors import ConfigError
from spotstart.fleet.policies.base import FleetPolicy
from spotstart.fleet.policies.calm import CalmRelease
from spotstart.fleet.policies.committed import CommittedBaseline
from spotstart.fleet.policies.on_demand import OnDemandOnly
from spotstart.fleet.policies.single_zone import SpotSingleZone
from spotstart.fleet.policies.spothedge import SpotHedge
from spotstart.fleet.policies.spread import SpotSpread, SpreadWithFallback
from spotstart.fleet.policies.warm_hedge import WarmHedge

POLICIES: dict[str, Callable[..., FleetPolicy]] = {
    "on_demand": OnDemandOnly,
    "spot_single": SpotSingleZone,
    "spot_spread": SpotSpread,
    "spread_fallback": SpreadWithFallback,
    "committed_burst": CommittedBaseline,
    "spothedge": SpotHedge,
    "warm_hedge": WarmHedge,
}


def make_policy(name: str, **options: Any) -> FleetPolicy:
    """A fresh policy by its config name, e.g. ``make_policy("spothedge", num_extra=2)``."""
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ConfigError(
            f"policy {name!r}: unknown; choose one of {', '.join(POLICIES)}"
        ) from None
    try:
        return factory(**options)
    except TypeError as exc:
        raise ConfigError(f"policy {name!r}: bad options {options}: {exc}") from None


__all__ = [
    "POLICIES",
    "CalmRelease",
    "CommittedBaseline",
    "FleetPolicy",
    "OnDemandOnly",
    "SpotHedge",
    "SpotSingleZone",
    "SpotSpread",
    "SpreadWithFallback",
    "WarmHedge",
    "make_policy",
]
