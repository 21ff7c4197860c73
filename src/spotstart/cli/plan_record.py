"""`spotstart plan record --events [ZONE=]FILE... --out DIR`: guard phase-event logs (one per
node) -> the per-zone spot traces and fleet.yaml `spotstart plan run` replays. Thin shell over
`spotstart.fleet.record`; the files are read bounded, their lines as untrusted JSON (a log is
written on nodes, and copied by whoever hands it over)."""

from __future__ import annotations

import argparse
import math
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from spotstart.errors import UsageError

MAX_FILES = 1_000
MAX_FILE_BYTES = 64 << 20
MAX_LINE_BYTES = 64 << 10  # a phase event is a few hundred bytes
MAX_EVENTS = 1_000_000  # in all files together
PHASES = ("server-start", "drain")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``record`` under `spotstart plan`."""
    p = subparsers.add_parser(
        "record",
        help="your own fleet as spot traces, from guard event logs",
        description="Turn `spotstart guard --events` logs (one per node; the node's zone "
        "from ZONE=FILE or from the events' zone, which guard writes when SPOTSTART_ZONE is "
        "set) into one spot trace per zone and a fleet.yaml in DIR: replay them with "
        "`spotstart plan run --config DIR/fleet.yaml`. A zone's k per tick: the nodes ready "
        "there, where a preemption notice came; elsewhere at least --assume.",
    )
    p.add_argument(
        "--events",
        nargs="+",
        required=True,
        metavar="[ZONE=]FILE",
        help="guard event logs, one per node",
    )
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="a new directory")
    p.add_argument("--gap", type=float, default=60.0, metavar="SECONDS", help="tick (60)")
    p.add_argument(
        "--target",
        type=int,
        help="replicas the replay keeps (default: the most nodes ready at once in the logs)",
    )
    p.add_argument(
        "--assume",
        type=int,
        metavar="N",
        help="spot nodes a zone is taken to have had in a tick without a notice "
        "(default: --target)",
    )
    p.add_argument(
        "--until",
        type=float,
        metavar="UNIX",
        help="end of the recording (default: the last event in the logs)",
    )
    p.set_defaults(run=run)


def _source(text: str) -> tuple[str | None, Path]:
    zone, sep, path = text.partition("=")
    if sep and zone and "/" not in zone:
        return zone, Path(path)
    return None, Path(text)


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    # O_NONBLOCK, then a regular file only: a FIFO planted among the logs (logs/*) hung the
    # open for good, and a device (/dev/zero) was read to the size limit
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read it ({exc.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UsageError(f"{path}: not a regular file; give guard's --events log files")
    with os.fdopen(fd, "rb") as f:
        read = 0
        number = 0
        while raw := f.readline(MAX_LINE_BYTES + 1):
            number += 1
            read += len(raw)
            if read > MAX_FILE_BYTES:
                raise UsageError(f"{path}: over {MAX_FILE_BYTES >> 20} MiB; not a guard log")
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                raise UsageError(f"{path}:{number}: a line over {MAX_LINE_BYTES} bytes")
            yield number, raw


def _time(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and 0 <= value < 1e11 else None


def read_log(
    path: Path, zone: str | None, max_events: int = MAX_EVENTS
) -> tuple[str, dict[str, list[dict[str, Any]]], int]:
    """(zone, guard events by host, lines skipped) of one log. Only server-start and drain
    events are kept, with their times checked; a line that is not one is skipped. More than
    ``max_events`` kept is a UsageError as soon as it is read (what is held stays bounded)."""
    from spotstart import untrusted_json

    by_host: dict[str, list[dict[str, Any]]] = {}
    skipped = 0
    zones: set[str] = set()
    for number, raw in _lines(path):
        if not raw.strip():
            continue
        try:
            e = untrusted_json.parse(raw.decode("utf-8", "replace"), what=f"{path}:{number}")
        except ValueError:
            skipped += 1
            continue
        if not isinstance(e, dict) or "phase" not in e:
            skipped += 1
            continue
        if e["phase"] not in PHASES:  # fetch, load: the node's other phases
            continue
        start, end = _time(e.get("start")), _time(e.get("end"))
        notice = e.get("notice")
        if start is None or end is None or end < start or not isinstance(notice, str | None):
            skipped += 1
            continue
        if isinstance(e.get("zone"), str) and e["zone"]:
            zones.add(e["zone"])
        host = e.get("host") if isinstance(e.get("host"), str) else ""
        max_events -= 1
        if max_events < 0:
            raise UsageError(f"{path}:{number}: over {MAX_EVENTS} guard events in all")
        kept = {"phase": e["phase"], "start": start, "end": end, "notice": notice}
        by_host.setdefault(str(host)[:256], []).append(kept)
    if not by_host:
        raise UsageError(f"{path}: no server-start or drain events; not a guard's --events log")
    if zone is None:
        if len(zones) > 1:
            raise UsageError(
                f"{path}: events name {len(zones)} zones; one log per node (or ZONE={path})"
            )
        if not zones:
            raise UsageError(
                f"{path}: no zone in its events; give it as ZONE={path} (or run guard with "
                "SPOTSTART_ZONE set)"
            )
        zone = zones.pop()
    return zone, by_host, skipped


def run(args: argparse.Namespace) -> int:
    from spotstart.fleet.config import MAX_TARGET_REPLICAS
    from spotstart.fleet.record import (
        MAX_TICKS,
        TraceDirectory,
        TraceRecorder,
        check_zone,
        lives_from_events,
        record_lives,
    )

    if len(args.events) > MAX_FILES:
        raise UsageError(f"--events: {len(args.events)} files, at most {MAX_FILES}")
    lives = []
    zones: list[str] = []
    times: list[float] = []
    first: tuple[float, Path] | None = None
    last: tuple[float, Path] | None = None
    total = skipped = 0
    for text in args.events:
        zone, path = _source(text)
        zone, by_host, bad = read_log(path, zone, MAX_EVENTS - total)
        check_zone(zone)
        skipped += bad
        for events in by_host.values():
            total += len(events)
            if total > MAX_EVENTS:
                raise UsageError(f"--events: over {MAX_EVENTS} guard events in all")
            times += [e["start"] for e in events] + [e["end"] for e in events]
            lo, hi = min(e["start"] for e in events), max(e["end"] for e in events)
            first = (lo, path) if first is None or lo < first[0] else first
            last = (hi, path) if last is None or hi > last[0] else last
            lives += lives_from_events(zone, events)
        if zone not in zones:
            zones.append(zone)
    if not times:
        raise UsageError("--events: no server-start or drain events in these logs")
    start = min(times)
    until = args.until if args.until is not None else max(times)
    if not until > start:
        raise UsageError(f"--until {until}: not after the first event ({start})")
    target = args.target if args.target is not None else _most_at_once(lives)
    if target < 1:
        raise UsageError("--target: no node was ever ready in these logs; give --target")
    if target > MAX_TARGET_REPLICAS:
        # a log (or many) claiming 20,000 nodes ready at once made a plan that ran 47 s
        said = (
            f"--target {target:,}"
            if args.target is not None
            else f"--events: the most nodes ready at once is {target:,}"
        )
        raise UsageError(
            f"{said}, over the {MAX_TARGET_REPLICAS:,} replicas a plan keeps; give a --target "
            f"of at most {MAX_TARGET_REPLICAS:,}"
        )
    assumed = args.assume if args.assume is not None else target
    # the ticks in memory first: a bad zone or count fails before DIR is touched
    TraceRecorder(zones, gap_s=args.gap, start_s=start, assumed_nodes=assumed)
    ticks = (until - start) / args.gap  # a float: --until inf is over too, not an overflow
    if not ticks <= MAX_TICKS:
        # one event with a bogus time (start 1, 1970) made a recording of 600,000 empty ticks
        # from 1970 on and dropped every real event after them, and said it recorded
        assert first is not None and last is not None
        raise UsageError(
            f"--events: from {start:.0f} ({first[1]}) to {until:.0f} "
            f"({'--until' if args.until is not None else last[1]}) is {ticks:,.0f} ticks of "
            f"{args.gap:g} s, over the {MAX_TICKS:,} a recording holds; a log with a bogus "
            "time? leave it out, or give a larger --gap"
        )
    with TraceDirectory.open(
        args.out,
        zones=zones,
        gap_s=args.gap,
        start_s=start,
        assumed_nodes=assumed,
        source=f"spotstart plan record ({len(args.events)} guard event logs)",
        target=target,
    ) as d:
        if d.recorder.ticks:
            raise UsageError(f"{args.out}: already holds a recording; give a new --out")
        record_lives(d.recorder, lives, until)
        if not d.flush():
            raise UsageError(f"--events: shorter than one {args.gap:g} s tick; use a smaller --gap")
        rec = d.recorder
        notices = sum(rec.stats(z).notices for z in rec.zones)
    print(
        f"recorded {rec.ticks} ticks of {rec.gap_s:g} s in {len(rec.zones)} zones "
        f"({len(lives)} node lives, {notices} preemption notices) to {args.out}"
    )
    if skipped:
        print(
            f"spotstart: warning: {skipped} lines were not guard events; skipped", file=sys.stderr
        )
    print(f"replay: spotstart plan run --config {args.out / 'fleet.yaml'}")
    return 0


def _most_at_once(lives: list[Any]) -> int:
    edges = sorted(
        [(life.ready_s, 1) for life in lives]
        + [(life.ended_s, -1) for life in lives if life.ended_s is not None]
    )
    most = now = 0
    for _, delta in edges:
        now += delta
        most = max(most, now)
    return most
