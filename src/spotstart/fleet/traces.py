"""Spot-capacity traces: parse the public JSON files, synthesise capacity, fit a synthetic
model to a real trace, and put traces of different tick sizes and lengths on one honest common
grid. Reading a local file (:func:`load_trace`) is the only I/O; where the bytes come from (a
folder, a URL) is :mod:`spotstart.fleet.sources`."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import numpy.typing as npt

from spotstart import untrusted_json
from spotstart.fleet.errors import ConfigError

# A trace file is read whole into memory and parsed: larger ones are refused before parsing.
# The largest public one (45 days at 195 s) is 60 kB; 64 MiB holds years of 30 s ticks.
MAX_TRACE_BYTES = 64 << 20

# A tick a trace may have: the public traces tick every 30-600 s, a recording every 1 s or more.
# Outside this, a hostile gap (1e308) made every duration and cost infinite and plan printed
# NaN availabilities and Infinity costs (invalid JSON) with exit 0.
MIN_GAP_SECONDS = 1.0
MAX_GAP_SECONDS = 86_400.0

IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True, eq=False)
class CapacityTrace:
    """Spot nodes obtainable in one zone per tick (``k > 0``: capacity available)."""

    name: str
    tick_seconds: float
    capacity: IntArray

    @property
    def duration_s(self) -> float:
        return self.tick_seconds * len(self.capacity)


def load_trace(path: str | Path, name: str | None = None) -> CapacityTrace:
    """Read one ``{"metadata": {"gap_seconds": N}, "data": [k0, k1, ...]}`` file (at most
    :data:`MAX_TRACE_BYTES`).

    Example: ``load_trace(traces_dir / "gcp-a100-spothedge/us-east1-b_a100_40gb_8.json")``.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: trace file not found; check traces_dir / --traces-dir")
    try:
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"{p}: not a readable trace ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        data = read_bounded(f, str(p))
    return parse_trace(data, name or p.stem, str(p))


def read_bounded(f: BinaryIO, what: str) -> bytes:
    """The bytes of ``f``, at most :data:`MAX_TRACE_BYTES`, or :class:`ConfigError`."""
    data = f.read(MAX_TRACE_BYTES + 1)
    if len(data) > MAX_TRACE_BYTES:
        raise ConfigError(
            f"{what}: larger than {MAX_TRACE_BYTES >> 20} MiB, the most a trace may hold; "
            "is it a trace file?"
        )
    return data


def parse_trace(data: bytes, name: str, what: str) -> CapacityTrace:
    """A trace from the bytes of its JSON file, parsed as untrusted (nesting and value count
    bounded): ``what`` names the file in errors."""
    try:
        doc = untrusted_json.parse(data, what=what)
    except untrusted_json.JSONRejected as exc:
        raise ConfigError(f"{exc} (not a readable JSON trace)") from None
    p = what
    if not isinstance(doc, dict) or "data" not in doc or "metadata" not in doc:
        raise ConfigError(f"{p}: expected keys 'metadata' and 'data' in a spot trace")
    gap = doc["metadata"].get("gap_seconds") if isinstance(doc["metadata"], dict) else None
    if (
        not isinstance(gap, int | float)
        or isinstance(gap, bool)
        or not MIN_GAP_SECONDS <= gap <= MAX_GAP_SECONDS
    ):
        raise ConfigError(
            f"{p}: metadata.gap_seconds must be a number of seconds from {MIN_GAP_SECONDS:g} to "
            f"{MAX_GAP_SECONDS:g} (a tick), got {repr(gap)[:40]}"
        )
    samples = doc["data"]
    if not isinstance(samples, list) or not samples:
        raise ConfigError(f"{p}: empty trace (no 'data' samples); pick another file")
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**62 for v in samples):
        raise ConfigError(f"{p}: 'data' must hold non-negative integers (nodes obtainable)")
    return CapacityTrace(name, float(gap), np.asarray(samples, dtype=np.int64))


def resample_min(trace: CapacityTrace, tick_seconds: float) -> CapacityTrace:
    """Re-grid onto ``tick_seconds`` >= the trace's tick, taking the *minimum* capacity of
    every sample overlapping each new window: a zone counts as up for a window only if it was
    up throughout, so coarsening never invents capacity (it can only hide short recoveries)."""
    if tick_seconds < trace.tick_seconds:
        raise ConfigError(
            f"{trace.name}: cannot resample a {trace.tick_seconds:g} s trace to a finer "
            f"{tick_seconds:g} s tick; use a tick >= the coarsest trace tick"
        )
    if tick_seconds == trace.tick_seconds:
        return trace
    n_out = int(trace.duration_s // tick_seconds)
    if n_out == 0:
        raise ConfigError(f"{trace.name}: shorter than one {tick_seconds:g} s tick")
    src = trace.capacity
    k = np.arange(n_out)
    starts = np.floor(k * tick_seconds / trace.tick_seconds + 1e-9).astype(np.int64)
    ends = np.ceil((k + 1) * tick_seconds / trace.tick_seconds - 1e-9).astype(np.int64)
    ends = np.minimum(ends, len(src))
    out = np.array([src[a:b].min() for a, b in zip(starts, ends, strict=True)], dtype=np.int64)
    return CapacityTrace(trace.name, float(tick_seconds), out)


def align(
    traces: Sequence[CapacityTrace], tick_seconds: float | None = None
) -> tuple[float, IntArray]:
    """Stack traces into one (zones x ticks) matrix on the coarsest tick (or ``tick_seconds``),
    truncated to the shortest trace: only the window every zone was measured in is replayed."""
    if not traces:
        raise ConfigError("no zones: give at least one zone with a trace or a synthetic model")
    tick = max(t.tick_seconds for t in traces) if tick_seconds is None else float(tick_seconds)
    grid = [resample_min(t, tick) for t in traces]
    n = min(len(g.capacity) for g in grid)
    return tick, np.stack([g.capacity[:n] for g in grid])


def synthetic_trace(
    name: str,
    *,
    ticks: int,
    tick_seconds: float,
    mean_up_hours: float,
    mean_down_hours: float,
    nodes: int = 1,
    seed: int = 0,
) -> CapacityTrace:
    """A two-state (up/down) Markov capacity model with exponential sojourns; deterministic for
    a seed. Up means ``nodes`` obtainable, down means none."""
    if mean_up_hours <= 0 or mean_down_hours <= 0 or ticks <= 0 or nodes < 0:
        raise ConfigError(f"{name}: synthetic model needs positive means, ticks and nodes >= 0")
    rng = np.random.default_rng(seed)
    p_fail = 1.0 - math.exp(-tick_seconds / (mean_up_hours * 3600.0))
    p_recover = 1.0 - math.exp(-tick_seconds / (mean_down_hours * 3600.0))
    u = rng.random(ticks)
    out = np.empty(ticks, dtype=np.int64)
    up = True
    for i in range(ticks):
        out[i] = nodes if up else 0
        up = (u[i] >= p_fail) if up else (u[i] < p_recover)
    return CapacityTrace(name, float(tick_seconds), out)


def fit_two_state(trace: CapacityTrace) -> tuple[float, float]:
    """(mean_up_hours, mean_down_hours) of the two-state model :func:`synthetic_trace` draws
    from, fitted to ``trace`` by maximum likelihood: per tick, the share of up ticks followed
    by a down one (and the reverse), turned into the exponential sojourn means that give those
    per-tick probabilities. What it keeps of a trace: each zone's run lengths; what it loses:
    how zones fail together and any daily pattern."""
    up = trace.capacity > 0
    before, after = up[:-1], up[1:]
    fails, recoveries = int(np.sum(before & ~after)), int(np.sum(~before & after))
    ups, downs = int(before.sum()), int((~before).sum())
    if fails == 0 or recoveries == 0:
        raise ConfigError(
            f"{trace.name}: never {'fails' if fails == 0 else 'recovers'}; a two-state model "
            "needs both transitions"
        )

    def mean_hours(p: float) -> float:
        return -trace.tick_seconds / math.log1p(-p) / 3600.0

    return mean_hours(fails / ups), mean_hours(recoveries / downs)
