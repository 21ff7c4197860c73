"""`spotstart demo`, reduced (a tiny model, a short load), end to end as README command 1
runs it: the emulated cloud and metadata servers, the example server cold-started behind
guard, closed-loop load, a GCE preemption notice, the replacement taking the weights from
the preempted replica, the timeline files, the plan line. No request may be lost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytest.importorskip("torch")
pytest.importorskip("safetensors")


def test_the_reduced_demo_serves_through_a_preemption_and_loses_nothing(tmp_path: Path) -> None:
    res = run_cli(
        [
            "demo",
            "--shards",
            "1",
            "--shard-mb",
            "8",
            "--no-baseline",
            "--small",
            "--serve-seconds",
            "2",
            "--json",
            "--workdir",
            str(tmp_path),
        ],
        timeout_s=600,
    )
    assert res.code == 0, res.stderr[-3000:]
    doc = json.loads(res.stdout)
    story = doc["story"]
    assert story["requests_lost"] == 0, story["lost"]
    assert story["served_by"]["replica-a"] > 0 and story["served_by"]["replica-b"] > 0
    assert story["requests_streamed"] > 0
    assert story["same_tokens_after_replacement"] is True
    assert story["replica_a_exit"] == 0 and story["replica_b_exit"] == 0
    phases = {(p["pod"], p["phase"]): p for p in story["phases"]}
    for pod in ("replica-a", "replica-b"):
        for phase in ("load", "warmup", "server-start", "drain"):
            assert (pod, phase) in phases, (pod, phase)
    assert "0 MB from peers" in phases[("replica-a", "load")]["detail"]
    assert "0 MB from peers" not in phases[("replica-b", "load")]["detail"]  # from replica A
    assert "0 dropped" in phases[("replica-a", "drain")]["detail"]
    files = story["timeline"]
    assert Path(files["png"]).read_bytes()[:4] == b"\x89PNG"
    assert "<svg" in Path(files["html"]).read_text()
    trace = json.loads(Path(files["trace"]).read_text())
    assert {e["pid"] for e in trace["traceEvents"]} == {"replica-a", "replica-b"}
    assert story["plan"].startswith(("plan (9-zone", "(plan:", "(install"))
    assert [r["run"] for r in doc["fetch"]][:2] == ["spotstart fetch", "again (cached)"]
