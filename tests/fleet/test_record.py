"""The fleet recorder: observations -> per-zone ticks (what k means), the directory it writes
(plan's format, resumed after a restart, written atomically, never through a link), hostile
zone names."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from spotstart.errors import UnsafePath
from spotstart.fleet.config import load_config
from spotstart.fleet.record import (
    MAX_ZONES,
    RecordError,
    TraceDirectory,
    TraceRecorder,
    ZoneObservation,
    check_zone,
)
from spotstart.fleet.traces import load_trace

T0 = 1_764_590_000.0
A, B = "zone-a", "zone-b"


def obs(zone: str, alive: int, notices: int = 0, unschedulable: bool = False) -> ZoneObservation:
    return ZoneObservation(zone, alive, notices, unschedulable)


# (name, assumed, [(seconds after T0, [observations])], close at, expected k for zone-a)
CASES = [
    ("steady fleet: the zone never said no", 2, [(1, [obs(A, 2)])], 180, [2, 2, 2]),
    ("never said no, fewer alive: up to the assumed count", 3, [(1, [obs(A, 1)])], 120, [3, 3]),
    ("more alive than assumed: what was seen", 1, [(1, [obs(A, 4)])], 60, [4]),
    (
        "a notice: the tick's fewest alive, then the zone is open again",
        2,
        [(1, [obs(A, 2)]), (70, [obs(A, 1, notices=1)]), (80, [obs(A, 2)])],
        180,
        [2, 1, 2],
    ),
    (
        "unschedulable: exhausted at the alive count while it lasts",
        3,
        [(1, [obs(A, 1, unschedulable=True)]), (130, [obs(A, 2)])],
        240,
        [1, 1, 1, 3],
    ),
    (
        "a notice to zero within a tick",
        1,
        [(10, [obs(A, 1)]), (20, [obs(A, 0, notices=1)])],
        60,
        [0],
    ),
    ("a zone with nothing in it that never said no", 1, [(1, [obs(A, 0)])], 60, [1]),
]


@pytest.mark.parametrize(
    ("assumed", "feed", "until", "want"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_k_per_tick(
    assumed: int, feed: list[tuple[float, list[ZoneObservation]]], until: float, want: list[int]
) -> None:
    rec = TraceRecorder([A], gap_s=60, start_s=T0, assumed_nodes=assumed)
    for at, seen in feed:
        rec.observe(T0 + at, seen)
    rec.close_until(T0 + until)
    assert rec.data(A) == want


def test_unschedulable_seconds_and_notices_are_counted_per_zone() -> None:
    rec = TraceRecorder([A, B], gap_s=60, start_s=T0, assumed_nodes=1)
    rec.observe(T0 + 10, [obs(A, 1, unschedulable=True), obs(B, 1)])
    rec.observe(T0 + 100, [obs(A, 1), obs(B, 0, notices=1)])
    rec.close_until(T0 + 120)
    assert rec.stats(A).unschedulable_seconds == pytest.approx(90.0)
    assert rec.stats(B).unschedulable_seconds == 0.0
    assert (rec.stats(A).notices, rec.stats(B).notices) == (0, 1)
    assert rec.data(A) == [1, 1] and rec.data(B) == [1, 0]
    assert rec.stats(A).exhausted_ticks == 2


def test_a_clock_stepped_back_never_reopens_a_closed_tick() -> None:
    rec = TraceRecorder([A], gap_s=60, start_s=T0, assumed_nodes=2)
    rec.observe(T0 + 130, [obs(A, 2)])
    rec.observe(T0 + 5, [obs(A, 0, notices=1)])  # counted as seen at T0 + 130
    rec.close_until(T0 + 180)
    assert rec.data(A) == [2, 2, 0]


def test_recording_stops_at_its_tick_limit() -> None:
    rec = TraceRecorder([A], gap_s=60, start_s=T0, assumed_nodes=1, max_ticks=3)
    rec.observe(T0 + 1, [obs(A, 1)])
    rec.observe(T0 + 100_000, [obs(A, 0, notices=1)])
    assert rec.full and rec.ticks == 3 and rec.data(A) == [1, 1, 1]


@pytest.mark.parametrize(
    "name",
    ["", "A", "Zone-a", "../etc", "a/b", "a.b", "-a", "a-", "a" * 64, "zone a", "zone\n", ".lock"],
)
def test_hostile_zone_names_are_refused_not_rewritten(name: str) -> None:
    with pytest.raises(RecordError, match="not a recordable zone name"):
        check_zone(name)
    with pytest.raises(RecordError):
        TraceRecorder([name], gap_s=60, start_s=T0, assumed_nodes=1)


def test_zone_count_is_bounded() -> None:
    zones = [f"z{i}" for i in range(MAX_ZONES + 1)]
    with pytest.raises(RecordError, match=f"at most {MAX_ZONES}"):
        TraceRecorder(zones, gap_s=60, start_s=T0, assumed_nodes=1)


def test_a_zone_not_recorded_is_ignored() -> None:
    rec = TraceRecorder([A], gap_s=60, start_s=T0, assumed_nodes=1)
    rec.observe(T0 + 1, [obs("../../etc/passwd", 5), obs(A, 1)])
    rec.close_until(T0 + 60)
    assert rec.zones == (A,) and rec.data(A) == [1]


def record(path: Path, zones: list[str], gap: float = 60, assumed: int = 1) -> TraceDirectory:
    return TraceDirectory.open(
        path,
        zones=zones,
        gap_s=gap,
        start_s=T0,
        assumed_nodes=assumed,
        source="test",
        target=1,
        notice_s=30,
    )


def test_directory_is_what_plan_reads(tmp_path: Path) -> None:
    with record(tmp_path, [A, B]) as d:
        d.recorder.observe(T0 + 1, [obs(A, 1), obs(B, 0)])
        d.recorder.observe(T0 + 61, [obs(A, 0, notices=1), obs(B, 1, unschedulable=True)])
        d.recorder.close_until(T0 + 180)
        assert d.flush() and not d.flush()  # nothing new the second time
    trace = load_trace(tmp_path / "zone-a.json")
    assert trace.tick_seconds == 60 and trace.capacity.tolist() == [1, 0, 1]
    meta = json.loads((tmp_path / "zone-b.json").read_text())["metadata"]
    assert meta["zone"] == B and meta["start_unix"] == T0 and meta["source"] == "test"
    assert meta["unschedulable_seconds"] == 119.0 and meta["exhausted_ticks"] == 2
    plan = load_config(tmp_path / "fleet.yaml")
    # zone-b, tick 1: none alive until 61 s, then one and no more to be had: the fewest, 0
    assert plan.capacity.tolist() == [[1, 0, 1], [1, 0, 1]]
    assert plan.spec.preemption_notice_s == 30 and plan.zone_traces == (A, B)
    assert sorted(os.listdir(tmp_path)) == [
        ".record.lock",
        "fleet.yaml",
        "zone-a.json",
        "zone-b.json",
    ]


def test_resume_keeps_start_and_fills_the_gap_with_the_last_k(tmp_path: Path) -> None:
    with record(tmp_path, [A]) as d:
        d.recorder.observe(T0 + 1, [obs(A, 1)])
        d.recorder.observe(T0 + 61, [obs(A, 0, notices=1)])
        d.recorder.close_until(T0 + 120)
        d.flush()
    # restarted later, with a second zone now configured and another start time offered
    with record(tmp_path, [A, B]) as d:
        assert d.recorder.start_s == T0 and d.recorder.ticks == 2
        d.recorder.observe(T0 + 250, [obs(A, 1), obs(B, 1)])
        d.recorder.close_until(T0 + 300)
        d.flush()
    assert load_trace(tmp_path / "zone-a.json").capacity.tolist() == [1, 0, 0, 0, 1]
    assert load_trace(tmp_path / "zone-b.json").capacity.tolist() == [1, 1, 1, 1, 1]
    meta = json.loads((tmp_path / "zone-a.json").read_text())["metadata"]
    assert meta["filled_ticks"] == 2 and meta["notices"] == 1
    assert json.loads((tmp_path / "zone-b.json").read_text())["metadata"]["filled_ticks"] == 4


def test_resume_refuses_another_gap_and_a_foreign_file(tmp_path: Path) -> None:
    with record(tmp_path, [A]) as d:
        d.recorder.close_until(T0 + 60)
        d.flush()
    with pytest.raises(RecordError, match="recorded every 60 s, not 30 s"):
        record(tmp_path, [A], gap=30)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.json").write_text('{"metadata": {"gap_seconds": 60}, "data": [1]}')
    with pytest.raises(RecordError, match="not a spotstart recording"):
        record(other, [A])


def test_resume_after_a_crash_between_two_files_takes_the_ticks_all_hold(tmp_path: Path) -> None:
    with record(tmp_path, [A, B]) as d:
        d.recorder.observe(T0 + 1, [obs(A, 1), obs(B, 1)])
        d.recorder.close_until(T0 + 120)
        d.flush()
    doc = json.loads((tmp_path / "zone-a.json").read_text())
    doc["data"].append(7)  # zone-a renamed one flush ahead of zone-b
    (tmp_path / "zone-a.json").write_text(json.dumps(doc))
    with record(tmp_path, [A, B]) as d:
        assert d.recorder.ticks == 2 and d.recorder.data(A) == [1, 1]


def test_a_second_recorder_into_the_same_directory_is_refused(tmp_path: Path) -> None:
    with record(tmp_path, [A]), pytest.raises(RecordError, match="another process"):
        record(tmp_path, [A])
    record(tmp_path, [A]).close()  # free again once the first is closed


def test_a_link_planted_at_a_trace_name_is_replaced_never_written_through(
    tmp_path: Path,
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    rec_dir = tmp_path / "rec"
    rec_dir.mkdir()
    (rec_dir / "fleet.yaml").symlink_to(victim)
    with record(rec_dir, [A]) as d:
        d.recorder.close_until(T0 + 60)
        d.flush()
    assert victim.read_text() == "keep"
    assert not (rec_dir / "fleet.yaml").is_symlink()
    assert not [n for n in os.listdir(rec_dir) if n.endswith(".tmp")]


def test_a_link_planted_at_a_zone_trace_is_not_read(tmp_path: Path) -> None:
    (tmp_path / "zone-a.json").symlink_to("/etc/hostname")
    with pytest.raises(UnsafePath):
        record(tmp_path, [A])
    lock_dir = tmp_path / "lock"
    lock_dir.mkdir()
    (lock_dir / ".record.lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UnsafePath):
        record(lock_dir, [A])
    assert not (tmp_path / "elsewhere").exists()


def test_a_planted_fifo_or_a_deeply_nested_file_is_refused_without_hanging(
    tmp_path: Path,
) -> None:
    os.mkfifo(tmp_path / "zone-a.json")
    with pytest.raises(UnsafePath, match="not a regular file"):
        record(tmp_path, [A])
    nested = tmp_path / "nested"
    nested.mkdir()
    (nested / "zone-a.json").write_text("[" * 100_000)
    with pytest.raises(RecordError, match="not a readable trace"):
        record(nested, [A])
