"""`spotstart demo`: the main job end to end on embedded local defaults, no cloud account.

Act 1: starts the emulated cloud (real S3 and GCS servers behind a link emulator with the
talk's 50 MB/s per connection), puts a model-shaped checkpoint in it, fetches it once as a
single stream would (the talk's `gsutil cp`) and once with spotstart, then again to show the
cache, and loads it into tensors. Act 2 (:mod:`spotstart.cli.story`, needs torch): a real
server cold-started behind guard, serving, preempted, drained with no request lost, replaced
from a peer; the phase timeline and what the cold start is worth on a spot trace."""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from spotstart.cli.demo_engine import ENGINES, EngineChoice, choose_engine
from spotstart.cli.demo_engine import ENV as VLLM_ENV
from spotstart.cli.progress import RichProgress
from spotstart.fetch import (
    Concurrency,
    FetchConfig,
    FetchReport,
    NullProgress,
    ProgressListener,
    fetch,
)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="end-to-end demo on a local emulated cloud")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--shard-mb", type=int, default=128)
    p.add_argument(
        "--per-conn-mbps",
        type=float,
        default=50.0,
        help="per-connection cap of the emulated link, MB/s (50, the talk's figure)",
    )
    p.add_argument(
        "--aggregate-mbps", type=float, default=400.0, help="the emulated NIC, MB/s (400 = 8 x 50)"
    )
    p.add_argument("--latency-ms", type=float, default=30.0)
    p.add_argument("--store", choices=["gs", "s3"], default="gs")
    p.add_argument("--workdir", type=Path, help="keep data here (default: a temp dir)")
    p.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the single-stream run (estimate it instead)",
    )
    p.add_argument(
        "--no-story",
        action="store_true",
        help="stop after the fetch and load (skip the server, preemption and replacement)",
    )
    p.add_argument("--small", action="store_true", help="a tiny model for the story (tests)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="the smallest run (about half a minute): a 1 x 8 MB checkpoint, no single-stream "
        "baseline, the tiny model, 2 s of load before the preemption",
    )
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default="auto",
        help="the server of act 2: vllm (--load-format spotstart), example "
        "(examples/tiny_llm_server.py), auto: vllm when one is found (auto)",
    )
    p.add_argument(
        "--engine-cache",
        type=Path,
        metavar="DIR",
        help="vLLM's compile caches, shared by both replicas (default: WORKDIR/engine-cache); "
        "kept from an earlier run, replica A starts warm too",
    )
    p.add_argument(
        "--engine-python",
        metavar="PATH",
        help=f"the python of the venv that has vLLM (default: ${VLLM_ENV}, else this one)",
    )
    p.add_argument(
        "--serve-seconds", type=float, default=8.0, help="load before the preemption (8)"
    )
    p.add_argument(
        "--traces",
        metavar="URL",
        help="the 9-zone AWS spot traces for the plan line: a folder or any URL fetch reads, "
        "e.g. https://raw.githubusercontent.com/skypilot-org/spot-traces/main (default: the "
        "synthetic trace fitted to them, shipped with spotstart)",
    )
    p.add_argument("--json", action="store_true", help="a JSON summary on stdout at the end")
    p.set_defaults(run=run)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def run(args: argparse.Namespace) -> int:
    from spotstart.emulate.checkpoint import write_checkpoint
    from spotstart.emulate.link import LinkConfig
    from spotstart.emulate.storage import StorageEmulator, StorageEmulatorOptions

    if args.quick:
        args.shards, args.shard_mb, args.no_baseline = 1, 8, True
        args.small, args.serve_seconds = True, 2.0
    console = Console(stderr=True) if args.json else Console()
    err = Console(stderr=True)
    story: dict[str, object] = {}
    # chosen first: a wrong --engine-python fails now, not after act 1
    engine = None if args.no_story else choose_engine(args.engine, args.engine_python, os.environ)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="spotstart-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    src_dir = work / "checkpoint"
    console.rule("[bold]spotstart demo")
    if engine is not None:
        console.print(
            f"act 2 runs {'vLLM' if engine.name == 'vllm' else 'the example server'}: {engine.why}"
        )
    console.print(
        f"1. writing a {args.shards} x {args.shard_mb} MB safetensors checkpoint to {src_dir}"
    )
    sizes = write_checkpoint(src_dir, args.shards, args.shard_mb << 20)
    total = sum(sizes.values())
    link = LinkConfig(
        per_conn_bytes_per_s=args.per_conn_mbps * 1e6 or None,
        first_byte_latency_s=args.latency_ms / 1000,
        aggregate_bytes_per_s=args.aggregate_mbps * 1e6 or None,
    )
    console.print(
        f"2. starting the emulated cloud (S3: seaweedfs, GCS: fake-gcs-server) behind a link "
        f"of {args.per_conn_mbps:g} MB/s per connection, {args.aggregate_mbps:g} MB/s in all, "
        f"{args.latency_ms:g} ms to first byte"
    )
    options = StorageEmulatorOptions(data_dir=work / "cloud", link=link, buckets=("models",))
    with StorageEmulator(options) as emu:
        objects = {f"llama-demo/{name}": src_dir / name for name in sizes}
        if args.store == "gs":
            emu.seed_gcs("models", objects)
            url, endpoint = "gs://models/llama-demo/", emu.gcs.endpoint
        else:
            emu.seed_s3("models", objects)
            url, endpoint = "s3://models/llama-demo/", emu.s3.endpoint
        env_creds = emu.env_for_s3() if args.store == "s3" else {}
        base = FetchConfig(endpoint=endpoint, anonymous=args.store == "gs")
        _export_creds(env_creds)
        console.print(f"3. the checkpoint is at {url} ({total / 1e6:.0f} MB)")

        rows: list[tuple[str, float, float]] = []
        single_s = total / (args.per_conn_mbps * 1e6) if args.per_conn_mbps else 0.0
        if not args.no_baseline:
            console.print("4. one stream, like a single-process `gsutil cp`:")
            dest1 = work / "single"
            shutil.rmtree(dest1, ignore_errors=True)
            one = FetchConfig(
                endpoint=endpoint,
                anonymous=base.anonymous,
                concurrency=Concurrency(streams=1),
                chunk_bytes=1 << 40,
                use_cache=False,
            )
            r1 = _fetch_with_bar(err, url, dest1, one, "single stream")
            single_s = r1.seconds
            rows.append(("single stream", r1.seconds, r1.mb_per_s))
        console.print("5. spotstart fetch (parallel ranged reads, verified, resumable):")
        dest = work / "nvme" / "llama-demo"
        shutil.rmtree(dest, ignore_errors=True)
        r2 = _fetch_with_bar(err, url, dest, base, "spotstart")
        rows.append(("spotstart fetch", r2.seconds, r2.mb_per_s))
        for name in sizes:
            if _sha256(dest / name) != _sha256(src_dir / name):
                raise SystemExit(f"demo: {name} differs from the source")
        console.print("6. the same fetch again (a restart on the same node):")
        t = time.monotonic()
        r3 = fetch(url, dest, base, progress=NullProgress())
        rows.append(("again (cached)", time.monotonic() - t, 0.0))
        load_note = _demo_load(console, err, url, base, rows)
        stats = emu.stats()
        if not args.no_story:
            assert engine is not None
            story = _story(console, work, emu, args, engine)

    table = Table(
        title=f"{total / 1e6:.0f} MB through a {args.per_conn_mbps:g} MB/s-per-"
        f"connection, {args.aggregate_mbps:g} MB/s link"
    )
    for col in ("run", "seconds", "MB/s", "of link limit", "speedup"):
        table.add_column(col, justify="right" if col != "run" else "left")
    for name, secs, rate in rows:
        share = f"{rate / args.aggregate_mbps:.0%}" if rate and args.aggregate_mbps else "-"
        speed = f"{single_s / secs:.1f}x" if secs > 0 and single_s else "-"
        table.add_row(name, f"{secs:.2f}", f"{rate:.0f}" if rate else "-", share, speed)
    console.print(table)
    if args.no_baseline:
        console.print(f"(single stream estimated at {single_s:.1f}s from the per-connection cap)")
    console.print(
        f"verified: {', '.join(sorted(r2.verified))}; files byte-identical (sha256); rerun "
        f"copied {r3.bytes_transferred} bytes ({r3.files_cached} files already current); "
        f"link carried {stats.get('body_bytes_down', 0) / 1e6:.0f} MB of bodies in all"
    )
    console.print(load_note)
    if story and not args.workdir:
        # the work dir (GBs of checkpoints and cloud data) goes; the pictures stay, here
        kept = Path("spotstart-demo-timeline").resolve()
        shutil.rmtree(kept, ignore_errors=True)
        shutil.move(str(work / "timeline"), kept)
        files = story["timeline"]
        assert isinstance(files, dict)
        story["timeline"] = {k: str(kept / Path(v).name) for k, v in files.items()}
    if story:
        _print_story(console, story)
    console.print(f"data kept in {work}" if args.workdir else "")
    if args.json:
        import json
        import sys

        doc = {
            "fetch": [{"run": n, "seconds": round(s, 3), "mb_per_s": r} for n, s, r in rows],
            "story": story,
        }
        json.dump(doc, sys.stdout)
        sys.stdout.write("\n")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    lost = story.get("requests_lost", 0) if story else 0
    return 1 if lost else 0


def _story(
    console: Console, work: Path, emu: object, args: argparse.Namespace, engine: EngineChoice
) -> dict[str, object]:
    import importlib.util

    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("safetensors") is None:
        console.print(
            "(the server, preemption and replacement need torch: pip install torch==2.13.0 "
            "-e '.[demo]')"
        )
        return {}
    from spotstart.cli.demo_engine import server_for
    from spotstart.cli.story import SERVER, run_story

    server = server_for(engine, SERVER, work, args.engine_cache)
    console.rule(f"[bold]the cold start, served, preempted and replaced: {server.label}")
    return run_story(console, work, emu, args.small, args.serve_seconds, server, args.traces)


def _print_story(console: Console, s: dict[str, object]) -> None:
    console.rule("[bold]what happened")
    console.print(
        f"{s['engine']}: requests served {s['requests_served']} ({s['requests_streamed']} "
        f"streamed; by replica {s['served_by']}), lost {s['requests_lost']}; answered 503 "
        f"while draining or loading and retried on the other replica: "
        f"{s['rejected_503_retried']}; no replica ready for "
        f"{s['seconds_without_a_ready_replica']} s"
    )
    for why in s["lost"]:  # type: ignore[attr-defined]
        console.print(f"  lost: {why}")
    console.print(
        f"same answer from the replacement: {s['same_answer_after_replacement']}; "
        f"exit codes A {s['replica_a_exit']}, B {s['replica_b_exit']}"
    )
    console.print(f"weights from peers, MB: {s['weights_from_peers_mb']}")
    for name, line in s.get("loader_log", {}).items():  # type: ignore[attr-defined]
        console.print(f"  {name} vLLM log: {line}")
    if "engine_cache" in s:
        console.print(
            f"vLLM's compile caches (shared by A and B, so B started warm): {s['engine_cache']}"
        )
    table = Table(title="phases (spotstart events)")
    for col in ("replica", "phase", "seconds", "detail"):
        table.add_column(col)
    for p in s["phases"]:  # type: ignore[attr-defined]
        table.add_row(p["pod"], p["phase"], f"{p['seconds']:.2f}", p["detail"][:60])
    console.print(table)
    files = s["timeline"]
    console.print(f"timeline: {files['png']}, {files['html']}, {files['trace']} (Perfetto)")  # type: ignore[index]
    console.print(str(s["plan"]))


def _demo_load(
    console: Console,
    err: Console,
    url: str,
    config: FetchConfig,
    rows: list[tuple[str, float, float]],
) -> str:
    """Step 7: the same checkpoint straight into torch tensors, if torch is installed."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return (
            "(install spotstart[torch] to also see `spotstart load` fill tensors as bytes arrive)"
        )
    import asyncio

    from spotstart.weights.loader import load_async

    console.print("7. spotstart load: the same checkpoint into torch tensors while it arrives:")
    if err.is_terminal:
        with RichProgress(err, "load") as bar:
            tensors, report = asyncio.run(load_async(url, config=config, progress=bar))
    else:
        tensors, report = asyncio.run(load_async(url, config=config))
    rows.append(("spotstart load (cpu)", report.seconds, report.mb_per_s))
    total_mb = sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6
    return f"load: {report.tensors} tensors ({total_mb:.0f} MB) ready in {report.seconds:.2f}s"


def _export_creds(env: dict[str, str]) -> None:
    import os

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"):
        if k in env:
            os.environ[k] = env[k]


def _fetch_with_bar(
    err: Console, url: str, dest: Path, config: FetchConfig, label: str
) -> FetchReport:
    progress: ProgressListener
    if err.is_terminal:
        with RichProgress(err, label) as bar:
            return fetch(url, dest, config, progress=bar)
    progress = NullProgress()
    report = fetch(url, dest, config, progress=progress)
    err.print(
        f"  {label}: {report.bytes_transferred / 1e6:.0f} MB in {report.seconds:.2f}s "
        f"({report.mb_per_s:.0f} MB/s)"
    )
    return report
