"""`spotstart doctor [--dest DIR] [--source URL] [--model-bytes N]`: what limits this node."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from spotstart.errors import NodeUnfit, UsageError
from spotstart.units import parse_size

STYLE = {"ok": "green", "info": "cyan", "warn": "yellow", "fail": "bold red"}


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "doctor",
        help="what limits this node for a cold start: checks with fixes, short measurements",
        description="Check this node for the traps of a cold start (musl, DEST on a network "
        "disk, RAM or FUSE, free space, /dev/shm, open files, CPUs for the link) and measure "
        "the link to the source, disk writes and host-to-GPU copies; then predict the model's "
        "fetch and load time and name the bottleneck. Exit 16 on a blocking problem (usable "
        "in an image build or an init container).",
    )
    p.add_argument("--dest", type=Path, help="where the weights would go (local NVMe?)")
    p.add_argument("--source", metavar="URL", help="the model's URL, to measure the link")
    p.add_argument(
        "--model-bytes", type=parse_size, help="model size, e.g. 16GB (for space and times)"
    )
    p.add_argument("--seconds", type=float, default=4.0, help="link measurement time (4)")
    p.add_argument("--endpoint", help="object store endpoint override (S3-compatible, emulator)")
    p.add_argument("--root", type=Path, default=Path("/"), help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="one JSON document, nothing else")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from spotstart.doctor import diagnose
    from spotstart.fetch import FetchConfig

    if args.seconds <= 0:
        raise UsageError("--seconds must be > 0")
    config = FetchConfig(endpoint=args.endpoint)
    report = asyncio.run(
        diagnose(
            args.dest,
            args.source,
            args.model_bytes,
            root=args.root,
            seconds=args.seconds,
            config=config,
        )
    )
    if args.json:
        json.dump(report.to_json(), sys.stdout)
        sys.stdout.write("\n")
    else:
        out = Console()
        table = Table(title="spotstart doctor", show_lines=False)
        for col in ("check", "verdict", "detail", "fix"):
            table.add_column(col, overflow="fold")
        for c in report.checks:
            table.add_row(
                c.name, f"[{STYLE[c.verdict]}]{c.verdict}[/]", escape(c.detail), escape(c.fix)
            )
        out.print(table)
        if report.measured:
            out.print("measured: " + ", ".join(f"{k} {v:g}" for k, v in report.measured.items()))
        p = report.prediction
        for what in ("fetch", "load"):
            if f"{what}_s" in p:
                out.print(
                    f"predicted {what}: {p[f'{what}_s']:g} s for {p['model_bytes'] / 1e9:.2f} GB, "
                    f"limited by the {p[f'{what}_bottleneck']}"
                )
    if report.blocking:
        names = ", ".join(c.name for c in report.blocking)
        raise NodeUnfit(f"blocking: {names}")
    return 0
