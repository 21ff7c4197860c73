"""Side-by-side load benchmark: time until every tensor of a checkpoint is ready in memory.

spotstart load (gs://, s3://) next to spotstart fetch + safetensors, the Run:ai model streamer
and spotstart fetch + fastsafetensors, all through the same emulated cloud and link, each run
in a fresh process (its own peak RSS), every tensor checked. Not a functional test suite.

    python bench/load/run.py --shards 2 --shard-mb 32 --repeats 1   # smoke, ~1 min
    python bench/load/run.py                                       # 4 x 512 MB, 3 repeats
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/fetch's helpers (base_env, run_process, drop_caches, the emulator check, the
# environment lines) are imported, not copied; its modules import each other by bare name.
sys.path.append(str(Path(__file__).resolve().parent.parent / "fetch"))

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import metadata
from typing import Any

from contenders import Contender, RunSpec, default_contenders, invocation, shown
from measure import drop_caches, measure_ceiling, run_process
from summary import LoadRecord, print_rich, summarize, write_results

from spotstart.emulate.checkpoint import write_checkpoint
from spotstart.emulate.link import LinkConfig
from spotstart.emulate.storage import StorageEmulator, StorageEmulatorOptions

BUCKET = "bkt"
PREFIX = "model/"
RESULTS_DIR = Path(__file__).resolve().parent.parent / "results"
PACKAGES = ("spotstart", "torch", "safetensors", "runai-model-streamer", "fastsafetensors")


def add_common_flags(p: argparse.ArgumentParser, shards: int, shard_mb: float) -> None:
    p.add_argument("--shards", type=int, default=shards, help=f"safetensors shards ({shards})")
    p.add_argument("--shard-mb", type=float, default=shard_mb, help=f"MB per shard ({shard_mb:g})")
    p.add_argument("--hidden", type=int, default=1024, help="tensor side (1024: 2 MiB BF16 each)")
    p.add_argument("--repeats", type=int, default=3, help="runs per tool, alternating (3)")
    p.add_argument("--tools", default="", help="comma-separated substrings of row names")
    p.add_argument("--timeout-s", type=float, default=0, help="per run (default: from size)")
    p.add_argument("--verify", choices=("full", "sample", "none"), default="full")
    p.add_argument("--work-dir", type=Path, help="scratch dir (default: a temp dir, removed)")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--no-ceiling", action="store_true", help="skip the emulator check")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_common_flags(p, shards=4, shard_mb=512)
    p.add_argument("--per-conn-mbps", type=float, default=50, help="per-connection cap, 0=none")
    p.add_argument("--aggregate-mbps", type=float, default=400, help="link cap (8 x 50), 0=none")
    p.add_argument("--latency-ms", type=float, default=30, help="first-byte latency (30)")
    return p.parse_args(argv)


def _mbps_to_bytes(value: float) -> float | None:
    return value * 1e6 if value > 0 else None


def link_from_args(args: argparse.Namespace) -> LinkConfig:
    return LinkConfig(
        per_conn_bytes_per_s=_mbps_to_bytes(args.per_conn_mbps),
        first_byte_latency_s=args.latency_ms / 1000,
        aggregate_bytes_per_s=_mbps_to_bytes(args.aggregate_mbps),
    )


def select(contenders: Sequence[Contender], tools_arg: str) -> list[Contender]:
    if not tools_arg:
        return list(contenders)
    wanted = [w.strip().lower() for w in tools_arg.split(",") if w.strip()]
    picked = [c for c in contenders if any(w in c.name.lower() for w in wanted)]
    if not picked:
        raise SystemExit(f"--tools {tools_arg!r} matches none of {[c.name for c in contenders]}")
    return picked


@dataclass(frozen=True)
class Checkpoint:
    root: Path
    shard_names: list[str]
    files: dict[str, int]  # every file in the model directory: name -> bytes
    tensor_count: int
    tensor_bytes: int


def make_checkpoint(root: Path, shards: int, shard_bytes: int, hidden: int) -> Checkpoint:
    sizes = write_checkpoint(root, shards, shard_bytes, hidden=hidden)
    index = json.loads((root / "model.safetensors.index.json").read_text())
    count = len(index["weight_map"])
    return Checkpoint(
        root=root,
        shard_names=sorted(n for n in sizes if n.endswith(".safetensors")),
        files=sizes,
        tensor_count=count,
        tensor_bytes=count * hidden * hidden * 2,  # write_checkpoint: BF16 hidden x hidden
    )


def environment(
    args: argparse.Namespace, link: LinkConfig, ckpt: Checkpoint, device: str
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
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "mem_gb": mem_kb / 1e6,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "link": link.to_dict(),
        "shards": args.shards,
        "shard_bytes": int(args.shard_mb * 1e6),
        "files": len(ckpt.files),
        "bytes_total": sum(ckpt.files.values()),
        "tensor_count": ckpt.tensor_count,
        "tensor_bytes": ckpt.tensor_bytes,
        "repeats": args.repeats,
        "verify": args.verify,
        "device": device,
        "versions": versions,
    }


def _last_json(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                return dict(json.loads(line))
            except ValueError:
                return None
    return None


def run_one(
    emu: StorageEmulator | None,
    c: Contender,
    repeat: int,
    ckpt: Checkpoint,
    work: Path,
    timeout_s: float,
    verify: str,
) -> tuple[LoadRecord, str]:
    run_dir = work / "runs" / f"{c.mode}-{c.store}-{repeat}-{time.monotonic_ns()}"
    dest, config_dir = run_dir / "dest", run_dir / "config"
    dest.mkdir(parents=True)
    config_dir.mkdir(parents=True)
    info = emu.info if emu is not None else {}
    spec = RunSpec(info, BUCKET, PREFIX, ckpt.shard_names, ckpt.root, dest, config_dir, verify)
    inv = invocation(c, spec)
    cached = drop_caches()
    load_1m = os.getloadavg()[0]
    if emu is not None:
        emu.reset_stats()
    proc = run_process(inv, timeout_s, cwd=run_dir)
    stats = emu.stats() if emu is not None else {}
    out = _last_json(proc.stdout) or {}
    error = ""
    notes = [] if cached else ["page cache not dropped"]
    if proc.returncode is None:
        error = f"timed out after {timeout_s:.0f} s"
    elif out.get("error"):
        error = f"{out['error']}\n{out.get('traceback', '')}"
    elif proc.returncode != 0 or not out:
        tail = (proc.stderr_tail.strip() or proc.stdout.strip())[-800:]
        error = f"exit {proc.returncode}: {out.get('verify_detail', '')} {tail}".strip()
    if out.get("verify_detail"):
        notes.append(str(out["verify_detail"]))
    if out.get("notes"):
        notes.append(
            ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                for k, v in out["notes"].items()
            )
        )
    ok = not error and bool(out.get("verified"))
    record = LoadRecord(
        tool=c.name,
        repeat=repeat,
        ok=ok,
        seconds=float(out.get("seconds", proc.wall_s)),
        wall_s=proc.wall_s,
        startup_s=float(out.get("startup_s", 0.0)),
        bytes_total=int(out.get("bytes", 0)),
        tensors=int(out.get("tensors", 0)),
        peak_rss_bytes=int(out.get("peak_rss_bytes", 0)),
        rss_after_imports_bytes=int(out.get("rss_after_imports_bytes", 0)),
        link_bytes_down=int(stats.get("bytes_down", 0)),
        max_concurrent_connections=int(stats.get("max_concurrent_connections", 0)),
        returncode=proc.returncode,
        error=error,
        note="; ".join(notes),
        load_1m=load_1m,
    )
    shutil.rmtree(run_dir, ignore_errors=True)
    return record, shown(inv.argv, spec)


def run_rounds(
    emu: StorageEmulator | None,
    contenders: Sequence[Contender],
    ckpt: Checkpoint,
    work: Path,
    args: argparse.Namespace,
    timeout_s: float,
) -> tuple[list[LoadRecord], dict[str, str]]:
    records: list[LoadRecord] = []
    invocations: dict[str, str] = {}
    n = len(contenders)
    for repeat in range(args.repeats):
        # rotate the order so no tool always runs first (cold servers) or last
        order = list(contenders[repeat % n :]) + list(contenders[: repeat % n])
        for c in order:
            record, inv = run_one(emu, c, repeat, ckpt, work, timeout_s, args.verify)
            invocations[c.name] = inv
            records.append(record)
            if record.ok:
                status = f"{record.seconds:6.2f} s  peak RSS {record.peak_rss_bytes / 1e6:6.0f} MB"
            else:
                status = "FAILED " + record.error.strip().splitlines()[0][:110]
            print(f"[{repeat + 1}/{args.repeats}] {c.name:45s} {status}", flush=True)
    return records, invocations


def finish_env(env: dict[str, Any], records: Sequence[LoadRecord], started: datetime) -> None:
    ok = [r for r in records if r.ok]
    env["load_1m_at_runs"] = [r.load_1m for r in records]
    env["startup_s_median"] = statistics.median([r.startup_s for r in ok]) if ok else 0.0
    env["rss_after_imports_median"] = (
        statistics.median([r.rss_after_imports_bytes for r in ok]) if ok else 0
    )
    env["started"] = started.isoformat(timespec="seconds")
    env["argv"] = sys.argv


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    contenders = select(default_contenders(), args.tools)
    link = link_from_args(args)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="spotstart-bench-load-"))
    work.mkdir(parents=True, exist_ok=True)
    shard_bytes = int(args.shard_mb * 1e6)
    slowest = link.per_conn_bytes_per_s or 50e6
    timeout_s = args.timeout_s or 120 + 5 * args.shards * shard_bytes / slowest
    started = datetime.now()
    try:
        print(f"writing checkpoint in {work / 'src'} ...", flush=True)
        ckpt = make_checkpoint(work / "src", args.shards, shard_bytes, args.hidden)
        env = environment(args, link, ckpt, "cpu")
        opts = StorageEmulatorOptions(data_dir=work / "emulator", link=link, buckets=(BUCKET,))
        with StorageEmulator(opts) as emu:
            objects = {PREFIX + name: ckpt.root / name for name in ckpt.files}
            print("seeding S3 and GCS ...", flush=True)
            emu.seed_s3(BUCKET, objects)
            emu.seed_gcs(BUCKET, objects)
            env["drop_caches"] = drop_caches()
            env["ceilings"] = []
            if not args.no_ceiling:
                keys = [PREFIX + n for n in ckpt.shard_names]
                sizes = [ckpt.files[n] for n in ckpt.shard_names]
                c = measure_ceiling(
                    emu.gcs.endpoint, BUCKET, keys, sizes, 8, "capped link (as benched)"
                )
                env["ceilings"].append(
                    {"label": c.label, "streams": c.streams, "mb_per_s": c.mb_per_s}
                )
                print(f"  {c.label}: {c.mb_per_s:.0f} MB/s", flush=True)
            records, invocations = run_rounds(emu, contenders, ckpt, work, args, timeout_s)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    finish_env(env, records, started)
    rows = summarize(records, contenders, link.aggregate_bytes_per_s)
    print_rich(rows, env, "Time to every tensor ready in memory (same emulator, same link)")
    stamp = started.strftime("%Y%m%d-%H%M")
    path_json = args.results_dir / f"load-{stamp}.json"
    path_md = args.results_dir / "load-latest.md"
    write_results(path_json, path_md, records, rows, env, invocations)
    print(f"wrote {path_json} and {path_md}")
    return 0 if all(r.ok_runs for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
