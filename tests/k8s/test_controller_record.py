"""`spotstart k8s controller --record-trace` over real HTTP against kmock: two zones, spot pods
ready, a notice, a stockout, a node whose label names a zone not configured, a controller
restart in the middle; then `spotstart plan run` as a process over what was recorded. The
controller's wall clock is stepped by the test (ticks of 60 s in a few seconds); leadership runs
on the real monotonic clock."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from spotstart.fleet.config import build_config
from spotstart.fleet.sweep import run_plan
from spotstart.fleet.traces import load_trace
from spotstart.k8s.api import make_client
from spotstart.k8s.controller import Controller
from tests.k8s.apiserver import ApiServer
from tests.k8s.test_controller import NAME, NS, PODS, config, patch, pod, post, until

pytest.importorskip("kmock")
pytest.importorskip("lightkube")
pytest.importorskip("yaml")
pytestmark = [pytest.mark.kmock(cls=ApiServer), pytest.mark.timeout(120)]

ZONES = ("zone-a", "zone-b")


class Wall:
    """The controller's wall clock, moved by the test."""

    def __init__(self) -> None:
        import time

        self.t0 = time.time()
        self.now = self.t0

    def at(self, seconds: float) -> None:
        self.now = self.t0 + seconds

    def __call__(self) -> float:
        return self.now


async def two_zone_cluster(api: Any) -> None:
    labels = {"node-zone-a": "zone-a", "node-zone-b": "zone-b", "node-zone-c": "zone-c"}
    labels["node-evil"] = "../../etc"  # a label the controller must not turn into a file
    for node, zone in labels.items():
        body = {"metadata": {"name": node, "labels": {"topology.kubernetes.io/zone": zone}}}
        await post(api, "/api/v1/nodes", body)
    for kind, replicas in (("spot", 2), ("ondemand", 0)):
        await post(
            api,
            f"/apis/apps/v1/namespaces/{NS}/deployments",
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": f"{NAME}-{kind}", "namespace": NS},
                "spec": {"replicas": replicas, "selector": {}, "template": {}},
            },
        )


async def observed(c: Controller, seen: Any = lambda pods: True) -> None:
    """Once the informer holds what ``seen`` wants, one more reconcile (an observation)."""
    await until(lambda: seen(c.informer.pods))
    before = c.reconciles
    c.informer.changed.set()
    await until(lambda: c.reconciles > before)


async def started(api: Any, wall: Wall, record: Path) -> tuple[Controller, asyncio.Event, Any]:
    cfg = config(
        zones=ZONES,
        target=2,
        policy="spread_fallback",
        stockout_after_s=60,
        notice_s=30,
        record_dir=str(record),
        record_gap_s=60,
        record_assumed_nodes=1,
        record_flush_s=0,
    )
    c = Controller(cfg, make_client(str(api.url)), wall=wall)
    stop = asyncio.Event()
    task = asyncio.create_task(c.run(stop))
    await until(lambda: c.recording is not None or task.done())
    return c, stop, task


async def stopped(c: Controller, stop: asyncio.Event, task: Any) -> None:
    stop.set()
    await asyncio.wait_for(task, 10)
    await c.client.close()


async def test_a_recorded_fleet_replays_in_plan(kmock: Any, tmp_path: Path) -> None:
    record = tmp_path / "rec"
    wall = Wall()
    await two_zone_cluster(kmock)
    await post(kmock, PODS, pod("llm-spot-1", zone="zone-a"))
    await post(kmock, PODS, pod("llm-spot-2", zone="zone-b"))
    await post(kmock, PODS, pod("llm-spot-x", zone="evil"))  # on node-evil: counts nowhere
    c, stop, task = await started(kmock, wall, record)
    try:
        # tick 0: one spot replica alive in each zone; nothing refused
        wall.at(5)
        await observed(c, lambda pods: len(pods) == 3)
        # tick 1: zone-a's node gets its notice
        wall.at(70)
        notice = {"spotstart.dev/notice": "preemption", "spotstart.dev/notice-deadline": "x"}
        await patch(kmock, f"{PODS}/llm-spot-1", {"metadata": {"annotations": notice}})
        await observed(c, lambda pods: "annotations" in pods["llm-spot-1"]["metadata"])
        # tick 2: zone-a's pod is gone; its replacement finds no node (the wall is 130 s on:
        # unschedulable for longer than the 60 s stockout delay)
        wall.at(130)
        async with kmock.delete(f"{PODS}/llm-spot-1") as resp:
            assert resp.status < 300
        await post(kmock, PODS, pod("llm-spot-3", zone=None, ready=False, unschedulable_for=0))
        await observed(c, lambda pods: "llm-spot-1" not in pods and "llm-spot-3" in pods)
    finally:
        await stopped(c, stop, task)
    assert load_trace(record / "zone-a.json").capacity.tolist() == [1, 0]  # ticks 0-1 closed

    # the controller restarts; the recording resumes in the same directory
    c, stop, task = await started(kmock, wall, record)
    try:
        assert c.recording is not None and c.recording.recorder.ticks == 2
        wall.at(135)
        await observed(c)  # still stuck: tick 2 exhausted in both zones
        # tick 3: the stuck pod got a node in zone-a; zone-b gains a second replica
        wall.at(190)
        async with kmock.delete(f"{PODS}/llm-spot-3") as resp:
            assert resp.status < 300
        await post(kmock, PODS, pod("llm-spot-4", zone="zone-a"))
        await post(kmock, PODS, pod("llm-spot-5", zone="zone-b"))
        await observed(c, lambda pods: {"llm-spot-4", "llm-spot-5"} <= set(pods))
        wall.at(250)
        await observed(c)
        wall.at(301)  # the exit closes tick 4
    finally:
        await stopped(c, stop, task)

    assert sorted(os.listdir(record)) == [
        ".record.lock",
        "fleet.yaml",
        "zone-a.json",
        "zone-b.json",
    ]
    a = json.loads((record / "zone-a.json").read_text())
    b = json.loads((record / "zone-b.json").read_text())
    # k: zone-a said no at the notice (tick 1) and while the pod was stuck (ticks 2 and 3, the
    # stockout held until the observation at 190 s); zone-b only while the pod was stuck, at
    # its one replica; else the most alive, at least the assumed 1
    assert a["data"] == [1, 0, 0, 0, 1]
    assert b["data"] == [1, 1, 1, 1, 2]
    assert a["metadata"]["notices"] == 1 and b["metadata"]["notices"] == 0
    assert a["metadata"]["gap_seconds"] == 60 and a["metadata"]["start_unix"] == wall.t0
    # stuck from 130 s to 190 s, but the tick open at the restart was not written: 135 s to 190 s
    assert a["metadata"]["unschedulable_seconds"] == pytest.approx(55.0)
    assert a["metadata"]["filled_ticks"] == 0  # the restart fell inside tick 2

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "spotstart", "plan", "run", "--config", str(record / "fleet.yaml"),
        "--json", "--no-optimal", "--policy", "spot_spread", "--policy", "on_demand",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    runs = {r["policy"]: r for r in json.loads(out)["runs"]}
    # the same fleet replayed from traces written by hand with those numbers
    hand = tmp_path / "hand"
    hand.mkdir()
    for zone, data in (("zone-a", a["data"]), ("zone-b", b["data"])):
        (hand / f"{zone}.json").write_text(
            json.dumps({"metadata": {"gap_seconds": 60}, "data": data})
        )
    plan = build_config(
        {
            "capacity": "count",
            "target": {"replicas": 2},
            "preemption_notice_seconds": 30,
            "prices": {"spot_per_hour": 1.0, "on_demand_per_hour": 3.0},
            "zones": [{"name": z, "trace": f"{z}.json"} for z in ZONES],
            "policies": ["spot_spread", "on_demand"],
        },
        base_dir=hand,
    )
    for expected in run_plan(plan):
        got = runs[expected.policy]
        for key, value in expected.summary().items():
            assert got[key] == pytest.approx(value), (expected.policy, key)
    # what follows from the recording itself: zone-a's one drop (1 -> 0) is the one preemption
    # spot_spread meets; while both zones are full it cannot hold 2 on spot
    assert runs["spot_spread"]["preemptions"] == 1
    assert runs["spot_spread"]["launch_failures"] >= 1
    assert runs["spot_spread"]["availability"] < 1.0
    assert runs["on_demand"]["availability"] == 1.0


async def test_the_cli_refuses_a_zone_that_cannot_name_a_file(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "spotstart", "k8s", "controller", "--name", NAME,
        "--zones", "zone-a,../../etc", "--target", "1", "--kube-api", "http://127.0.0.1:9",
        "--record-trace", str(tmp_path / "rec"),
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    assert proc.returncode == 2
    assert b"not a recordable zone name" in err and b"Traceback" not in err
    assert not (tmp_path / "rec").exists() or not os.listdir(tmp_path / "rec")
