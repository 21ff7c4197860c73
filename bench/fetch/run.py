"""Side-by-side download benchmark: spotstart fetch vs gsutil, gcloud, aws, s5cmd and rclone.

Every tool copies the same model-shaped prefix from the same emulated S3/GCS through the same
emulated link into a fresh directory; we time it, check every byte and write bench/results/.
Each data set (default: 1 x 512 MB and 4 x 512 MB) is a round of its own, with its own emulator
and its own 16-curl-stream ceiling. Start-up comes first: `spotstart --version` / `--help`
imports and wall time, exec to the first request of a fetch (startup.py), and each tool's
version command. Not a load test of the emulator and not a functional test suite.

    python bench/fetch/run.py --shards 2 --shard-mb 64 --repeats 1   # smoke, ~2 min
    python bench/fetch/run.py                                       # 512 MB and 2 GB, 3 repeats
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import startup
from dataset import DataSet, make_dataset, verify_copy
from measure import Ceiling, drop_caches, measure_ceiling, run_process
from report import RunRecord, print_rich, summarize, write_sections
from tools import TOOLS, RunContext, Tool, base_env, tool_version

from spotstart.emulate.link import LinkConfig
from spotstart.emulate.storage import StorageEmulator, StorageEmulatorOptions

BUCKET = "bkt"
PREFIX = "model/"
REFERENCE = "spotstart gs://"
RESULTS_DIR = Path(__file__).resolve().parent.parent / "results"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--data-sets",
        default="1x512,4x512",
        help="SHARDSxMB, comma-separated; each is a round of its own (default: 512 MB, 2 GB)",
    )
    p.add_argument("--shards", type=int, help="one data set of this many shards (overrides)")
    p.add_argument("--shard-mb", type=float, help="MB (1e6 B) per shard of --shards (512)")
    p.add_argument(
        "--startup-repeats", type=int, default=7, help="runs per start-up figure, 0 = skip (7)"
    )
    p.add_argument("--repeats", type=int, default=3, help="runs per tool, alternating (3)")
    p.add_argument("--per-conn-mbps", type=float, default=50, help="per-connection cap, 0=none")
    p.add_argument("--aggregate-mbps", type=float, default=400, help="link cap (8 x 50), 0=none")
    p.add_argument("--latency-ms", type=float, default=30, help="first-byte latency (30)")
    p.add_argument(
        "--tools",
        default="",
        help="comma-separated substrings of tool names to run (default: all)",
    )
    p.add_argument("--timeout-s", type=float, default=0, help="per run (default: from size)")
    p.add_argument("--work-dir", type=Path, help="scratch dir (default: a temp dir in /tmp)")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--no-ceiling", action="store_true", help="skip the uncapped emulator check")
    return p.parse_args(argv)


def _mbps_to_bytes(value: float) -> float | None:
    return value * 1e6 if value > 0 else None


def _data_sets(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(shards, bytes per shard) of each round."""
    if args.shards is not None or args.shard_mb is not None:
        return [(args.shards or 4, int((args.shard_mb or 512) * 1e6))]
    out = []
    for item in args.data_sets.split(","):
        shards, _, mb = item.strip().lower().partition("x")
        out.append((int(shards), int(float(mb) * 1e6)))
    return out


def _tool_startup(tools: list[Tool], repeats: int) -> dict[str, float]:
    """Median wall seconds of each tool's version command: its start-up, no transfer."""
    out: dict[str, float] = {}
    for tool in tools:
        key = " ".join(Path(tool.version_argv[0]).name.split() + tool.version_argv[1:])
        if key in out:
            continue
        walls = []
        for _ in range(max(repeats, 1)):
            start = time.perf_counter()
            try:
                subprocess.run(tool.version_argv, capture_output=True, env=base_env(), timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                break  # not installed, or hangs: no figure (its runs will fail and say why)
            walls.append(time.perf_counter() - start)
        if walls:
            out[key] = statistics.median(walls)
    return out


def _environment(
    args: argparse.Namespace, link: LinkConfig, data: DataSet, shards: int, shard_bytes: int
) -> dict[str, Any]:
    cpu_model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    return {
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "mem_gb": mem_kb / 1e6,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "link": link.to_dict(),
        "shards": shards,
        "shard_bytes": shard_bytes,
        "files": len(data.files),
        "bytes_total": data.bytes_total,
        "repeats": args.repeats,
    }


def _select(tools_arg: str) -> list[Tool]:
    if not tools_arg:
        return list(TOOLS)
    wanted = [w.strip().lower() for w in tools_arg.split(",") if w.strip()]
    picked = [t for t in TOOLS if any(w in t.name.lower() for w in wanted)]
    if not picked:
        raise SystemExit(f"--tools {tools_arg!r} matches none of {[t.name for t in TOOLS]}")
    return picked


def _error_text(proc_rc: int | None, stderr: str, stdout: str, timeout_s: float) -> str:
    if proc_rc is None:
        return f"timed out after {timeout_s:.0f} s"
    tail = (stderr.strip() or stdout.strip())[-800:]
    return f"exit {proc_rc}: {tail}"


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if a and b else a or b


def _ours_note(report: dict[str, Any]) -> str:
    return (
        f"own report: {report.get('seconds')} s in the transfer, "
        f"concurrency_final {report.get('concurrency_final')}, "
        f"chunk {int(report.get('chunk_bytes') or 0) >> 20} MiB, "
        f"retries {report.get('retries')}"
    )


def _tool_notices(stderr: str) -> str:
    """What a rival said about how it copied (gsutil's sliced-download and crcmod notes)."""
    lines = [ln.strip(" =>") for ln in stderr.splitlines()]
    picked = [ln for ln in lines if any(w in ln for w in ("NOTE", "WARNING", "sliced", "crcmod"))]
    return " ".join(picked)[:400]


def _shown(argv: list[str], ctx: RunContext) -> str:
    """The command line as the report prints it: no temp paths, no port numbers."""
    text = shlex.join(argv).replace(str(ctx.dest), "DEST").replace(str(ctx.config_dir), "CONFIG")
    text = text.replace(str(Path(sys.executable).parent) + "/", "")
    return text.replace(ctx.info["s3"]["endpoint"], "$AWS_ENDPOINT_URL")


def run_one(
    emu: StorageEmulator,
    tool: Tool,
    repeat: int,
    data: DataSet,
    work: Path,
    timeout_s: float,
) -> tuple[RunRecord, str]:
    run_dir = work / "runs" / f"{tool.name.split()[0]}-{repeat}-{time.monotonic_ns()}"
    dest, config_dir = run_dir / "dest", run_dir / "config"
    dest.mkdir(parents=True)
    config_dir.mkdir(parents=True)
    ctx = RunContext(emu.info, BUCKET, PREFIX, dest, config_dir)
    inv = tool.build(ctx)
    cached = drop_caches()
    load_1m = os.getloadavg()[0]
    emu.reset_stats()
    proc = run_process(inv, timeout_s, cwd=run_dir)
    stats = emu.stats()
    error, note = "", "" if cached else "page cache not dropped"
    tool_report: dict[str, Any] | None = None
    if tool.ours and proc.returncode == 0:
        try:
            tool_report = json.loads(proc.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            note = "no JSON summary on stdout"
    if tool_report is not None:
        note = _join(note, _ours_note(tool_report))
    elif not tool.ours:
        note = _join(note, _tool_notices(proc.stderr_tail))
    ok = proc.returncode == 0
    if ok:
        verdict = verify_copy(dest, data, PREFIX.rstrip("/"))
        ok = verdict.ok
        if not verdict.ok:
            error = f"wrong output: {verdict.detail}"
        elif verdict.detail:
            note = _join(note, verdict.detail)
    else:
        error = _error_text(proc.returncode, proc.stderr_tail, proc.stdout, timeout_s)
    record = RunRecord(
        tool=tool.name,
        repeat=repeat,
        ok=ok,
        wall_s=proc.wall_s,
        cpu_s=proc.cpu_s,
        bytes_total=data.bytes_total,
        link_bytes_down=int(stats["bytes_down"]),
        link_body_bytes_down=int(stats["body_bytes_down"]),
        requests=int(stats["requests"]),
        connections=int(stats["connections_opened"]),
        max_concurrent_connections=int(stats["max_concurrent_connections"]),
        returncode=proc.returncode,
        error=error,
        note=note,
        tool_report=tool_report,
        load_1m=load_1m,
        stderr_tail=proc.stderr_tail[-1000:],
    )
    shutil.rmtree(run_dir, ignore_errors=True)
    return record, _shown(inv.argv, ctx)


def _ceilings(emu: StorageEmulator, data: DataSet, link: LinkConfig) -> list[Ceiling]:
    keys = [PREFIX + n for n in data.shard_names]
    sizes = [f.size_bytes for f in data.files if f.key in data.shard_names]
    results = [
        # "x ceiling": what 16 plain C clients get through the same emulated link, this run
        measure_ceiling(
            emu.info["gcs"]["endpoint"], BUCKET, keys, sizes, 16, "capped link (as benched)"
        )
    ]
    emu.set_link(LinkConfig(per_conn_bytes_per_s=None, first_byte_latency_s=0.0))
    try:
        results.append(
            measure_ceiling(emu.info["gcs"]["endpoint"], BUCKET, keys, sizes, 8, "uncapped link")
        )
        results.append(
            measure_ceiling(emu.info["gcs"]["direct"], BUCKET, keys, sizes, 8, "GCS server direct")
        )
    finally:
        emu.set_link(link)
    return results


def run_data_set(
    args: argparse.Namespace,
    tools: list[Tool],
    link: LinkConfig,
    shards: int,
    shard_bytes: int,
    work: Path,
) -> dict[str, Any]:
    """One round: a data set, an emulator seeded with it, its ceiling, every tool x repeats."""
    slowest = link.per_conn_bytes_per_s or 50e6
    timeout_s = args.timeout_s or 120 + 5 * shards * shard_bytes / slowest
    print(f"making data set ({shards} x {shard_bytes / 1e6:.0f} MB) in {work / 'src'} ...")
    data = make_dataset(work / "src", shards, shard_bytes)
    env = _environment(args, link, data, shards, shard_bytes)
    env["versions"] = {}
    for tool in tools:
        key = tool.version_argv[0].rsplit("/", 1)[-1]
        if key not in env["versions"]:
            env["versions"][key] = tool_version(tool)
    opts = StorageEmulatorOptions(data_dir=work / "emulator", link=link, buckets=(BUCKET,))
    with StorageEmulator(opts) as emu:
        objects = {PREFIX + f.key: f.path for f in data.files}
        print("seeding S3 and GCS ...", flush=True)
        emu.seed_s3(BUCKET, objects)
        emu.seed_gcs(BUCKET, objects)
        env["drop_caches"] = drop_caches()
        env["ceilings"] = (
            []
            if args.no_ceiling
            else [
                {"label": c.label, "streams": c.streams, "mb_per_s": c.mb_per_s}
                for c in _ceilings(emu, data, link)
            ]
        )
        for c in env["ceilings"]:
            print(f"  {c['label']}: {c['mb_per_s']:.0f} MB/s", flush=True)
        records: list[RunRecord] = []
        invocations: dict[str, str] = {}
        for repeat in range(args.repeats):
            # rotate the order so no tool always runs first (cold servers) or last
            order = tools[repeat % len(tools) :] + tools[: repeat % len(tools)]
            for tool in order:
                record, shown = run_one(emu, tool, repeat, data, work, timeout_s)
                invocations[tool.name] = shown
                records.append(record)
                status = (
                    f"{record.mb_per_s:7.0f} MB/s {record.wall_s:6.2f} s"
                    if record.ok
                    else "FAILED " + record.error.splitlines()[0][:100]
                )
                print(f"[{repeat + 1}/{args.repeats}] {tool.name:30s} {status}", flush=True)
    capped = next((c for c in env["ceilings"] if c["label"].startswith("capped")), None)
    rows = summarize(
        records,
        [(t.name, t.concurrency) for t in tools],
        link.aggregate_bytes_per_s,
        REFERENCE,
        ceiling_mb_per_s=capped["mb_per_s"] if capped else None,
    )
    env["load_1m_at_runs"] = [r.load_1m for r in records]
    env["argv"] = sys.argv
    print_rich(rows, env)
    return {"environment": env, "rows": rows, "records": records, "invocations": invocations}


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    tools = _select(args.tools)
    link = LinkConfig(
        per_conn_bytes_per_s=_mbps_to_bytes(args.per_conn_mbps),
        first_byte_latency_s=args.latency_ms / 1000,
        aggregate_bytes_per_s=_mbps_to_bytes(args.aggregate_mbps),
    )
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="spotstart-bench-fetch-"))
    work.mkdir(parents=True, exist_ok=True)
    started = datetime.now()
    # an installed spotstart has its bytecode compiled (pip does it); so do the rivals
    startup.precompile(base_env())
    start_up: dict[str, Any] = {}
    if args.startup_repeats > 0:
        print("start-up ...", flush=True)
        start_up = {
            "spotstart": startup.measure(None, args.startup_repeats),
            "tools_version_command_s": _tool_startup(tools, args.startup_repeats),
            "environment": startup.environment(),
        }
        for line in startup.summary_lines(start_up["spotstart"]):
            print("  " + line, flush=True)
    sections = []
    try:
        for i, (shards, shard_bytes) in enumerate(_data_sets(args)):
            round_dir = work / f"set-{i}"
            try:
                sections.append(run_data_set(args, tools, link, shards, shard_bytes, round_dir))
            finally:
                if args.work_dir is None:
                    shutil.rmtree(round_dir, ignore_errors=True)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    stamp = started.strftime("%Y%m%d-%H%M")
    path_json = args.results_dir / f"fetch-{stamp}.json"
    path_md = args.results_dir / "fetch-latest.md"
    write_sections(path_json, path_md, sections, start_up, started)
    print(f"wrote {path_json} and {path_md}")
    return 0 if all(r.ok_runs for sec in sections for r in sec["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
