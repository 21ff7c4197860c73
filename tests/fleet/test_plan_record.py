"""`spotstart plan record`: guard event logs -> the traces plan replays. Real guards (one
preempted through the GCE metadata emulator, one stopped by SIGTERM) write the events; the
reading of hostile logs (zones that cannot name a file, lines that are not events) is tested on
files written here."""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from spotstart.cli import plan_record
from spotstart.errors import UsageError
from spotstart.fleet.record import NodeLife, TraceRecorder, lives_from_events, record_lives
from spotstart.fleet.traces import load_trace

T0 = 1_764_590_000.0


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="spotstart plan")
    plan_record.add_parser(parser.add_subparsers())
    args = parser.parse_args(["record", *argv])
    return int(args.run(args))


def event(phase: str, start: float, end: float, **extra: Any) -> str:
    doc = {"v": 1, "phase": phase, "start": T0 + start, "end": T0 + end, "bytes": None}
    return json.dumps({**doc, "host": "n1", "pod": "", "detail": "", **extra}) + "\n"


def test_lives_from_events_ready_at_start_end_until_the_notice() -> None:
    events = [
        {"phase": "server-start", "start": 0.0, "end": 100.0},
        {"phase": "drain", "start": 400.0, "end": 430.0, "notice": "preemption"},
        {"phase": "server-start", "start": 500.0, "end": 600.0},  # the node came back
        {"phase": "server-start", "start": 900.0, "end": 950.0},  # died without a drain
        {"phase": "drain", "start": 1000.0, "end": 1001.0, "notice": "termination"},
    ]
    assert lives_from_events("z", events) == [
        NodeLife("z", 100.0, 400.0, True),
        NodeLife("z", 600.0, 900.0, False),
        NodeLife("z", 950.0, 1000.0, False),
    ]
    # an older guard's drain (no notice key) counts as a preemption
    old = [{"phase": "server-start", "start": 0.0, "end": 1.0}, {"phase": "drain", "start": 5.0}]
    assert lives_from_events("z", old) == [NodeLife("z", 1.0, 5.0, True)]


def test_record_lives_k_follows_ready_nodes_and_notices() -> None:
    rec = TraceRecorder(["a", "b"], gap_s=60, start_s=T0, assumed_nodes=1)
    lives = [
        NodeLife("a", T0 + 10, T0 + 70, preempted=True),
        NodeLife("b", T0 + 10, T0 + 130, preempted=False),  # stopped by us: not a notice
        NodeLife("b", T0 + 20),
    ]
    record_lives(rec, lives, T0 + 180)
    assert rec.data("a") == [1, 0, 1]
    assert rec.data("b") == [2, 2, 2]  # never said no: the most ready in each tick
    assert rec.stats("a").notices == 1 and rec.stats("b").notices == 0


def test_real_guards_events_record_a_replayable_fleet(tmp_path: Path) -> None:
    from spotstart.emulate.metadata import MetadataEmulator
    from tests.guard.test_guard_cli import wait_exit
    from tests.guard.test_proxy import start_guard, start_upstream, wait_until_ready

    logs = {zone: tmp_path / f"{zone}.jsonl" for zone in ("zone-a", "zone-b")}
    upstream, upstream_url = start_upstream()
    try:
        with MetadataEmulator("gce") as emu:
            guards = []
            for zone, log in logs.items():
                extra = ("--cloud", "gce", "--metadata-url", emu.url) if zone == "zone-a" else ()
                guard, url = start_guard(
                    upstream_url,
                    *extra,
                    "--events",
                    str(log),
                    "--health-interval",
                    "0.05",
                    env={"SPOTSTART_ZONE": zone},
                )
                guards.append(guard)
                wait_until_ready(url, proc=guard)
            try:
                emu.preempt()  # zone-a's node is taken back
                assert wait_exit(guards[0], 40) == 0, guards[0].text
                guards[1].popen.send_signal(signal.SIGTERM)  # zone-b's: a rollout
                assert wait_exit(guards[1], 40) == 0, guards[1].text
            finally:
                for guard in guards:
                    guard.stop()
    finally:
        upstream.stop()
    written = {
        z: [json.loads(line) for line in p.read_text().splitlines()] for z, p in logs.items()
    }
    a_drain = [e for e in written["zone-a"] if e["phase"] == "drain"]
    b_drain = [e for e in written["zone-b"] if e["phase"] == "drain"]
    assert all(e["zone"] == "zone-a" for e in written["zone-a"])
    assert a_drain[0]["notice"] == "preemption" and a_drain[0]["source"] == "gce"
    assert b_drain[0]["notice"] == "termination" and b_drain[0]["source"] == "signal"

    out = tmp_path / "rec"
    # the logs end with zone-b's drain; recorded until 3 s later, so the notice's tick closes
    until = max(e["end"] for log in written.values() for e in log) + 3
    args = ("--events", *map(str, logs.values()), "--out", str(out), "--gap", "1")
    assert cli(*args, "--until", str(until)) == 0
    a = json.loads((out / "zone-a.json").read_text())
    b = json.loads((out / "zone-b.json").read_text())
    assert a["metadata"]["notices"] == 1 and b["metadata"]["notices"] == 0
    # zone-a said no once: the notice's tick holds the nodes left there (none); zone-b never
    # did: at least --assume (default: the target, the most nodes ready at once)
    assert a["metadata"]["exhausted_ticks"] == 1 and a["data"].count(0) == 1
    assert b["metadata"]["exhausted_ticks"] == 0 and min(b["data"]) >= 1
    proc = subprocess.run(
        [sys.executable, "-m", "spotstart", "plan", "run", "--config", str(out / "fleet.yaml"),
         "--json", "--no-optimal", "--policy", "on_demand"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    run = json.loads(proc.stdout)["runs"][0]
    assert run["horizon_s"] == len(a["data"]) * 1.0 and run["availability"] == 1.0


def test_a_zone_from_the_command_line_wins_and_other_lines_are_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "n1.jsonl"
    log.write_text(
        event("fetch", 0, 5)
        + "not json\n"
        + event("server-start", 0, 60)
        + event("drain", 200, 230, notice="preemption")
    )
    assert (
        cli("--events", f"us-east1-b={log}", "--out", str(tmp_path / "r"), "--until", str(T0 + 300))
        == 0
    )
    assert load_trace(tmp_path / "r" / "us-east1-b.json").capacity.tolist() == [1, 1, 1, 0, 1]
    assert "1 lines were not guard events" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("lines", "arg_zone", "says"),
    [
        ([event("server-start", 0, 60, zone="../../etc")], None, "not a recordable zone name"),
        ([event("server-start", 0, 60)], "UPPER", "not a recordable zone name"),
        ([event("server-start", 0, 60)], None, "no zone in its events"),
        (
            [event("server-start", 0, 60, zone="a"), event("drain", 90, 91, zone="b")],
            None,
            "name 2 zones",
        ),
        ([event("fetch", 0, 60, zone="a")], None, "no server-start or drain events"),
        (["x" * (70 << 10) + "\n"], "a", "a line over"),
    ],
)
def test_hostile_logs_are_refused_before_anything_is_written(
    tmp_path: Path, lines: list[str], arg_zone: str | None, says: str
) -> None:
    log = tmp_path / "n.jsonl"
    log.write_text("".join(lines))
    out = tmp_path / "r"
    with pytest.raises(UsageError, match=says):
        cli("--events", f"{arg_zone}={log}" if arg_zone else str(log), "--out", str(out))
    assert not out.exists()


def test_an_existing_recording_is_not_appended_to(tmp_path: Path) -> None:
    log = tmp_path / "n.jsonl"
    log.write_text(event("server-start", 0, 60, zone="a") + event("drain", 200, 230, zone="a"))
    out = str(tmp_path / "r")
    assert cli("--events", str(log), "--out", out) == 0
    with pytest.raises(UsageError, match="already holds a recording"):
        cli("--events", str(log), "--out", out)
