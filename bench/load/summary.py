"""Medians, ratios and the printed/written forms of the load benchmark (rich, markdown, JSON).

Pure over the run records; the only I/O is the printing and file writing at the bottom.
The environment lines come from bench/fetch's report (same link, same emulator check).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from contenders import Contender
from report import environment_lines  # bench/fetch/report.py

MB = 1e6
OVERHEAD_GOAL_BYTES = 512e6  # ours: peak RSS at most 512 MB above the tensors


@dataclass(frozen=True)
class LoadRecord:
    """One contender, one repeat."""

    tool: str
    repeat: int
    ok: bool
    seconds: float  # worker: its own imports + the load, to the last tensor ready
    wall_s: float  # whole process, interpreter and torch start-up and verification included
    startup_s: float  # interpreter + torch + safetensors imports, before the clock starts
    bytes_total: int  # tensor bytes (transfer rows: file bytes fetched)
    tensors: int
    peak_rss_bytes: int
    rss_after_imports_bytes: int
    link_bytes_down: int
    max_concurrent_connections: int
    returncode: int | None
    error: str
    note: str
    load_1m: float


@dataclass(frozen=True)
class LoadSummary:
    tool: str
    runs: int
    ok_runs: int
    seconds: float | None  # medians over ok runs
    mb_per_s: float | None
    over_floor: float | None  # seconds / (bytes / aggregate cap)
    over_transfer: float | None  # seconds / median transfer-only seconds, same store
    peak_rss_bytes: float | None
    rss_over_tensors_bytes: float | None
    this_over_ours: float | None  # this seconds / spotstart load (same store) seconds
    max_conns: int | None
    error: str
    notes: str


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(
    records: Sequence[LoadRecord],
    contenders: Sequence[Contender],
    cap_bytes_per_s: float | None,
) -> list[LoadSummary]:
    """One row per contender, in the order given."""

    def good(name: str) -> list[LoadRecord]:
        return [r for r in records if r.tool == name and r.ok]

    transfer_s = {
        c.store: _median([r.seconds for r in good(c.name)]) for c in contenders if c.transfer
    }
    ours_s = {c.store: _median([r.seconds for r in good(c.name)]) for c in contenders if c.ours}
    ours_any = next((v for v in ours_s.values() if v), None)
    rows = []
    for c in contenders:
        runs = [r for r in records if r.tool == c.name]
        ok = good(c.name)
        secs = _median([r.seconds for r in ok])
        total = ok[0].bytes_total if ok else 0
        floor_s = total / cap_bytes_per_s if cap_bytes_per_s and total else None
        xfer = transfer_s.get(c.store)
        ours = ours_s.get(c.store) or ours_any
        errors = [r.error for r in runs if not r.ok and r.error]
        rows.append(
            LoadSummary(
                tool=c.name,
                runs=len(runs),
                ok_runs=len(ok),
                seconds=secs,
                mb_per_s=total / secs / MB if secs else None,
                over_floor=secs / floor_s if secs and floor_s else None,
                over_transfer=secs / xfer if secs and xfer and not c.transfer else None,
                peak_rss_bytes=_median([r.peak_rss_bytes for r in ok]),
                rss_over_tensors_bytes=(
                    None if c.transfer else _median([r.peak_rss_bytes - r.bytes_total for r in ok])
                ),
                this_over_ours=secs / ours if secs and ours and not c.transfer else None,
                max_conns=max((r.max_concurrent_connections for r in ok), default=None),
                error=errors[0] if errors else "",
                notes=" | ".join(dict.fromkeys(r.note for r in runs if r.note))[:700],
            )
        )
    return rows


def _fmt(value: float | None, spec: str, suffix: str = "", scale: float = 1.0) -> str:
    return "-" if value is None else f"{value / scale:{spec}}{suffix}"


COLUMNS = (
    "Tool",
    "Runs ok",
    "Ready s",
    "MB/s",
    "x floor",
    "x transfer",
    "Peak RSS MB",
    "RSS - tensors MB",
    "this / ours",
    "Max conns",
)


def table_cells(row: LoadSummary) -> list[str]:
    if row.ok_runs == 0:
        why = row.error.splitlines()[0][:90] if row.error else "failed"
        return [row.tool, f"0/{row.runs}", "FAILED", why, *[""] * (len(COLUMNS) - 4)]
    return [
        row.tool,
        f"{row.ok_runs}/{row.runs}",
        _fmt(row.seconds, ".2f"),
        _fmt(row.mb_per_s, ".0f"),
        _fmt(row.over_floor, ".2f"),
        _fmt(row.over_transfer, ".2f"),
        _fmt(row.peak_rss_bytes, ".0f", scale=MB),
        _fmt(row.rss_over_tensors_bytes, ".0f", scale=MB),
        _fmt(row.this_over_ours, ".2f", "x"),
        str(row.max_conns) if row.max_conns is not None else "-",
    ]


def load_lines(rows: Sequence[LoadSummary], env: Mapping[str, Any]) -> list[str]:
    cap = env["link"]["aggregate_bytes_per_s"]
    tb = env.get("tensor_bytes", 0)
    lines = [
        f"Checkpoint: {env['tensor_count']} BF16 tensors, {tb / MB:.0f} MB of tensor data; "
        f"device {env.get('device', 'cpu')}; verification: {env['verify']} (bit patterns vs "
        "safetensors' read of the local source files)",
        "Ready s: median, from the worker's first tool import to the last tensor materialised "
        "(interpreter + torch start-up not included: median "
        f"{env.get('startup_s_median', 0):.2f} s per process)",
        (
            f"x floor: Ready s / (tensor bytes / aggregate cap = {tb / cap:.2f} s); "
            if cap
            else "x floor: - (link uncapped); "
        )
        + "x transfer: Ready s / median `spotstart fetch` of the same store to local disk "
        "(fsync off) in this run",
        "RSS - tensors: peak RSS (ru_maxrss) minus tensor bytes; includes interpreter + torch "
        f"(~{env.get('rss_after_imports_median', 0) / MB:.0f} MB after imports). "
        f"Goal for spotstart load: <= {OVERHEAD_GOAL_BYTES / MB:.0f} MB",
        "this / ours: Ready s of the row / Ready s of spotstart load on the same store "
        "(>1 = spotstart is faster)",
    ]
    for r in rows:
        if r.tool.startswith("spotstart load") and r.rss_over_tensors_bytes is not None:
            verdict = "meets" if r.rss_over_tensors_bytes <= OVERHEAD_GOAL_BYTES else "MISSES"
            lines.append(
                f"{r.tool}: {r.rss_over_tensors_bytes / MB:.0f} MB over the tensors: "
                f"{verdict} the {OVERHEAD_GOAL_BYTES / MB:.0f} MB goal"
            )
    return lines


def all_lines(rows: Sequence[LoadSummary], env: Mapping[str, Any]) -> list[str]:
    # bench/fetch's lines speak of its "x cap" column; here the cap feeds "x floor"
    fetch_lines = [
        line.replace('("x cap" divides by this)', '("x floor" uses this)')
        for line in environment_lines(env)
    ]
    return load_lines(rows, env) + fetch_lines


def print_rich(rows: Sequence[LoadSummary], env: Mapping[str, Any], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=180)
    table = Table(title=title)
    for col in COLUMNS:
        table.add_column(col, justify="left" if col == "Tool" else "right")
    for row in rows:
        table.add_row(*table_cells(row))
    console.print(table)
    for line in all_lines(rows, env):
        console.print(line, highlight=False, markup=False)


def markdown(
    rows: Sequence[LoadSummary], env: Mapping[str, Any], invocations: Mapping[str, str]
) -> str:
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [c.replace("|", "\\|") for c in table_cells(row)]
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    out += [f"- {line}" for line in all_lines(rows, env)]
    out += ["", "Invocations (each a fresh process; DEST a fresh empty directory):", ""]
    out += [f"- {row.tool}: `{invocations.get(row.tool, '?')}`" for row in rows]
    noted = [r for r in rows if r.notes]
    if noted:
        out += ["", "Notes (per tool, distinct over runs):", ""]
        out += [f"- {r.tool}: {r.notes}".replace("\n", " ") for r in noted]
    failed = [r for r in rows if r.ok_runs < r.runs and r.error]
    if failed:
        out += ["", "Failures:", ""]
        out += [f"- {r.tool}: {r.error.strip()[:800]}".replace("\n", " / ") for r in failed]
    return "\n".join(out) + "\n"


def write_results(
    path_json: Path,
    path_md: Path,
    records: Sequence[LoadRecord],
    rows: Sequence[LoadSummary],
    env: Mapping[str, Any],
    invocations: Mapping[str, str],
) -> None:
    path_json.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "environment": env,
        "summary": [asdict(r) for r in rows],
        "runs": [asdict(r) for r in records],
        "invocations": invocations,
    }
    path_json.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    path_md.write_text(markdown(rows, env, invocations))
