"""The engine's start, warm or cold, in the timeline: the guard's engine-init event and vLLM's
own "init engine ... took" span named by the restore's outcome, the cache restore a phase of
its own on the critical path (the guard's server-start no longer hides it), and the colours
that tell them apart in the pictures."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from spotstart import timeline
from tests.conftest import run_cli

FIX = Path(__file__).parent / "fixtures"
EVENTS = FIX / "engine-cache-warm.jsonl"
LOG = FIX / "vllm-0.32-cpu-guard.log"


def at(hms: str) -> float:
    return datetime.fromisoformat(f"2026-12-06T{hms}+00:00").timestamp()


def with_detail(tmp_path: Path, detail: str, pod: str = "") -> Path:
    """The fixture with the engine-init event's temperature (and pod) changed."""
    out = tmp_path / f"events-{detail}.jsonl"
    lines = []
    for line in EVENTS.read_text().splitlines():
        e = json.loads(line)
        if e["phase"] == "engine-init":
            e["detail"], e["cache"] = detail, "hit" if detail == "warm" else "miss"
            e["pod"] = pod
        lines.append(json.dumps(e))
    out.write_text("\n".join(lines) + "\n")
    return out


def test_a_warm_start_names_the_guards_phase_and_vllms_span_warm() -> None:
    phases = timeline.collect([EVENTS, LOG], year=2026)
    by = {p.name: p for p in phases}
    assert "engine-init (warm)" in by and "server: engine-init (warm)" in by, sorted(by)
    assert "server: engine-init" not in by and "engine-init" not in by
    init = by["server: engine-init (warm)"]
    assert init.source == "server-log"
    assert init.start == pytest.approx(at("14:42:40") - 13.35) and init.end == at("14:42:40")
    # server-start is cut where the restore begins: the restore is its own phase
    start = by["server-start"]
    assert start.start == pytest.approx(at("14:41:57.8"))
    assert start.end == pytest.approx(by["engine-cache-restore"].start)


def test_the_restore_is_on_the_critical_path_between_the_guard_start_and_the_engine() -> None:
    path = [c["name"] for c in timeline.summary(timeline.collect([EVENTS]))["critical_path"]]
    assert path[:3] == ["server-start", "engine-cache-restore", "engine-init (warm)"], path


def test_a_cold_start_is_named_cold_and_without_events_the_span_is_plain(tmp_path: Path) -> None:
    names = {p.name for p in timeline.collect([with_detail(tmp_path, "cold"), LOG], year=2026)}
    assert {"engine-init (cold)", "server: engine-init (cold)"} <= names
    names = {p.name for p in timeline.collect([LOG], year=2026)}
    assert "server: engine-init" in names
    assert not any("(warm)" in n or "(cold)" in n for n in names)


def test_another_pods_engine_init_does_not_name_this_pods_span(tmp_path: Path) -> None:
    phases = timeline.engine_phases(
        [
            timeline.Phase("engine-init", at("14:42:00"), at("14:42:42"), "spotstart", "a", "warm"),
            timeline.Phase(
                "server: engine-init", at("14:42:27"), at("14:42:40"), "server-log", "b", ""
            ),
        ]
    )
    assert [p.name for p in phases] == ["engine-init (warm)", "server: engine-init"]


def test_an_engine_init_detail_that_is_not_a_temperature_is_left_as_is(tmp_path: Path) -> None:
    names = {p.name for p in timeline.collect([with_detail(tmp_path, "lukewarm")])}
    assert "engine-init" in names and not any(n.startswith("engine-init (") for n in names)


def test_warm_cold_and_restore_have_colours_of_their_own(tmp_path: Path) -> None:
    def color(name: str, source: str = "spotstart") -> str:
        return timeline.color(timeline.Phase(name, 0.0, 1.0, source))

    colours = {
        color("engine-init (warm)"),
        color("engine-init (cold)"),
        color("engine-cache-restore"),
        color("fetch"),
    }
    assert len(colours) == 4
    assert color("server: engine-init (warm)", "server-log") == color("engine-init (warm)")
    res = run_cli(["timeline", str(EVENTS), str(LOG), "--year", "2026", "--out", str(tmp_path)])
    assert res.code == 0, res.stderr
    page = (tmp_path / "timeline.html").read_text()
    assert "engine-init (warm)" in page and color("engine-init (warm)") in page
    assert "engine-cache-restore" in res.stdout  # on the critical path's table
