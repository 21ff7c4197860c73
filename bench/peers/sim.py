"""The fleet simulation's table: N nodes fetching one model with peers, today's design beside
the new one, driven by the real fetch's decisions (:mod:`spotstart.fetch.swarmsim` runs
:mod:`spotstart.fetch.swarm`'s picker, sampler, backoff, ring and token bucket on a simulated
clock and network). Writes ``bench/results/peers-sim.json`` and ``peers-sim.md``.

    python bench/peers/sim.py                          # N = 8, 16, 64, 256, 1024
    python bench/peers/sim.py --nodes 8 16 --chunk-mib 256
    python bench/peers/sim.py --set wait_s=5 --set sample=16   # a real parameter tuned
    python bench/peers/sim.py --calibrate              # beside the real namespace runs

Calibration (``--calibrate``): the runs in ``/tmp/team/netns-results.json`` (written by
``bench/peers/run.py``'s namespace mode) if present, else today's ``bench/results/peers-*.json``
(one machine, receive side paced only), replayed with their own model size, links, stagger
and chunk size; a node's fixed overhead is taken from the real single-node time.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from spotstart.fetch import swarm
from spotstart.fetch.swarmsim import SimConfig, SimResult, simulate

RESULTS = Path(__file__).resolve().parent.parent / "results"
NETNS = Path("/tmp/team/netns-results.json")
# "swarm": the new design as committed (swarm.py, PeerSet, scheduler), its defaults;
# "proposed": that plus the change the simulation suggests (SimConfig.on_busy="retry");
# "today": every inventory whole from every peer every second.
DESIGNS: dict[str, Literal["swarm", "today"]] = {
    "swarm": "swarm",
    "proposed": "swarm",
    "today": "today",
}


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _parse_set(items: list[str]) -> dict[str, Any]:
    fields = {f.name: f for f in dataclasses.fields(SimConfig)}
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in fields:
            sys.exit(f"--set {item}: no such parameter (one of {', '.join(fields)})")
        default = getattr(SimConfig(1), key)
        if value == "none":
            out[key] = None
        elif isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(default, str):
            out[key] = value
        else:
            out[key] = type(default or 0.0)(value)
    return out


def table(
    args: argparse.Namespace, progress: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    base = SimConfig(
        nodes=1,
        model_bytes=int(args.model_gb * 1e9),
        chunk_bytes=args.chunk_mib << 20,
        spread_s=args.spread,
        max_time_s=args.max_time,
        seed=args.seed,
    )
    tuned = _parse_set(args.set)
    single = simulate(base)
    one_s = single.last_ready_s
    rows: list[dict[str, Any]] = []
    result = {
        "params": dataclasses.asdict(base) | {"chunks": base.chunk_count(), "tuned": tuned},
        "single_node_s": round(one_s, 2),
        "rows": rows,
    }
    for n in args.nodes:
        for design in args.designs:
            cfg = dataclasses.replace(base, nodes=n, design=DESIGNS[design])
            if design != "today":
                cfg = dataclasses.replace(cfg, **tuned)
            if design == "proposed":
                cfg = dataclasses.replace(cfg, on_busy="retry")
            t0 = time.perf_counter()
            r = simulate(cfg)
            row = r.row()
            row["design"] = design
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            row["goal_p99_s"] = round(1.5 * one_s + cfg.spread_s, 1)
            rows.append(row)
            print(_line(r, row), flush=True)
            if progress is not None:
                progress(result)
    return result


def _line(r: SimResult, row: dict[str, Any]) -> str:
    unfinished = "" if r.finished == r.config.nodes else f" ({r.finished} done)"
    return (
        f"N={r.config.nodes:5d} {row['design']:8s} origin {r.origin_x_model:7.2f}x  "
        f"p50 {r.ready_pct(50):8.1f}s p99 {r.ready_pct(99):8.1f}s last {r.last_ready_s:8.1f}s"
        f"{unfinished}  control/node {_fmt_bytes(r.control_per_node):>9s} "
        f"ctl/data {_pct(r.control_ratio)}  503s {r.refused}  [{row['wall_s']} s]"
    )


def _real_runs(path: Path) -> tuple[str, list[dict[str, Any]]]:
    """(where from, rows: nodes, model_bytes, origin_x_model, last_ready_s, single_s, link...)."""
    if path.exists():
        data = json.loads(path.read_text())
        rows = data["rows"] if isinstance(data, dict) and "rows" in data else data
        return str(path), list(rows)
    paths = sorted(RESULTS.glob("peers-2*.json"))
    if not paths:
        sys.exit("no real peers runs to calibrate against")
    data = json.loads(paths[-1].read_text())
    env = data["env"]
    single = next(r["last_ready_s"] for r in data["rows"] if r["nodes"] == 1)
    out = []
    for r in data["rows"]:
        if r["mode"] not in ("origin", "md5") or r["nodes"] < 4:
            continue
        out.append(
            {
                "nodes": r["nodes"],
                "design": "today" if r["mode"] == "md5" else "none",
                "model_bytes": env["model_mb"] * 2**20,
                "objects": 2,
                "stagger_s": env["stagger_s"],
                "origin_rate": env["origin_mb_s"] * 1e6,
                "origin_conn_rate": 50e6,
                "downlink": env["nic_mb_s"] * 1e6,
                "uplink": None,
                "origin_x_model": r["origin_x_model"],
                "last_ready_s": r["last_ready_s"],
                "single_s": single,
            }
        )
    return str(paths[-1]), out


def calibrate(args: argparse.Namespace) -> dict[str, Any]:
    source, real = _real_runs(args.real)
    rows = []
    for rr in real:
        if rr.get("design") == "none":
            continue
        n = int(rr["nodes"])
        cfg = SimConfig(
            nodes=n,
            model_bytes=int(rr["model_bytes"]),
            chunk_bytes=int(rr.get("chunk_bytes") or 16 << 20),
            objects=int(rr.get("objects") or 2),
            streams=int(rr.get("streams") or 8),
            downlink=float(rr["downlink"]),
            uplink=float(rr["uplink"] or 1e12),
            origin_rate=float(rr["origin_rate"]),
            origin_conn_rate=rr.get("origin_conn_rate"),
            serve_rate=rr.get("serve_rate"),
            spread_s=float(rr.get("spread_s", rr.get("stagger_s", 0.0) * (n - 1))),
            design=rr.get("design", "swarm"),
            origin_rtt_s=float(rr.get("origin_rtt_s") or 0.03),
            seed=args.seed,
        )
        alone = simulate(dataclasses.replace(cfg, nodes=1, spread_s=0.0))
        overhead = max(0.0, float(rr["single_s"]) - alone.last_ready_s)
        runs = [
            simulate(dataclasses.replace(cfg, node_overhead_s=overhead, seed=args.seed + i))
            for i in range(args.seeds)
        ]
        runs.sort(key=lambda x: x.last_ready_s)
        r = runs[len(runs) // 2]  # the median run by last ready time
        row = {
            "nodes": n,
            "design": cfg.design,
            "chunk_bytes": cfg.chunk_bytes,
            "real_origin_x_model": rr["origin_x_model"],
            "sim_origin_x_model": round(r.origin_x_model, 3),
            "real_last_ready_s": rr["last_ready_s"],
            "sim_last_ready_s": round(r.last_ready_s, 2),
            "last_ready_error": round(r.last_ready_s / float(rr["last_ready_s"]) - 1, 3),
            "origin_error": round(r.origin_x_model / float(rr["origin_x_model"]) - 1, 3),
            "real_control_over_data": rr.get("control_x_data"),
            "sim_control_over_data": r.control_ratio,
            "real_single_s": rr["single_s"],
            "sim_single_s_without_overhead": round(alone.last_ready_s, 2),
            "node_overhead_s": round(overhead, 2),
            "cpu_busy": rr.get("cpu_busy"),
            "sim_requests": dict(sorted(r.why.items())),
        }
        rows.append(row)
        print(
            f"calibration N={n} {cfg.design}: origin real {rr['origin_x_model']}x sim "
            f"{r.origin_x_model:.2f}x; last ready real {rr['last_ready_s']} s sim "
            f"{r.last_ready_s:.2f} s ({100 * row['last_ready_error']:+.0f}%)",
            flush=True,
        )
    return {"source": source, "rows": rows}


def markdown(out: dict[str, Any]) -> str:
    lines = []
    t = out.get("table")
    if t:
        p = t["params"]
        lines += [
            f"# bench/peers/sim.py: {p['model_bytes'] / 1e9:.0f} GB model as {p['chunks']} chunks "
            f"of {p['chunk_bytes'] >> 20} MiB, nodes arriving evenly over {p['spread_s']:.0f} s, "
            f"{p['streams']} streams, down/up {p['downlink'] / 1e9:g}/{p['uplink'] / 1e9:g} GB/s "
            f"per node, origin {p['origin_rate'] / 1e9:g} GB/s for the zone, serve pace "
            + (f"{p['serve_rate'] / 1e9:g} GB/s" if p["serve_rate"] else "none")
            + f" (new design), sample {p['sample']}, "
            f"wait {p['wait_s']:g} s; tuned: {p['tuned'] or 'nothing'}",
            "",
            f"One node alone: {t['single_node_s']} s. Goal p99 = 1.5 x that + the spread.",
            "",
            "| N | design | origin bytes / model | p50 ready s | p99 ready s | last ready s | "
            "goal p99 s | control per node | control / data | 503s | chunk requests |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in t["rows"]:
            done = (
                ""
                if r["finished"] == r["nodes"]
                else f" ({r['finished']} of {r['nodes']} by {p['max_time_s']:.0f} s)"
            )
            lines.append(
                f"| {r['nodes']} | {r['design']} | {r['origin_x_model']:.2f} | "
                f"{_s(r['p50_ready_s'])} | {_s(r['p99_ready_s'])} | "
                f"{_s(r['last_ready_s'])}{done} | "
                f"{r['goal_p99_s']} | {_fmt_bytes(r['control_per_node_bytes'])} | "
                f"{_pct(r['control_over_data'])} | {r['refused']} | "
                + ", ".join(f"{k} {v}" for k, v in r["requests"].items())
                + " |"
            )
    c = out.get("calibration")
    if c:
        lines += [
            "",
            f"## Calibration against {c['source']}",
            "",
            "| N | design | origin x real | origin x sim | last ready real s | last ready sim s "
            "| error | control/data real | control/data sim |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in c["rows"]:
            lines.append(
                f"| {r['nodes']} | {r['design']} | {r['real_origin_x_model']:.2f} | "
                f"{r['sim_origin_x_model']:.2f} | {r['real_last_ready_s']:.2f} | "
                f"{r['sim_last_ready_s']:.2f} | {100 * r['last_ready_error']:+.0f}% | "
                f"{_pct(r['real_control_over_data'])} | {_pct(r['sim_control_over_data'])} |"
            )
    if "swarm_py_sha256" in out:
        lines += [
            "",
            f"Run {out['written']} with src/spotstart/fetch/swarm.py sha256 "
            f"{out['swarm_py_sha256']}... (the decisions simulated).",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, nargs="+", default=[8, 16, 64, 256, 1024])
    ap.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=list(DESIGNS))
    ap.add_argument("--model-gb", type=float, default=140.0)
    ap.add_argument("--chunk-mib", type=int, default=1024)
    ap.add_argument("--spread", type=float, default=60.0)
    ap.add_argument("--max-time", type=float, default=3600.0, help="simulated seconds at most")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=3, help="calibration: runs per row (median)")
    ap.add_argument("--set", action="append", default=[], help="SimConfig field=value (swarm)")
    ap.add_argument("--calibrate", action="store_true", help="also replay the real runs")
    ap.add_argument("--real", type=Path, default=NETNS, help="real runs (netns hand-off)")
    ap.add_argument("--no-table", action="store_true")
    ap.add_argument("--md-only", action="store_true", help="rewrite OUT.md from OUT.json")
    ap.add_argument("--out", default="peers-sim", help="results file stem")
    args = ap.parse_args()
    # which decisions ran: swarm.py changes under the simulation (the point of it)
    out: dict[str, Any] = {
        "swarm_py_sha256": hashlib.sha256(Path(swarm.__file__).read_bytes()).hexdigest()[:16],
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    RESULTS.mkdir(exist_ok=True)
    if args.md_only:
        (RESULTS / f"{args.out}.md").write_text(
            markdown(json.loads((RESULTS / f"{args.out}.json").read_text()))
        )
        return

    def write() -> None:
        (RESULTS / f"{args.out}.json").write_text(json.dumps(_finite(out), indent=1) + "\n")
        (RESULTS / f"{args.out}.md").write_text(markdown(out))

    if args.calibrate:
        out["calibration"] = calibrate(args)
        write()
    if not args.no_table:

        def progress(result: dict[str, Any]) -> None:
            out["table"] = result
            write()

        out["table"] = table(args, progress)
    write()
    print(f"wrote {RESULTS / args.out}.json and .md")


def _s(x: float | None) -> str:
    """A ready time; None (JSON) or inf: not ready when the run stopped."""
    return "-" if x is None or math.isinf(x) else f"{x}"


def _pct(x: float | None) -> str:
    return "-" if x is None or math.isinf(x) else f"{100 * x:.3f}%"


def _finite(x: Any) -> Any:
    """JSON has no infinity: an unfinished node's ready time is written as null."""
    if isinstance(x, float) and math.isinf(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


if __name__ == "__main__":
    main()
