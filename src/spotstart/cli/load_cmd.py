"""`spotstart load SRC`: load a safetensors checkpoint into memory (or a GPU) and report."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys

from rich.console import Console

from spotstart.cli.fetch_cmd import add_transfer_flags, config_from_args, recording_metrics
from spotstart.cli.progress import RichProgress
from spotstart.errors import UsageError
from spotstart.fetch import NullProgress, ProgressListener


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "load",
        help="load a safetensors checkpoint into torch tensors while the bytes arrive",
        description="Load SRC (one .safetensors, a sharded checkpoint with "
        "model.safetensors.index.json, or a prefix holding one; any source fetch takes) into "
        "memory on DEVICE, optionally writing every byte through to --cache-dir.",
    )
    p.add_argument("src")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default cpu)")
    p.add_argument("--dtype", help="cast floating tensors, e.g. bfloat16, float16, float32")
    p.add_argument("--cache-dir", help="write-through copy on local disk; reused next time")
    p.add_argument(
        "--tp",
        type=_tp,
        metavar="RANK/WORLD",
        help="only this tensor-parallel rank's slices (vLLM's Llama-family split), e.g. 3/8",
    )
    add_transfer_flags(p)
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    out.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(run=run, include=[], exclude=[], no_cache=False)


def _tp(text: str) -> tuple[int, int]:
    rank, sep, world = text.partition("/")
    if not sep or not rank.isdigit() or not world.isdigit() or not 0 <= int(rank) < int(world):
        raise argparse.ArgumentTypeError(f"{text!r}: expected RANK/WORLD with 0 <= RANK < WORLD")
    return int(rank), int(world)


def run(args: argparse.Namespace) -> int:
    from spotstart.weights.loader import LoadReport, load_async

    dtype = None
    if args.dtype:
        import torch

        dtype = getattr(torch, args.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise UsageError(f"--dtype {args.dtype}: not a torch dtype (bfloat16, float16...)")
    if args.serve_peers:
        raise UsageError(
            "--serve-peers: load keeps no files to serve; run `spotstart serve-peers` on its "
            "--cache-dir, or fetch with --serve-peers"
        )
    config = config_from_args(args)
    err = Console(stderr=True)
    progress: ProgressListener = NullProgress()

    loaded: list[object] = []

    def work() -> LoadReport:
        listener = progress
        with contextlib.ExitStack() as stack:
            if err.is_terminal and not (args.json or args.quiet):
                listener = stack.enter_context(RichProgress(err, "load"))
            tensors, report = asyncio.run(
                load_async(
                    args.src, args.device, dtype, args.cache_dir, config, listener, tp=args.tp
                )
            )
        loaded.append(tensors)
        return report

    report = recording_metrics(args, "load", work)
    if args.json:
        json.dump(report.to_json(), sys.stdout)
        sys.stdout.write("\n")
    elif not args.quiet:
        Console().print(
            f"[green]loaded {report.tensors} tensors from {report.files} files, "
            f"{report.bytes_total / 1e6:.1f} MB in {report.seconds:.2f}s = "
            f"{report.mb_per_s:.1f} MB/s on {report.device}[/green]"
            + (
                f" ({report.bytes_from_cache / 1e6:.0f} MB from local disk)"
                if report.bytes_from_cache
                else ""
            )
        )
    loaded.clear()
    return 0
