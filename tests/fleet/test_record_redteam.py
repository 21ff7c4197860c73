"""Red team of recordings: `spotstart plan record` over guard logs from other nodes (bogus
times, event floods, planted FIFOs and devices, absurd counts) and the recording directory
under a local user who plants links. Real files, the real CLI parser (a subprocess where a
hang is the failure)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import pytest

from spotstart.cli import plan_record
from spotstart.errors import UsageError
from spotstart.fleet.record import (
    MAX_NODES,
    MAX_TICKS,
    RecordError,
    TraceDirectory,
    TraceRecorder,
    ZoneObservation,
)
from spotstart.fleet.traces import load_trace
from tests.conftest import error_line, run_cli

T0 = 1_764_590_000.0


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="spotstart plan")
    plan_record.add_parser(parser.add_subparsers())
    args = parser.parse_args(["record", *argv])
    return int(args.run(args))


def event(phase: str, start: float, end: float, *, at: float = T0, **extra: Any) -> str:
    doc = {"v": 1, "phase": phase, "start": at + start, "end": at + end, "bytes": None}
    return json.dumps({**doc, "host": "n1", "pod": "", "detail": "", **extra}) + "\n"


def good_log(tmp_path: Path) -> Path:
    log = tmp_path / "good.jsonl"
    log.write_text(
        event("server-start", 0, 60, zone="us-east1-b")
        + event("drain", 3600, 3630, zone="us-east1-b", notice="preemption")
    )
    return log


@pytest.mark.parametrize(
    ("bogus", "side"),
    [
        (event("server-start", 0, 1, at=1.0, zone="us-east1-c"), "from 1 "),  # 1970
        (event("server-start", 0, 1, at=9.9e10, zone="us-east1-c"), "to 99000000001"),  # 5107
    ],
)
def test_one_log_with_a_bogus_time_is_refused_not_recorded_as_empty_years(
    tmp_path: Path, bogus: str, side: str
) -> None:
    """Before the fix: exit 0, 'recorded 600000 ticks', a recording of 1970 onwards in which
    the real node's life and its preemption were never reached (0 notices)."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text(bogus)
    out = tmp_path / "rec"
    with pytest.raises(UsageError) as refused:
        cli("--events", str(good_log(tmp_path)), str(bad), "--out", str(out))
    message = str(refused.value)
    assert side in message and str(bad) in message and f"{MAX_TICKS:,}" in message
    assert "bogus time" in message
    assert not out.exists()
    # the good log alone records the preemption
    assert cli("--events", str(good_log(tmp_path)), "--out", str(out)) == 0
    meta = json.loads((out / "us-east1-b.json").read_text())["metadata"]
    assert meta["notices"] == 1 and meta["start_unix"] == T0


def test_an_until_of_infinity_is_refused_not_a_traceback(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"to inf \(--until\)"):
        cli("--events", str(good_log(tmp_path)), "--out", str(tmp_path / "r"), "--until", "inf")


def test_an_assumed_count_over_32_bits_is_refused_before_the_directory(tmp_path: Path) -> None:
    """--assume 2**31 raised OverflowError at the first tick (a traceback, exit 1); in the
    controller (--record-assume) at every reconcile, so it never scaled."""
    out = tmp_path / "r"
    with pytest.raises(RecordError, match="assumed nodes: must be 0 to 2,147,483,647"):
        cli("--events", str(good_log(tmp_path)), "--out", str(out), "--assume", str(2**31))
    assert not out.exists()
    with pytest.raises(RecordError):
        TraceRecorder(["a"], gap_s=60, start_s=0, assumed_nodes=2**31)
    # the most there is: recorded; an observation beyond it is held at it, never an overflow
    rec = TraceRecorder(["a"], gap_s=60, start_s=0, assumed_nodes=MAX_NODES)
    rec.observe(1, [ZoneObservation("a", spot_alive=2**40, notices=1)])
    rec.close_until(60)
    assert rec.data("a") == [MAX_NODES]


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_fifo_or_a_device_among_the_logs_is_refused_at_once(tmp_path: Path, kind: str) -> None:
    """A FIFO planted in a folder of logs (--events logs/*) hung the open forever; /dev/zero
    was read up to the 64 MiB limit."""
    if kind == "fifo":
        planted = tmp_path / "node-9.jsonl"
        os.mkfifo(planted)
    else:
        planted = tmp_path / "node-9.jsonl"
        planted.symlink_to("/dev/zero")
    out = tmp_path / "r"
    r = run_cli(
        ["plan", "record", "--events", str(good_log(tmp_path)), str(planted), "--out", str(out)],
        timeout_s=60,
    )
    assert r.code == 2, r.stderr
    assert f"{planted}: not a regular file" in error_line(r.stderr)
    assert not out.exists()


def test_one_log_may_not_hold_more_events_than_all_may(tmp_path: Path) -> None:
    """The event limit was checked only after a whole file was read and held (a 64 MiB log
    of minimal events is ~1.8 million of them); now a log stops at the limit."""
    log = tmp_path / "flood.jsonl"
    line = event("drain", 10, 20, zone="a", notice="preemption")
    log.write_text(line * 11 + "x" * (70 << 10) + "\n")
    with pytest.raises(UsageError, match=r"flood\.jsonl:11: over \d+ guard events in all"):
        plan_record.read_log(log, "a", max_events=10)
    with pytest.raises(UsageError, match="a line over"):  # under the limit: read on
        plan_record.read_log(log, "a", max_events=11)


@pytest.mark.parametrize(
    ("lines", "says"),
    [
        # held: hostile lines are skipped, never a traceback; the file then holds no events
        (["[" * 30_000 + "]" * 30_000 + "\n"], "no server-start or drain events"),
        (['{"phase": "drain", "start": 1e400, "end": 1e400, "zone": "a"}\n'], "no server-"),
        ([event("drain", 10, 5, zone="a")], "no server-start or drain events"),  # ends first
        (['{"phase": "drain", "start": NaN, "end": 1}\n'], "no server-start or drain events"),
        ([event("server-start", 0, 1, zone=f"z{i}") for i in range(10_000)], "name 10000 zones"),
        ([event("server-start", 0, 1, zone="../../etc/cron.d/x")], "not a recordable zone name"),
    ],
)
def test_hostile_log_lines_are_refused_or_skipped(
    tmp_path: Path, lines: list[str], says: str
) -> None:
    log = tmp_path / "n.jsonl"
    log.write_text("".join(lines))
    out = tmp_path / "r"
    with pytest.raises(UsageError, match=says):
        cli("--events", str(log), "--out", str(out))
    assert not out.exists()


def test_a_hard_link_planted_at_a_trace_name_is_replaced_not_written_through(
    tmp_path: Path,
) -> None:
    """Held: a local user who links DIR/zone.json to a file of the tool's user (root) after
    the recording opened: the flush renames a new file over the name; the other file keeps
    its bytes."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    out = tmp_path / "rec"
    with TraceDirectory.open(
        out, zones=["us-east1-b"], gap_s=60, start_s=T0, assumed_nodes=1, source="t"
    ) as d:
        os.link(victim, out / "us-east1-b.json")
        os.link(victim, out / "fleet.yaml")
        d.recorder.observe(T0 + 1, [ZoneObservation("us-east1-b", 1)])
        d.recorder.close_until(T0 + 120)
        assert d.flush()
    assert victim.read_bytes() == b"precious\n" and victim.stat().st_nlink == 1
    assert list(load_trace(out / "us-east1-b.json").capacity) == [1, 1]


def test_a_fleet_yaml_spotstart_did_not_write_is_never_replaced(tmp_path: Path) -> None:
    """`plan record --out .` in a project (or a controller pointed at one) renamed its
    fleet.yaml over the user's, exit 0. Now refused before anything is written; a fleet.yaml a
    recording wrote is still rewritten (a link planted there is replaced, never followed:
    tests/fleet/test_record.py)."""
    out = tmp_path / "project"
    out.mkdir()
    mine = b"# my plan\nzones: []\n"
    (out / "fleet.yaml").write_bytes(mine)
    with pytest.raises(RecordError, match=r"fleet\.yaml: not one spotstart recorded"):
        cli("--events", str(good_log(tmp_path)), "--out", str(out))
    assert (out / "fleet.yaml").read_bytes() == mine
    assert not list(out.glob("*.json"))
    with pytest.raises(RecordError):
        TraceDirectory.open(out, zones=["a"], gap_s=60, start_s=T0, assumed_nodes=1, source="t")
    # ours: a recording whose zone traces were removed starts again over its own fleet.yaml
    again = tmp_path / "again"
    assert cli("--events", str(good_log(tmp_path)), "--out", str(again)) == 0
    (again / "us-east1-b.json").unlink()
    assert cli("--events", str(good_log(tmp_path)), "--out", str(again)) == 0


def test_a_gap_plan_cannot_read_is_refused_at_start() -> None:
    """--record-gap 100000 recorded traces plan then refused to read (a tick over a day)."""
    from spotstart.fleet.traces import MAX_GAP_SECONDS, MIN_GAP_SECONDS

    for gap in (MAX_GAP_SECONDS + 1, MIN_GAP_SECONDS / 2, float("nan"), float("inf")):
        with pytest.raises(RecordError, match="record gap"):
            TraceRecorder(["a"], gap_s=gap, start_s=0, assumed_nodes=1)
    TraceRecorder(["a"], gap_s=MAX_GAP_SECONDS, start_s=0, assumed_nodes=1)


def test_temporary_files_a_killed_writer_left_are_removed_on_resume(tmp_path: Path) -> None:
    """A writer killed between creating its temporary file and renaming it left a file of up
    to ~5 MB per zone per crash; a restarted recorder (holding the lock) removes them, and
    nothing else."""
    out = tmp_path / "rec"
    out.mkdir()
    left = [".us-east1-b.json.4242.0badc0de.tmp", ".fleet.yaml.17.00000000.tmp"]
    kept = [".other.tmp", "notes.txt", ".us-east1-b.json.x.0badc0de.tmp"]
    for name in left + kept:
        (out / name).write_bytes(b"partial")
    with TraceDirectory.open(
        out, zones=["us-east1-b"], gap_s=60, start_s=T0, assumed_nodes=1, source="t"
    ):
        pass
    assert sorted(n for n in os.listdir(out) if n != ".record.lock") == sorted(kept)
