"""`spotstart timeline` on recorded objects shaped as the API returns them (a List of Pods and a
Node, an EventList with the kubelet's Pulled messages, a Karpenter NodeClaim), a vLLM log and
spotstart's own events: every phase's start and end equal the hand-computed values, the
critical path adds up, the PNG/HTML/trace files are written and the trace parsed back. And
a live run: real fetch and guard processes writing events."""

from __future__ import annotations

import json
import os
import signal
from datetime import datetime
from pathlib import Path

import pytest

from spotstart import timeline
from spotstart.emulate.storage import StorageEmulator
from tests.conftest import BUCKET, run_cli

FIX = Path(__file__).parent / "fixtures"
POD = "llm-spot-5d9c7-x2tq"


def at(hms: str) -> float:
    return datetime.fromisoformat(f"2026-12-01T{hms}+00:00").timestamp()


FILES = [
    FIX / n for n in ("objects.json", "events.json", "nodeclaim.json", "server.log", "events.jsonl")
]


def test_every_phase_lands_where_the_records_put_it() -> None:
    phases = timeline.collect(FILES, pod=POD)
    got = {p.name: (p.start, p.end, p.source) for p in phases}
    want = {
        "node: launch": (at("10:00:00"), at("10:00:40"), "kubernetes"),
        "node: register": (at("10:00:40"), at("10:01:30"), "kubernetes"),
        "node: initialize": (at("10:01:30"), at("10:02:00"), "kubernetes"),
        "scheduling": (at("10:00:05"), at("10:02:01"), "kubernetes"),
        # Pulled at 10:03:59 "in 1m57.5s"
        "image pull: ghcr.io/x/vllm:0.9": (at("10:02:01.500"), at("10:03:59"), "kubernetes"),
        "init: fetch-weights": (at("10:04:00"), at("10:05:30"), "kubernetes"),
        "containers start to Ready": (at("10:05:31"), at("10:07:10"), "kubernetes"),
        "Ready": (at("10:07:10"), at("10:07:10"), "kubernetes"),
        "fetch": (at("10:04:01"), at("10:05:29"), "spotstart"),
        "server: load weights": (at("10:05:39.750"), at("10:06:10"), "server-log"),
        "server: model loading": (at("10:05:39.520"), at("10:06:11"), "server-log"),
        "server: engine-init": (at("10:06:15"), at("10:07:05"), "server-log"),
    }
    assert set(got) == set(want)
    for name, (s, e, src) in want.items():
        assert got[name][0] == pytest.approx(s, abs=1e-6), name
        assert got[name][1] == pytest.approx(e, abs=1e-6), name
        assert got[name][2] == src, name
    # the Node's own boot is left out when Karpenter's NodeClaim tells it finer; the other
    # pod's Pulled event (850ms) and the "already present" one make no phase
    assert not any(p.name.startswith("node: boot") for p in phases)
    assert sum(p.name.startswith("image pull") for p in phases) == 1


def test_the_critical_path_is_contiguous_and_adds_up_to_ready() -> None:
    s = timeline.summary(timeline.collect(FILES, pod=POD))
    path = [(c["name"], c["seconds"]) for c in s["critical_path"]]
    assert path == [
        ("node: launch", 5.0),  # until the pod exists and waits for it
        ("scheduling", 116.5),  # pending until the image pull starts
        ("image pull: ghcr.io/x/vllm:0.9", 117.5),
        ("(unaccounted)", 1.0),
        ("init: fetch-weights", 90.0),
        ("(unaccounted)", 1.0),
        ("containers start to Ready", 99.0),
    ]
    assert s["total_s"] == pytest.approx(430.0)
    assert sum(c["share"] for c in s["critical_path"]) == pytest.approx(1.0, abs=1e-3)


def test_pictures_and_a_trace_that_parses_back(tmp_path: Path) -> None:
    res = run_cli(["timeline", *map(str, FILES), "--pod", POD, "--out", str(tmp_path), "--json"])
    assert res.code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["total_s"] == pytest.approx(430.0)
    png = (tmp_path / "timeline.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    page = (tmp_path / "timeline.html").read_text()
    assert "<svg" in page and "init: fetch-weights" in page and "<script" not in page
    trace = json.loads((tmp_path / "timeline.trace.json").read_text())
    xs = {e["name"]: e for e in trace["traceEvents"] if e["ph"] == "X"}
    t0 = at("10:00:00")
    pull = xs["image pull: ghcr.io/x/vllm:0.9"]
    assert pull["ts"] == round((at("10:02:01.500") - t0) * 1e6)
    assert pull["dur"] == 117_500_000 and pull["pid"] == POD
    assert xs["fetch"]["tid"] == "spotstart" and xs["fetch"]["dur"] == 88_000_000
    table = run_cli(["timeline", *map(str, FILES), "--pod", POD])
    assert table.code == 0 and "critical path: 430.0 s to Ready" in table.stdout


def test_bad_inputs_are_one_line_usage_errors(tmp_path: Path) -> None:
    junk = tmp_path / "junk.json"
    junk.write_text('{"phase": 3}\n{"nope": 1}\n')
    res = run_cli(["timeline", str(junk)])
    assert res.code == 2 and "neither Kubernetes JSON nor phase events" in res.stderr
    res = run_cli(["timeline", str(FIX / "objects.json"), "--pod", "missing"])
    assert res.code == 2 and "no such pod" in res.stderr
    with pytest.raises(ValueError):
        timeline.parse_go_duration("1m2x")
    assert timeline.parse_go_duration("1h2m3.5s") == pytest.approx(3723.5)
    assert timeline.parse_go_duration("850ms") == pytest.approx(0.85)


def test_a_live_fetch_and_guard_write_events_the_timeline_reads(
    clean_cloud: StorageEmulator, gcs_env: dict[str, str], tmp_path: Path
) -> None:
    from tests.guard.test_proxy import UPSTREAM_CMD, free_ports, start_guard, wait_until_ready

    clean_cloud.seed_gcs(BUCKET, {"tl/w.bin": os.urandom(3 << 20)})
    events = tmp_path / "events.jsonl"
    env = {**gcs_env, "SPOTSTART_EVENTS": str(events), "POD_NAME": "demo-0"}
    assert (
        run_cli(["fetch", f"gs://{BUCKET}/tl/", str(tmp_path / "w"), "--json"], env=env).code == 0
    )
    port, listen = free_ports(2)
    guard, url = start_guard(
        f"http://127.0.0.1:{port}",
        "--cloud",
        "none",
        "--events",
        str(events),
        "--",
        *UPSTREAM_CMD,
        str(port),
        listen_port=listen,
    )
    try:
        wait_until_ready(url, proc=guard)
        guard.popen.send_signal(signal.SIGTERM)
        assert guard.popen.wait(timeout=30) == 0
    finally:
        guard.stop()
    phases = timeline.collect([events])
    names = [p.name for p in phases]
    assert names == ["fetch", "server-start", "drain"], names
    fetch = phases[0]
    assert fetch.pod == "demo-0" and "0.00 GB" in fetch.detail and fetch.end > fetch.start
    assert phases[1].start >= fetch.end and phases[2].start >= phases[1].end
    assert "0 dropped" in phases[2].detail
