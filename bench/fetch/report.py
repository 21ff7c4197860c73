"""Medians, ratios and the printed/written forms of a fetch benchmark (rich table, markdown, JSON).

Pure over the run records; the only I/O is the printing and file writing at the bottom.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RunRecord:
    """One tool, one repeat."""

    tool: str
    repeat: int
    ok: bool
    wall_s: float
    cpu_s: float
    bytes_total: int
    link_bytes_down: int  # every byte the link relayed to the tool (headers, TLS included)
    link_body_bytes_down: int  # HTTP body bytes (0 over TLS, which the relay cannot parse)
    requests: int  # HTTP requests seen by the link (0 over TLS)
    connections: int
    max_concurrent_connections: int
    returncode: int | None
    error: str
    note: str
    tool_report: Mapping[str, Any] | None  # ours: the --json summary
    load_1m: float  # machine load average when the run started (other work on the box)
    stderr_tail: str  # what the tool printed last (how it copied, or why it failed)

    @property
    def mb_per_s(self) -> float:
        return self.bytes_total / self.wall_s / 1e6 if self.wall_s > 0 else 0.0


@dataclass(frozen=True)
class ToolSummary:
    tool: str
    concurrency: str
    runs: int
    ok_runs: int
    wall_s: float | None  # medians over ok runs
    mb_per_s: float | None
    of_cap: float | None
    of_ceiling: float | None  # MB/s over 16 curl streams' through the same link, same run
    cpu_s_per_gb: float | None
    link_bytes_ratio: float | None  # bytes the link relayed / data-set bytes
    max_conns: int | None
    requests: int | None
    ours_over_this: float | None  # spotstart gs:// MB/s divided by this tool's MB/s
    error: str
    notes: str  # distinct notes of its runs (what the tool said, extra files, our own report)


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(
    records: Sequence[RunRecord],
    tools: Sequence[tuple[str, str]],
    cap_bytes_per_s: float | None,
    reference: str,
    ceiling_mb_per_s: float | None = None,
) -> list[ToolSummary]:
    """One row per (tool name, concurrency note), in the order given."""
    rows: list[ToolSummary] = []
    for name, concurrency in tools:
        runs = [r for r in records if r.tool == name]
        good = [r for r in runs if r.ok]
        wall = _median([r.wall_s for r in good])
        total = good[0].bytes_total if good else 0
        mbps = total / wall / 1e6 if wall else None
        errors = sorted({r.error for r in runs if not r.ok and r.error})
        rows.append(
            ToolSummary(
                tool=name,
                concurrency=concurrency,
                runs=len(runs),
                ok_runs=len(good),
                wall_s=wall,
                mb_per_s=mbps,
                of_cap=mbps * 1e6 / cap_bytes_per_s if mbps and cap_bytes_per_s else None,
                of_ceiling=mbps / ceiling_mb_per_s if mbps and ceiling_mb_per_s else None,
                cpu_s_per_gb=_median([r.cpu_s / (r.bytes_total / 1e9) for r in good]),
                link_bytes_ratio=_median([r.link_bytes_down / r.bytes_total for r in good]),
                max_conns=max((r.max_concurrent_connections for r in good), default=None),
                requests=int(m) if (m := _median([r.requests for r in good])) else None,
                ours_over_this=None,
                error=errors[0] if errors else "",
                notes=" | ".join(dict.fromkeys(r.note for r in runs if r.note))[:700],
            )
        )
    ref = next((r for r in rows if r.tool == reference), None)
    if ref is None or ref.mb_per_s is None:
        return rows
    ref_mbps = ref.mb_per_s
    return [
        ToolSummary(**{**asdict(r), "ours_over_this": ref_mbps / r.mb_per_s}) if r.mb_per_s else r
        for r in rows
    ]


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


COLUMNS = (
    "Tool",
    "Runs ok",
    "Median s",
    "MB/s",
    "x cap",
    "x ceiling",
    "CPU s/GB",
    "Link bytes / data",
    "Max conns",
    "spotstart gs:// / this",
)


def table_cells(row: ToolSummary) -> list[str]:
    if row.ok_runs == 0:
        why = row.error.splitlines()[0][:90] if row.error else "failed"
        return [row.tool, f"0/{row.runs}", "FAILED", why, "", "", "", "", "", ""]
    return [
        row.tool,
        f"{row.ok_runs}/{row.runs}",
        _fmt(row.wall_s, ".2f"),
        _fmt(row.mb_per_s, ".0f"),
        _fmt(row.of_cap, ".2f"),
        _fmt(row.of_ceiling, ".2f"),
        _fmt(row.cpu_s_per_gb, ".1f"),
        _fmt(row.link_bytes_ratio, ".3f"),
        str(row.max_conns) if row.max_conns is not None else "-",
        _fmt(row.ours_over_this, ".2f", "x"),
    ]


def environment_lines(env: Mapping[str, Any]) -> list[str]:
    link = env["link"]
    ceil = env.get("ceilings", [])
    lines = [
        f"Data set: {env['files']} files, {env['bytes_total'] / 1e6:.0f} MB "
        f"({env['shards']} x {env['shard_bytes'] / 1e6:.0f} MB shards + 3 JSON files), "
        f"{env['repeats']} repeats, medians, page cache dropped before each run: "
        f"{env['drop_caches']}",
        f"Link: {_rate(link['per_conn_bytes_per_s'])} per connection, "
        f"{link['first_byte_latency_s'] * 1000:.0f} ms first byte, "
        f'aggregate cap {_rate(link["aggregate_bytes_per_s"])} ("x cap" divides by this; '
        '"x ceiling" by the capped-link check: 16 curl streams, same link, same run)',
    ]
    lines += [
        f"Emulator check: {c['label']}: {c['mb_per_s']:.0f} MB/s ({c['streams']} curl "
        f"streams to /dev/null)"
        for c in ceil
    ]
    loads = [r for r in env.get("load_1m_at_runs", [])]
    if loads:
        lines.append(
            f"Load average (1 min) at run starts: median {statistics.median(loads):.1f}, "
            f"max {max(loads):.1f} on {env['cores']} cores (shared machine: other work adds noise)"
        )
    lines.append(
        f"Machine: {env['cpu_model']}, {env['cores']} cores, {env['mem_gb']:.0f} GB, "
        f"kernel {env['kernel']}, Python {env['python']}"
    )
    lines += [f"{name}: {version}" for name, version in env["versions"].items()]
    return lines


def _rate(value: float | None) -> str:
    return "uncapped" if value is None else f"{value / 1e6:.0f} MB/s"


def print_rich(rows: Sequence[ToolSummary], env: Mapping[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    table = Table(title="spotstart fetch vs rivals (same emulator, same link)")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col == "Tool" else "right")
    for row in rows:
        table.add_row(*table_cells(row))
    console.print(table)
    for line in environment_lines(env):
        console.print(line, highlight=False, markup=False)


def markdown(
    rows: Sequence[ToolSummary], env: Mapping[str, Any], invocations: Mapping[str, str]
) -> str:
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [c.replace("|", "\\|") for c in table_cells(row)]
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    out += [f"- {line}" for line in environment_lines(env)]
    out += ["", "Invocations (DEST is a fresh empty directory each run):", ""]
    for row in rows:
        out.append(f"- {row.tool} ({row.concurrency}): `{invocations.get(row.tool, '?')}`")
    noted = [r for r in rows if r.notes]
    if noted:
        out += ["", "Notes (per tool, distinct over runs):", ""]
        out += [f"- {r.tool}: {r.notes}".replace("\n", " ") for r in noted]
    failed = [r for r in rows if r.ok_runs < r.runs and r.error]
    if failed:
        out += ["", "Failures:", ""]
        out += [f"- {r.tool}: {r.error.strip()[:600]}".replace("\n", " / ") for r in failed]
    return "\n".join(out) + "\n"


def write_results(
    path_json: Path,
    path_md: Path,
    records: Sequence[RunRecord],
    rows: Sequence[ToolSummary],
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


def startup_lines(start_up: Mapping[str, Any]) -> list[str]:
    """The start-up section: spotstart's own figures (startup.py), then each tool's version
    command, the nearest thing every tool has to "start and do nothing"."""
    if not start_up:
        return ["Start-up not measured (--startup-repeats 0)."]
    ours = start_up["spotstart"]
    v, h = ours["version_imports"], ours["help_imports"]
    lines = [
        f"`spotstart --version`: {ours['version_s'] * 1000:.0f} ms wall "
        f"(a bare `python -c pass`: {ours['python_bare_s'] * 1000:.0f} ms), {v['modules']} "
        f"modules, {v['import_ms']:.0f} ms importing (`-X importtime`), heavy: "
        f"{', '.join(v['heavy']) or 'none'}",
        f"`spotstart --help`: {ours['help_s'] * 1000:.0f} ms wall, {h['modules']} modules, "
        f"{h['import_ms']:.0f} ms importing, heavy: {', '.join(h['heavy']) or 'none'}",
        f"`spotstart fetch http://127.0.0.1/... --json` (4 MiB, local server, no link "
        f"emulation): first request {ours['fetch_first_request_s'] * 1000:.0f} ms after exec "
        f"(runs: {', '.join(f'{x * 1000:.0f}' for x in ours['fetch_first_request_all_s'])} ms), "
        f"exit after {ours['fetch_4mib_wall_s'] * 1000:.0f} ms",
        "Version command of each tool, median wall: "
        + ", ".join(
            f"`{cmd}` {s * 1000:.0f} ms" for cmd, s in start_up["tools_version_command_s"].items()
        ),
    ]
    env = start_up["environment"]
    lines.append(
        f"Measured {env['when_utc']}, load average {env['load_1m']:.1f} on {env['cores']} cores; "
        f"bytecode {ours['bytecode']}"
    )
    return lines


def _headline(sections: Sequence[Mapping[str, Any]]) -> list[str]:
    out = []
    for sec in sections:
        env = sec["environment"]
        size = f"{env['bytes_total'] / 1e6:.0f} MB"
        for row in sec["rows"]:
            if row.tool.startswith("spotstart") and row.of_ceiling is not None:
                # process wall minus the transfer's own seconds (its --json report): start-up,
                # listing before the transfer and exit after it
                outside = _median(
                    [
                        r.wall_s - float(r.tool_report["seconds"])
                        for r in sec["records"]
                        if r.tool == row.tool and r.ok and r.tool_report
                    ]
                )
                out.append(
                    f"{size}: {row.tool} {row.of_ceiling:.2f}x of 16 curl streams "
                    f"({row.mb_per_s:.0f} MB/s, {row.wall_s:.2f} s, "
                    f"{row.cpu_s_per_gb:.2f} CPU-s/GB; outside the transfer "
                    f"{_fmt(outside, '.2f', ' s')})"
                )
    return out


def write_sections(
    path_json: Path,
    path_md: Path,
    sections: Sequence[Mapping[str, Any]],
    start_up: Mapping[str, Any],
    started: Any,
) -> None:
    """Several data sets (rounds) and the start-up figures in one JSON and one markdown page."""
    path_json.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "started": started.isoformat(timespec="seconds"),
        "startup": start_up,
        "data_sets": [
            {
                "environment": sec["environment"],
                "summary": [asdict(r) for r in sec["rows"]],
                "runs": [asdict(r) for r in sec["records"]],
                "invocations": sec["invocations"],
            }
            for sec in sections
        ],
    }
    path_json.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    out = [
        "# spotstart fetch next to the rivals, by data-set size",
        "",
        f'Run started {started.isoformat(timespec="minutes")}. "x ceiling" is MB/s over what '
        "16 curl streams get through the same emulated link in the same round; it includes "
        "each tool's start-up, which matters most on the small data set.",
        "",
    ]
    out += [f"- {line}" for line in _headline(sections)]
    out += ["", "## Start-up", ""]
    out += [f"- {line}" for line in startup_lines(start_up)]
    for sec in sections:
        env = sec["environment"]
        out += [
            "",
            f"## {env['bytes_total'] / 1e6:.0f} MB ({env['shards']} x "
            f"{env['shard_bytes'] / 1e6:.0f} MB shards + 3 JSON files)",
            "",
        ]
        out.append(markdown(sec["rows"], env, sec["invocations"]).rstrip("\n"))
    path_md.write_text("\n".join(out) + "\n")
