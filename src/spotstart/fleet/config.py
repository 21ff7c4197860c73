"""`spotstart plan` configuration: one YAML file -> a validated `PlanConfig`, in one place.

Every problem is a `ConfigError` with a one-line message naming the key or file and the fix.
Traces are read from ``traces_dir`` (a folder, relative paths: relative to the config file; or
a URL, fetched into spotstart's cache: :mod:`spotstart.fleet.sources`), which ``--traces-dir``
overrides; they are never copied into the project.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from spotstart.fleet.errors import ConfigError
from spotstart.fleet.model import FleetSpec, StartupPhases, Zone
from spotstart.fleet.policies import POLICIES
from spotstart.fleet.sources import TraceSource, check_sha256
from spotstart.fleet.traces import (
    MAX_GAP_SECONDS,
    MIN_GAP_SECONDS,
    CapacityTrace,
    align,
    parse_trace,
    synthetic_trace,
)

IntArray = npt.NDArray[np.int64]
UNLIMITED = 1_000_000  # "capacity: any": k > 0 grants as many nodes as asked
# A synthetic zone is drawn a tick at a time (a Python loop, 8 bytes a tick): as many ticks as
# a trace file can hold values (untrusted_json's 4 million) is ~2 s and 32 MB. A shared
# fleet.yaml asking 20,000 hours of 1 s ticks ran for minutes at 8.5 GB before.
MAX_SYNTHETIC_TICKS = 4_000_000
# The most replicas a plan keeps ready (target.replicas, the peak of requests_per_second, a
# recording's target): a replay's time grows with the target (each tick walks every replica),
# and a shared fleet.yaml or a recorded guard log claiming 20,000 replicas ran 47 s, a million
# for hours. 10,000 serving replicas of one model is beyond any fleet this plans for.
MAX_TARGET_REPLICAS = 10_000


def check_target(where: str, replicas: float) -> int:
    """``replicas`` as the int a plan keeps, or ConfigError (exit 2) over MAX_TARGET_REPLICAS
    (inf too) or under 1."""
    if not 1 <= replicas <= MAX_TARGET_REPLICAS:  # NaN too
        shown = f"{replicas:,.0f}" if math.isfinite(replicas) else repr(replicas)
        raise ConfigError(
            f"{where}: {shown} replicas; a plan keeps 1 to {MAX_TARGET_REPLICAS:,} "
            "(its time grows with the target)"
        )
    return int(replicas)


_TOP = {
    "traces_dir",
    "tick_seconds",
    "capacity",
    "horizon_hours",
    "prices",
    "zones",
    "startup",
    "on_demand",
    "preemption_notice_seconds",
    "target",
    "policy",
    "policies",
    "policy_options",
    "warm_start",
}
_PRICES = {"spot_per_hour", "on_demand_per_hour", "committed_discount"}
_ZONE = {"name", "trace", "sha256", "synthetic", "spot_per_hour", "on_demand_per_hour"}
_SYNTH = {"mean_up_hours", "mean_down_hours", "nodes", "seed", "hours", "tick_seconds"}
_STARTUP = {"provision_seconds", "image_pull_seconds", "weight_load_seconds"}
_OD = {"available", "provision_seconds"}
_TARGET = {"replicas", "requests_per_second", "replica_rps", "tick_seconds"}


@dataclass(frozen=True, eq=False)
class PlanConfig:
    """A loaded plan: the fleet, its capacity (zones x ticks), the target per tick, the
    policies to run (name, options)."""

    spec: FleetSpec
    capacity: IntArray
    target: IntArray
    policies: tuple[tuple[str, Mapping[str, Any]], ...]
    source: str = "<dict>"
    zone_traces: tuple[str, ...] = field(default_factory=tuple)

    def with_zones(self, count: int) -> PlanConfig:
        """The same plan on its first ``count`` zones."""
        return replace(
            self,
            spec=replace(self.spec, zones=self.spec.zones[:count]),
            capacity=self.capacity[:count],
        )

    def window(self, start_tick: int, stop_tick: int) -> PlanConfig:
        """The same plan on ticks [start_tick, stop_tick) of its trace, replayed from a fresh
        start (as a fleet deployed at ``start_tick`` would be)."""
        n = self.capacity.shape[1]
        if not 0 <= start_tick < stop_tick <= n:
            raise ConfigError(f"window [{start_tick}, {stop_tick}): outside the {n} ticks")
        return replace(
            self,
            capacity=self.capacity[:, start_tick:stop_tick],
            target=self.target[start_tick:stop_tick],
        )

    def with_cold_start(self, seconds: float) -> PlanConfig:
        """The same plan with spot and on-demand cold starts scaled to ``seconds``, keeping
        on-demand's extra provisioning delay."""
        extra = self.spec.on_demand_startup.cold_start_s - self.spec.spot_startup.cold_start_s
        spot = self.spec.spot_startup.with_cold_start(seconds)
        od = replace(spot, provision_s=spot.provision_s + max(0.0, extra))
        return replace(self, spec=replace(self.spec, spot_startup=spot, on_demand_startup=od))


def _check_keys(where: str, obj: Any, allowed: set[str]) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(obj).__name__}")
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}"
        )
    return obj


def _number(where: str, value: Any, *, minimum: float = 0.0, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if value < minimum or (positive and value <= 0):
        bound = "positive" if positive else f">= {minimum:g}"
        raise ConfigError(f"{where}: must be {bound}, got {value!r}")
    return float(value)


def load_config(path: str | Path, traces_dir: str | Path | None = None) -> PlanConfig:
    """Read and validate a YAML plan (see ``examples/fleet.yaml``); ``traces_dir``: a folder or
    a URL (``--traces-dir``), overriding the file's."""
    import yaml  # type: ignore[import-untyped,unused-ignore]  # the `plan` extra

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        doc = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{p}: not valid YAML ({first})") from None
    return build_config(doc, base_dir=p.parent, traces_dir=traces_dir, source=str(p))


def build_config(
    doc: Any,
    *,
    base_dir: str | Path = ".",
    traces_dir: str | Path | None = None,
    source: str = "<dict>",
) -> PlanConfig:
    """Validate a parsed config mapping; ``traces_dir`` (a folder, relative to the current
    directory, or a URL) overrides the file's ``traces_dir`` (relative to ``base_dir``)."""
    top = _check_keys(source, doc, _TOP)
    base = Path(base_dir)
    location = top.get("traces_dir", ".")
    if not isinstance(location, str) or not location:
        raise ConfigError(f"traces_dir: expected a folder or a URL, got {location!r}")
    if traces_dir is not None:
        location, base = os.fspath(traces_dir), Path.cwd()
    tsrc: TraceSource | None = None  # opened at the first zone with a trace

    prices = _check_keys("prices", top.get("prices", {}), _PRICES)
    spot_default = _number("prices.spot_per_hour", prices.get("spot_per_hour", 1.0))
    od_default = _number("prices.on_demand_per_hour", prices.get("on_demand_per_hour", 3.0))
    discount = _number("prices.committed_discount", prices.get("committed_discount", 0.37))
    if discount >= 1:
        raise ConfigError(f"prices.committed_discount: must be < 1 (a share), got {discount}")

    zones_doc = top.get("zones")
    if not isinstance(zones_doc, list) or not zones_doc:
        raise ConfigError("zones: give a non-empty list of zones (name + trace or synthetic)")
    mode = top.get("capacity", "count")
    if mode not in ("count", "any"):
        raise ConfigError(f"capacity: must be 'count' or 'any', got {mode!r}")
    synth_tick = top.get("tick_seconds", 300)
    zones: list[Zone] = []
    traces: list[CapacityTrace] = []
    names: list[str] = []
    for i, zdoc in enumerate(zones_doc):
        where = f"zones[{i}]"
        z = _check_keys(where, zdoc, _ZONE)
        name = z.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}.name: give each zone a name")
        if name in names:
            raise ConfigError(f"{where}.name: duplicate zone {name!r}")
        names.append(name)
        spot = _number(f"{where}.spot_per_hour", z.get("spot_per_hour", spot_default))
        od = _number(f"{where}.on_demand_per_hour", z.get("on_demand_per_hour", od_default))
        zones.append(Zone(name, spot, od))
        if ("trace" in z) == ("synthetic" in z):
            raise ConfigError(f"{where} ({name}): give exactly one of 'trace' or 'synthetic'")
        if "sha256" in z and "trace" not in z:
            raise ConfigError(f"{where} ({name}): 'sha256' pins a 'trace' file; give one")
        if "trace" in z:
            sha = check_sha256(z["sha256"], where) if "sha256" in z else None
            tsrc = tsrc or TraceSource.at(location, base)
            data, what = tsrc.read(z["trace"], f"{where} ({name})", sha)
            traces.append(parse_trace(data, name, what))
        else:
            s = _check_keys(f"{where}.synthetic", z["synthetic"], _SYNTH)
            tick = _number(
                f"{where}.synthetic.tick_seconds", s.get("tick_seconds", synth_tick), positive=True
            )
            if not MIN_GAP_SECONDS <= tick <= MAX_GAP_SECONDS:
                raise ConfigError(
                    f"{where}.synthetic.tick_seconds: from {MIN_GAP_SECONDS:g} to "
                    f"{MAX_GAP_SECONDS:g} s, as a trace's tick, got {tick:g}"
                )
            hours = _number(f"{where}.synthetic.hours", s.get("hours", 24 * 7), positive=True)
            ticks = max(1, int(hours * 3600 / tick))
            if ticks > MAX_SYNTHETIC_TICKS:
                raise ConfigError(
                    f"{where}.synthetic: {hours:g} hours of {tick:g} s ticks is {ticks:,} ticks, "
                    f"more than the {MAX_SYNTHETIC_TICKS:,} a synthetic zone may draw; give "
                    "fewer hours or a longer tick_seconds"
                )
            nodes = _number(f"{where}.synthetic.nodes", s.get("nodes", 1))
            if nodes >= 2**62:
                raise ConfigError(f"{where}.synthetic.nodes: must be below 2**62, got {nodes:g}")
            traces.append(
                synthetic_trace(
                    name,
                    ticks=ticks,
                    tick_seconds=tick,
                    mean_up_hours=_number(
                        f"{where}.synthetic.mean_up_hours",
                        s.get("mean_up_hours", 12),
                        positive=True,
                    ),
                    mean_down_hours=_number(
                        f"{where}.synthetic.mean_down_hours",
                        s.get("mean_down_hours", 1),
                        positive=True,
                    ),
                    nodes=int(nodes),
                    seed=int(_number(f"{where}.synthetic.seed", s.get("seed", i))),
                )
            )
    tick_opt = top.get("tick_seconds")
    tick_req = None if tick_opt is None else _number("tick_seconds", tick_opt, positive=True)
    tick, cap = align(traces, tick_req)
    if "horizon_hours" in top:
        hours = _number("horizon_hours", top["horizon_hours"], positive=True)
        cap = cap[:, : max(1, int(hours * 3600 / tick))]
    if mode == "any":
        cap = np.where(cap > 0, UNLIMITED, 0).astype(np.int64)

    st = _check_keys("startup", top.get("startup", {}), _STARTUP)
    spot_phases = StartupPhases(
        _number("startup.provision_seconds", st.get("provision_seconds", 60)),
        _number("startup.image_pull_seconds", st.get("image_pull_seconds", 30)),
        _number("startup.weight_load_seconds", st.get("weight_load_seconds", 30)),
    )
    odc = _check_keys("on_demand", top.get("on_demand", {}), _OD)
    available = odc.get("available", True)
    if not isinstance(available, bool):
        raise ConfigError(f"on_demand.available: expected true or false, got {available!r}")
    od_phases = replace(
        spot_phases,
        provision_s=_number(
            "on_demand.provision_seconds", odc.get("provision_seconds", spot_phases.provision_s)
        ),
    )
    spec = FleetSpec(
        zones=tuple(zones),
        tick_seconds=tick,
        spot_startup=spot_phases,
        on_demand_startup=od_phases,
        preemption_notice_s=_number(
            "preemption_notice_seconds", top.get("preemption_notice_seconds", 120)
        ),
        on_demand_available=available,
        committed_per_hour=min(z.on_demand_per_hour for z in zones) * (1 - discount),
        warm_start=bool(top.get("warm_start", True)),
    )
    target = _target(top.get("target", {"replicas": 1}), cap.shape[1], tick)
    return PlanConfig(spec, cap, target, _policies(top), source, tuple(t.name for t in traces))


def _target(doc: Any, ticks: int, tick: float) -> IntArray:
    t = _check_keys("target", doc, _TARGET)
    if "replicas" in t and "requests_per_second" in t:
        raise ConfigError("target: give either 'replicas' or 'requests_per_second', not both")
    if "requests_per_second" not in t:
        n = _number("target.replicas", t.get("replicas", 1), positive=True)
        check_target("target.replicas", n)  # before int(): inf was an OverflowError
        if n != int(n):
            raise ConfigError(f"target.replicas: must be a whole number, got {n}")
        return np.full(ticks, int(n), dtype=np.int64)
    series = t["requests_per_second"]
    if not isinstance(series, list) or not series:
        raise ConfigError("target.requests_per_second: give a non-empty list of rates")
    rates = np.array([_number("target.requests_per_second[]", v) for v in series])
    per = _number("target.replica_rps", t.get("replica_rps", 1.0), positive=True)
    step = _number("target.tick_seconds", t.get("tick_seconds", tick), positive=True)
    # sample i covers [i*step, (i+1)*step); the series repeats (a daily profile, say)
    idx = (np.arange(ticks) * tick // step).astype(np.int64) % len(rates)
    wanted = np.ceil(rates[idx] / per - 1e-9)
    peak = float(wanted.max()) if len(wanted) else 1.0
    if peak > MAX_TARGET_REPLICAS or not math.isfinite(peak):
        check_target("target.requests_per_second / replica_rps at its peak", peak)
    return np.maximum(1, wanted).astype(np.int64)


def _policies(top: Mapping[str, Any]) -> tuple[tuple[str, Mapping[str, Any]], ...]:
    if "policy" in top and "policies" in top:
        raise ConfigError("policy/policies: give one of them")
    names = top.get("policies", [top["policy"]] if "policy" in top else list(POLICIES))
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, list) or not names:
        raise ConfigError("policies: give a non-empty list of policy names")
    options = top.get("policy_options", {}) or {}
    if not isinstance(options, Mapping):
        raise ConfigError("policy_options: expected a mapping of policy name -> options")
    for name in list(names) + list(options):
        if name not in POLICIES:
            raise ConfigError(f"policy {name!r}: unknown; choose one of {', '.join(POLICIES)}")
    out = []
    for name in names:
        opts = options.get(name, {}) or {}
        if not isinstance(opts, Mapping):
            raise ConfigError(f"policy_options.{name}: expected a mapping")
        out.append((str(name), dict(opts)))
    return tuple(out)
