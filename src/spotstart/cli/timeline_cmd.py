"""`spotstart timeline FILE... [--pod NAME] [--out DIR]`: one replica's start (or a rollout)
as a Gantt chart with its critical path, from phase events, `kubectl get -o json` files and
server logs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "timeline",
        help="where each second of a start went: events + Kubernetes objects + server logs",
        description="Merge spotstart phase events (--events / $SPOTSTART_EVENTS files), "
        "Kubernetes objects as `kubectl get pod,events,node,nodeclaim -o json` writes them, "
        "and server logs (vLLM's timing lines) into one timeline; print the critical path "
        "and write timeline.png, timeline.html and timeline.trace.json (Perfetto).",
    )
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.add_argument("--pod", help="only this pod (default: every pod in the files)")
    p.add_argument("--out", type=Path, help="write the pictures and trace here")
    p.add_argument("--year", type=int, help="the year of server-log lines (they carry none)")
    p.add_argument("--title", default="", help="title of the pictures")
    p.add_argument("--json", action="store_true", help="the summary as JSON on stdout")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from spotstart import timeline

    got = timeline.read(args.files, pod=args.pod, year=args.year)
    phases = got.phases
    if got.skipped:
        # One line, and the timeline of the rest: a record of the wrong shape is left out.
        err = Console(stderr=True, highlight=False)
        err.print(f"spotstart: warning: {escape(got.skipped.line())}", soft_wrap=True)
    written = timeline.write_all(phases, args.out, args.title) if args.out else {}
    s = timeline.summary(phases)
    if args.json:
        doc = {
            **s,
            "written": {k: str(v) for k, v in written.items()},
            "skipped": got.skipped.counts,
        }
        json.dump(doc, sys.stdout)
        sys.stdout.write("\n")
        return 0
    out = Console()
    table = Table(title=f"critical path: {s['total_s']:.1f} s to Ready")
    for col in ("phase", "seconds", "share", "source"):
        table.add_column(col)
    for c in s["critical_path"]:
        # names come from the files: never rich markup
        table.add_row(
            escape(c["name"]), f"{c['seconds']:.1f}", f"{100 * c['share']:.0f}%", c["source"]
        )
    out.print(table)
    for kind, path in written.items():
        out.print(f"{kind}: {escape(str(path))}")
    return 0
