"""Figures and the self-contained HTML report of `spotstart plan` (matplotlib, Agg backend).
Output only; nothing here decides anything. Needs the ``plan`` extra."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from spotstart import safefs
from spotstart.fleet.optimal import OptimalBound
from spotstart.fleet.simulator import FleetRun
from spotstart.fleet.sweep import SweepPoint, versus_optimum


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bound_line(bound: OptimalBound) -> str:
    """One line saying what the optimum is and how it was found."""
    how = (
        f"exact MILP, {bound.seconds:.1f} s"
        if bound.kind == "optimal"
        else f"a proven lower bound ({bound.method}), {bound.seconds:.1f} s"
    )
    return (
        f"offline optimum (an oracle that knows the whole trace; {how}): "
        f"{bound.cost_relative:.3f} of all-on-demand at {bound.availability * 100:.3f}% "
        "available, the best possible"
    )


def run_rows(runs: Sequence[FleetRun], bound: OptimalBound | None = None) -> list[dict[str, str]]:
    """The report table, formatted: one row per policy (with the optimum: its cost over the
    optimum's and its availability against the best possible, in percentage points).
    ``cost`` is the share of all-on-demand."""
    rows = []
    for r in runs:
        versus: dict[str, str] = {}
        if bound is not None:
            v = versus_optimum(r, bound)
            versus = {
                "x opt": f"{v['x_optimal_cost']:.3f}",
                "vs best": f"{v['availability_vs_best'] * 100:+.3f}",
            }
        rows.append(
            {
                "policy": r.policy,
                "avail": f"{r.availability * 100:.3f}%",
                "cost": f"{r.cost_relative:.3f}",
                **versus,
                "h spot/OD/c": f"{r.spot_replica_hours:.0f}/{r.on_demand_replica_hours:.0f}"
                f"/{r.committed_replica_hours:.0f}",
                "below h": f"{r.time_below_target_s / 3600:.2f}",
            }
        )
    return rows


def runs_figure_png(
    runs: Sequence[FleetRun], title: str = "", bound: OptimalBound | None = None
) -> bytes:
    """PNG bytes: ready replicas (with the target) and cumulative cost over time, per policy
    (and the offline optimum's, when it was solved exactly)."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    for r in runs:
        hours = np.arange(len(r.ready_replicas)) * (r.horizon_s / len(r.ready_replicas)) / 3600
        ax1.plot(hours, r.ready_replicas, lw=0.7, label=r.policy, drawstyle="steps-post")
        cum = np.cumsum(r.cost_per_tick) / max(r.reference_cost, 1e-12)
        ax2.plot(hours, cum, lw=1.2, label=f"{r.policy} ({r.cost_relative:.2f})")
    if runs and bound is not None and bound.cost_per_tick is not None:
        r0 = runs[0]
        step_h = r0.horizon_s / len(r0.ready_replicas) / 3600
        opt = np.cumsum(bound.cost_per_tick) / max(r0.reference_cost, 1e-12)
        ax2.plot(
            np.arange(len(opt)) * step_h,
            opt,
            "k--",
            lw=1.4,
            label=f"offline optimum ({opt[-1]:.2f})",
        )
    if runs:
        r0 = runs[0]
        t_hours = np.arange(len(r0.target_replicas)) * (r0.horizon_s / len(r0.target_replicas))
        ax1.plot(t_hours / 3600, r0.target_replicas, "k--", lw=1, label="target")
    ax1.set_ylabel("ready replicas")
    ax1.legend(fontsize=7, ncol=4, loc="upper right")
    ax2.set_ylabel("cumulative cost / all-on-demand total")
    ax2.set_xlabel("hours")
    ax2.legend(fontsize=7, ncol=2, loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def sweep_figure_png(points: Sequence[SweepPoint], title: str = "") -> bytes:
    """PNG bytes: availability and relative cost versus each swept axis, one line per policy."""
    plt = _pyplot()
    axes_names = sorted({p.axis for p in points})
    fig, axes = plt.subplots(
        2, max(1, len(axes_names)), figsize=(6 * max(1, len(axes_names)), 7), squeeze=False
    )
    for col, axis in enumerate(axes_names):
        pts = [p for p in points if p.axis == axis]
        for policy in dict.fromkeys(p.policy for p in pts):
            xs = [p.value for p in pts if p.policy == policy]
            axes[0][col].plot(
                xs,
                [p.availability * 100 for p in pts if p.policy == policy],
                marker="o",
                label=policy,
            )
            axes[1][col].plot(
                xs, [p.cost_relative for p in pts if p.policy == policy], marker="o", label=policy
            )
        axes[0][col].set_ylabel("availability (%)")
        axes[1][col].set_ylabel("cost / all-on-demand")
        axes[1][col].set_xlabel("cold start (s)" if axis == "cold_start_s" else "zones")
        if axis == "cold_start_s":
            axes[0][col].set_xscale("log")
            axes[1][col].set_xscale("log")
        axes[0][col].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def html_report(
    runs: Sequence[FleetRun], title: str = "spotstart plan", bound: OptimalBound | None = None
) -> str:
    """One self-contained HTML page (figure inlined as base64): the table and the figure."""
    rows = run_rows(runs, bound)
    note = f"<p>{html.escape(bound_line(bound))}</p>" if bound is not None else ""
    head = "".join(f"<th>{html.escape(k)}</th>" for k in (rows[0] if rows else {}))
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row.values()) + "</tr>"
        for row in rows
    )
    png = base64.b64encode(runs_figure_png(runs, title, bound)).decode()
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif;margin:2em}}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:right}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>{note}<table><tr>{head}</tr>{body}</table>"
        f"<p><img alt='ready replicas and cost over time' src='data:image/png;base64,{png}'>"
        "</p></body></html>"
    )


def write_bytes(path: str | Path, data: bytes | str) -> None:
    """Write a report file, creating its directory."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    safefs.write_output(p, data)  # atomic, and never through a link at the name
