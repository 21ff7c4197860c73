"""The offline optimum: the least cost at which an oracle that knows the whole capacity trace
keeps ``target`` replicas serving, as a mixed-integer program (scipy's HiGHS). Pure: arrays in,
an `OptimalBound` out. It is a yardstick for policies, not a policy: no online system knows the
future.

The oracle plays by the simulator's rules (`spotstart.fleet.simulator`), so every schedule a
policy can produce there is a feasible schedule here and the optimum is never above a policy's
cost at the same availability:

* it launches at tick starts; a spot replica needs a node of its zone (at most ``cap[z, t]``
  un-noticed spot replicas in zone ``z`` during tick ``t``), an on-demand one needs on-demand to
  be available (billed at the cheapest on-demand price); each serves a cold start after launch;
* it releases replicas at tick starts (billing stops there); when a zone's capacity falls from
  ``cap[z, t-1]`` to ``cap[z, t]``, up to the fall of its replicas there may instead take the
  preemption notice: they stay (and serve, if ready) ``preemption_notice_s`` more seconds;
* committed nodes, where they are priced, are bought for the whole horizon (any number);
* billing is per second from launch to end, exactly as the simulator bills.

Replicas of one kind in one zone are interchangeable, so the program counts them per tick
instead of naming them. It counts a replica launched in the last cold start as not serving yet:
exact for every schedule in which no replica ends before it is ready, and an optimal schedule
never holds such a replica (it costs and never serves, and dropping it breaks no constraint),
so the optimum is exact. Time inside a tick is cut where cold starts and notices end
(``dt`` mod those), so availability is counted exactly as the simulator counts it.

Size: about 3 variables per zone and tick. Programs up to ``exact_max_variables`` are solved as
MILPs (exact, or HiGHS's proven dual bound when the time limit ends the search first); larger
ones as their LP relaxation, which is a proven lower bound. `OptimalBound.kind` says which.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from spotstart.fleet.errors import OptimumNotFound
from spotstart.fleet.model import FleetSpec
from spotstart.fleet.simulator import capacity_and_target

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoundKind = Literal["optimal", "lower_bound"]

EXACT_MAX_VARIABLES = 1_500_000  # the 9-zone 45-day trace (405k) is proved optimal in ~20 s
TIME_LIMIT_S = 60.0
LP_TIME_LIMIT_S = 300.0  # the relaxation of a program too large for the MILP
RELAXATION_CHECK_MAX_VARIABLES = 20_000  # small programs: a MILP "optimum" checked (see below)
LP_MIN_S = 10.0  # the relaxation after a MILP stopped before any bound gets at least this
_EPS = 1e-9
NO_TICK = -2  # a variable that costs nothing
SPREAD = -1  # a cost paid evenly over the horizon (committed nodes)


@dataclass(frozen=True, eq=False)
class OptimalBound:
    """The oracle's least cost at ``availability``, or a proven lower bound on it.

    ``kind``: ``"optimal"`` (the MILP proved optimal within ``gap``), ``"lower_bound"``
    (HiGHS's dual bound when the time limit stopped the search, or the LP relaxation;
    ``method`` says which). ``cost_relative`` is against ``target`` on-demand replicas all the
    time, as in `FleetRun.cost_relative`.
    """

    cost: float
    reference_cost: float
    availability: float
    kind: BoundKind
    method: str  # "milp", "milp-dual-bound" or "lp-relaxation"
    gap: float
    seconds: float
    variables: int
    constraints: int
    cost_per_tick: FloatArray | None = None  # the optimal schedule's (``kind == "optimal"``)

    @property
    def cost_relative(self) -> float:
        return self.cost / self.reference_cost if self.reference_cost > 0 else math.inf

    @property
    def label(self) -> str:
        """How a table names this figure."""
        return "optimal" if self.kind == "optimal" else f"lower bound ({self.method})"

    def summary(self) -> dict[str, Any]:
        return {
            "cost": self.cost,
            "cost_relative": self.cost_relative,
            "availability": self.availability,
            "kind": self.kind,
            "method": self.method,
            "gap": self.gap,
            "seconds": self.seconds,
            "variables": self.variables,
            "constraints": self.constraints,
        }


class _Program:
    """A sparse linear program under construction: variable blocks and COO rows."""

    def __init__(self) -> None:
        self.n = 0
        self._lb: list[FloatArray] = []
        self._ub: list[FloatArray] = []
        self._cost: list[FloatArray] = []
        self._int: list[IntArray] = []
        self._tick: list[IntArray] = []
        self._rows: list[IntArray] = []
        self._cols: list[IntArray] = []
        self._vals: list[FloatArray] = []
        self._lo: list[FloatArray] = []
        self._hi: list[FloatArray] = []
        self.m = 0

    def variables(
        self,
        count: int,
        *,
        ub: npt.ArrayLike,
        cost: npt.ArrayLike,
        integer: bool,
        tick: npt.ArrayLike = NO_TICK,
    ) -> IntArray:
        """``tick``: the tick each variable's cost is billed in (``SPREAD``: evenly over the
        horizon), for the optimum's cost over time."""
        idx = np.arange(self.n, self.n + count, dtype=np.int64)
        self.n += count
        self._tick.append(np.broadcast_to(np.asarray(tick, dtype=np.int64), (count,)).copy())
        self._lb.append(np.zeros(count))
        self._ub.append(np.broadcast_to(np.asarray(ub, dtype=np.float64), (count,)).copy())
        self._cost.append(np.broadcast_to(np.asarray(cost, dtype=np.float64), (count,)).copy())
        self._int.append(np.full(count, 1 if integer else 0, dtype=np.int64))
        return idx

    def rows(
        self,
        count: int,
        entries: list[tuple[IntArray, IntArray, npt.ArrayLike]],
        lo: npt.ArrayLike,
        hi: npt.ArrayLike,
    ) -> IntArray:
        """``count`` new rows; entries are (local row, column, coefficient) arrays."""
        base = self.m
        for r, c, v in entries:
            vals = np.broadcast_to(np.asarray(v, dtype=np.float64), r.shape)
            self._rows.append(r.astype(np.int64) + base)
            self._cols.append(c.astype(np.int64))
            self._vals.append(vals.copy())
        self._lo.append(np.broadcast_to(np.asarray(lo, dtype=np.float64), (count,)).copy())
        self._hi.append(np.broadcast_to(np.asarray(hi, dtype=np.float64), (count,)).copy())
        self.m += count
        return np.arange(base, base + count, dtype=np.int64)

    def cost_per_tick(self, x: FloatArray, n_ticks: int) -> FloatArray:
        """What a solution ``x`` pays in each tick."""
        paid = np.concatenate(self._cost) * x
        tick = np.concatenate(self._tick)
        billed = tick >= 0
        out = np.bincount(tick[billed], weights=paid[billed], minlength=n_ticks).astype(float)
        spread: FloatArray = out + float(paid[tick == SPREAD].sum()) / n_ticks
        return spread

    def solve(self, *, integer: bool, time_limit_s: float, presolve: bool = True) -> Any:
        from scipy.optimize import Bounds, LinearConstraint, milp
        from scipy.sparse import coo_array

        a = coo_array(
            (np.concatenate(self._vals), (np.concatenate(self._rows), np.concatenate(self._cols))),
            shape=(self.m, self.n),
        ).tocsr()
        integrality = np.concatenate(self._int) if integer else np.zeros(self.n)
        return milp(
            np.concatenate(self._cost),
            integrality=integrality,
            bounds=Bounds(np.concatenate(self._lb), np.concatenate(self._ub)),
            constraints=LinearConstraint(a, np.concatenate(self._lo), np.concatenate(self._hi)),
            options={
                "time_limit": time_limit_s,
                "mip_rel_gap": 1e-6,
                "disp": False,
                "presolve": presolve,
            },
        )


def _segments(spec: FleetSpec) -> tuple[FloatArray, FloatArray]:
    """Cut points inside a tick where serving counts can change, as (starts, lengths)."""
    dt = float(spec.tick_seconds)
    cuts = {0.0}
    for s in (
        spec.spot_startup.cold_start_s,
        spec.on_demand_startup.cold_start_s,
        spec.preemption_notice_s,
    ):
        off = math.fmod(s, dt)
        if _EPS < off < dt - _EPS:
            cuts.add(off)
    starts = np.array(sorted(cuts))
    lengths = np.diff(np.append(starts, dt))
    return starts, lengths


def _launch_window(n_ticks: int, mids: FloatArray, dt: float, cold_s: float, first: int) -> Any:
    """For each segment of each tick: the ticks whose launches are still starting there.

    A launch at tick ``l`` is not serving at ``tau`` when ``tau - cold < l*dt <= tau``.
    Returns (tick, segment, launch tick) triples with ``launch tick >= first``.
    """
    out_t, out_s, out_l = [], [], []
    for s, m in enumerate(mids):
        lo = math.floor((m - cold_s) / dt) + 1  # l >= t + lo
        for back in range(lo, 1):
            t = np.arange(n_ticks, dtype=np.int64)
            launch = t + back
            keep = launch >= first
            out_t.append(t[keep])
            out_s.append(np.full(int(keep.sum()), s, dtype=np.int64))
            out_l.append(launch[keep])
    if not out_t:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    return np.concatenate(out_t), np.concatenate(out_s), np.concatenate(out_l)


def offline_optimum(
    spec: FleetSpec,
    capacity: npt.ArrayLike,
    target: npt.ArrayLike | int,
    *,
    availability: float | None = None,
    exact_max_variables: int = EXACT_MAX_VARIABLES,
    time_limit_s: float = TIME_LIMIT_S,
) -> OptimalBound:
    """The oracle's least cost keeping at least ``availability`` (a share of the horizon;
    default: the best possible, `best_availability`).

    Example::

        spec = FleetSpec(zones=(Zone("a", 1.0, 3.0),), tick_seconds=60)
        offline_optimum(spec, [[1, 1, 0, 1]], 1).cost_relative
    """
    started = time.monotonic()
    cap, tgt = capacity_and_target(spec, capacity, target)
    reference = float(tgt.sum()) * spec.tick_seconds * spec.reference_on_demand_per_hour / 3600
    if availability is None:
        availability = best_availability(spec, cap, tgt, time_limit_s=time_limit_s)
    hold_all = availability >= 1.0 - _EPS and _all_coverable(spec)
    prog = _build(spec, cap, tgt, availability=None if hold_all else availability)
    exact = prog.n <= exact_max_variables
    res = prog.solve(integer=exact, time_limit_s=time_limit_s) if exact else None
    kind: BoundKind = "lower_bound"
    dual = None if res is None else getattr(res, "mip_dual_bound", None)
    if res is not None and res.status == 0:
        res = _checked_by_relaxation(prog, res, time_limit_s)
        cost, kind, method = float(res.fun), "optimal", "milp"
        gap = float(getattr(res, "mip_gap", 0.0) or 0.0)
    elif dual is not None and math.isfinite(dual):
        # stopped by the time limit: HiGHS's proven dual bound is still a lower bound
        cost, method = float(dual), "milp-dual-bound"
        gap = float(getattr(res, "mip_gap", math.nan) or math.nan)
    else:  # too large, or stopped before any bound: the LP relaxation is one
        limit = max(time_limit_s, LP_MIN_S if exact else LP_TIME_LIMIT_S)
        lp = prog.solve(integer=False, time_limit_s=limit)
        if lp.status != 0:
            raise OptimumNotFound(
                f"no optimum or bound within {limit:g} s ({prog.n:,} variables): "
                f"{lp.message}; give it longer (--optimal-time-limit)"
            )
        cost, method, gap = float(lp.fun), "lp-relaxation", math.nan
    per_tick = (
        prog.cost_per_tick(res.x, cap.shape[1]) if res is not None and kind == "optimal" else None
    )
    return OptimalBound(
        cost_per_tick=per_tick,
        cost=max(0.0, cost),
        reference_cost=reference,
        availability=availability,
        kind=kind,
        method=method,
        gap=gap,
        seconds=time.monotonic() - started,
        variables=prog.n,
        constraints=prog.m,
    )


def _checked_by_relaxation(prog: _Program, res: Any, time_limit_s: float) -> Any:
    """HiGHS's presolve (scipy 1.17) has called a schedule optimal that its own LP relaxation
    beats with an integral solution (2 zones, 4 ticks, a free committed node: 0.0083 "optimal"
    where 0 is feasible). On programs up to ``RELAXATION_CHECK_MAX_VARIABLES`` the relaxation
    is solved too; where it is cheaper, the MILP is solved again without presolve."""
    if prog.n > RELAXATION_CHECK_MAX_VARIABLES:
        return res
    lp = prog.solve(integer=False, time_limit_s=time_limit_s)
    if lp.status != 0 or float(lp.fun) >= float(res.fun) - 1e-9 * max(1.0, abs(float(res.fun))):
        return res
    again = prog.solve(integer=True, time_limit_s=time_limit_s, presolve=False)
    if again.status == 0 and float(again.fun) < float(res.fun):
        return again
    return res


def best_availability(
    spec: FleetSpec,
    capacity: npt.ArrayLike,
    target: npt.ArrayLike | int,
    *,
    time_limit_s: float = TIME_LIMIT_S,
) -> float:
    """The largest share of the horizon any schedule keeps ``target`` serving, cost aside.

    With on-demand available and a warm start that is the whole horizon; otherwise a MILP
    (maximising covered time) decides it; if its time limit ends the search first, the best
    schedule found so far (achievable, perhaps short of the best).
    """
    cap, tgt = capacity_and_target(spec, capacity, target)
    if _all_coverable(spec):
        return 1.0
    prog = _build(spec, cap, tgt, availability=0.0, maximise_cover=True)
    res = prog.solve(integer=True, time_limit_s=time_limit_s)
    horizon: float = cap.shape[1] * float(spec.tick_seconds)
    if res.x is None:
        raise OptimumNotFound(
            f"no schedule within {time_limit_s:g} s ({prog.n:,} variables) for the best "
            f"availability: {res.message}; give it longer (--optimal-time-limit)"
        )
    # optimal, or (time limit) the best schedule found: achievable either way, so the
    # optimum asked to hold it stays feasible
    return min(1.0, float(-res.fun) / horizon)


def _all_coverable(spec: FleetSpec) -> bool:
    return spec.on_demand_available and spec.warm_start


def _build(
    spec: FleetSpec,
    cap: IntArray,
    tgt: IntArray,
    *,
    availability: float | None,
    maximise_cover: bool = False,
) -> _Program:
    """The program. ``availability=None``: every segment covered (hard rows); else binary
    cover variables per segment with covered time >= availability * horizon (or, with
    ``maximise_cover``, covered time maximised and costs ignored)."""
    n_zones, n_ticks = cap.shape
    dt = float(spec.tick_seconds)
    starts, lengths = _segments(spec)
    mids = starts + lengths / 2
    n_seg = len(starts)
    notice = float(spec.preemption_notice_s)
    first = 1 if spec.warm_start else 0  # warm start: t=0 launches serve at once
    price_scale = 0.0 if maximise_cover else 1.0
    p = _Program()
    top = max(1, int(tgt.max()))

    # spot: u = un-noticed live replicas per (zone, tick), l = launches
    spot_price = np.array([z.spot_per_hour / 3600.0 for z in spec.zones])
    u = p.variables(
        n_zones * n_ticks,
        ub=cap.reshape(-1),
        cost=np.repeat(spot_price * dt, n_ticks) * price_scale,
        integer=True,
        tick=np.tile(np.arange(n_ticks), n_zones),
    ).reshape(n_zones, n_ticks)
    lau = p.variables(n_zones * n_ticks, ub=cap.reshape(-1), cost=0.0, integer=True).reshape(
        n_zones, n_ticks
    )
    # notice cohorts: noticed at k in zone z, ending at k*dt + notice or released at a later
    # tick start before that (j ticks later)
    drops = np.zeros_like(cap)
    drops[:, 1:] = np.maximum(0, cap[:, :-1] - cap[:, 1:])
    cohort_z, cohort_k = np.nonzero(drops)
    ends_after: list[float] = [notice]  # seconds after the notice tick's start
    j = 1
    while j * dt < notice - _EPS:
        ends_after.append(j * dt)
        j += 1
    n_coh = len(cohort_z) * len(ends_after)
    coh_z = np.repeat(cohort_z, len(ends_after))
    coh_k = np.repeat(cohort_k, len(ends_after))
    # billed until the end of the horizon at most, as the simulator bills
    coh_life = np.minimum(np.tile(np.array(ends_after), len(cohort_z)), (n_ticks - coh_k) * dt)
    w = p.variables(
        n_coh,
        ub=np.repeat(drops[cohort_z, cohort_k], len(ends_after)),
        cost=spot_price[coh_z] * coh_life * price_scale,
        integer=True,
        tick=coh_k,
    )

    # flow: u[t] <= u[t-1] - noticed[t] + launched[t]  (the rest released at t)
    zz, tt = np.meshgrid(np.arange(n_zones), np.arange(n_ticks), indexing="ij")
    row = (zz * n_ticks + tt).reshape(-1)
    entries: list[tuple[IntArray, IntArray, npt.ArrayLike]] = [
        (row, u.reshape(-1), 1.0),
        (row, lau.reshape(-1), -1.0),
    ]
    prev = tt.reshape(-1) >= 1
    entries.append((row[prev], u[:, :-1].reshape(-1), -1.0))
    if n_coh:
        entries.append((coh_z * n_ticks + coh_k, w, 1.0))
    p.rows(n_zones * n_ticks, entries, -np.inf, 0.0)
    # a cohort's replicas were live the tick before; several end choices share the fall
    if n_coh:
        groups = np.repeat(np.arange(len(cohort_z)), len(ends_after))
        p.rows(
            len(cohort_z),
            [(groups, w, 1.0), (np.arange(len(cohort_z)), u[cohort_z, cohort_k - 1], -1.0)],
            -np.inf,
            0.0,
        )
        if len(ends_after) > 1:
            p.rows(len(cohort_z), [(groups, w, 1.0)], -np.inf, drops[cohort_z, cohort_k])

    # on-demand (cheapest price) and committed
    od = lod = None
    if spec.on_demand_available:
        od_price = spec.reference_on_demand_per_hour / 3600.0
        od = p.variables(
            n_ticks,
            ub=np.inf,
            cost=od_price * dt * price_scale,
            integer=True,
            tick=np.arange(n_ticks),
        )
        lod = p.variables(n_ticks, ub=np.inf, cost=0.0, integer=True)
        r = np.arange(n_ticks)
        p.rows(
            n_ticks,
            [(r, od, 1.0), (r, lod, -1.0), (r[1:], od[:-1], -1.0)],
            -np.inf,
            0.0,
        )
    committed = None
    horizon = n_ticks * dt
    if spec.committed_per_hour > 0 or spec.committed_replicas > 0:
        limit = top if spec.committed_per_hour > 0 else spec.committed_replicas
        committed = p.variables(
            1,
            ub=limit,
            cost=spec.committed_per_hour / 3600.0 * horizon * price_scale,
            integer=True,
            tick=SPREAD,
        )

    # cover: serving in each (tick, segment) >= target (* y)
    n_cover = n_ticks * n_seg

    def crow(t: Any, s: Any) -> Any:  # the cover row of (tick, segment)
        return t * n_seg + s

    t_all = np.repeat(np.arange(n_ticks), n_seg)
    s_all = np.tile(np.arange(n_seg), n_ticks)
    cov: list[tuple[IntArray, IntArray, npt.ArrayLike]] = []
    wt, ws, wl = _launch_window(n_ticks, mids, dt, spec.spot_startup.cold_start_s, first)
    for z in range(n_zones):
        cov.append((crow(t_all, s_all), u[z, t_all], 1.0))
        cov.append((crow(wt, ws), lau[z, wl], -1.0))
    # noticed replicas serve (if ready) until their end
    for i in range(n_coh):
        k = int(coh_k[i])
        end = k * dt + float(coh_life[i])
        t = k
        while t < n_ticks and t * dt < end:
            for s in range(n_seg):
                if t * dt + mids[s] < end:
                    cov.append((np.array([crow(t, s)]), np.array([w[i]]), np.array([1.0])))
            t += 1
    if od is not None and lod is not None:
        cov.append((crow(t_all, s_all), od[t_all], 1.0))
        wt, ws, wl = _launch_window(n_ticks, mids, dt, spec.on_demand_startup.cold_start_s, first)
        cov.append((crow(wt, ws), lod[wl], -1.0))
    if committed is not None:
        cov.append((np.arange(n_cover), np.full(n_cover, committed[0]), 1.0))
    need = tgt[t_all].astype(np.float64)
    if availability is None:
        p.rows(n_cover, cov, need, np.inf)
    else:
        seg_len = lengths[s_all]
        cover = p.variables(n_cover, ub=1.0, cost=-seg_len if maximise_cover else 0.0, integer=True)
        cov.append((np.arange(n_cover), cover, -need))
        p.rows(n_cover, cov, 0.0, np.inf)
        if not maximise_cover:
            p.rows(
                1,
                [(np.zeros(n_cover, dtype=np.int64), cover, seg_len)],
                availability * horizon - 1e-6 * dt,
                np.inf,
            )
    return p


__all__ = ["OptimalBound", "OptimumNotFound", "best_availability", "offline_optimum"]
