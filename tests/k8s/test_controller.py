"""`spotstart k8s controller` over real HTTP against kmock (with resourceVersion preconditions,
`tests/k8s/apiserver.py`), the real lightkube client talking to it: the notice annotation, a
stockout, a cut watch, 410 Gone, 500/429 storms, two controllers, the calm period, dry runs,
and the CLI as a process with its signals. No kube-apiserver installs here (Debian and PyPI
have none): what kmock does not do (scheduling, ReplicaSets) the tests do by hand."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from spotstart.k8s.api import make_client
from spotstart.k8s.controller import Controller, ControllerConfig
from spotstart.k8s.lease import LeaseTiming
from tests.k8s.apiserver import ApiServer

kmock_lib = pytest.importorskip("kmock")
pytest.importorskip("lightkube")
pytestmark = [pytest.mark.kmock(cls=ApiServer), pytest.mark.timeout(90)]

NS, NAME = "serving", "llm"
ZONES = ("zone-a", "zone-b", "zone-c")
PODS = f"/api/v1/namespaces/{NS}/pods"
FAST = LeaseTiming(lease_duration_s=1.5, renew_deadline_s=1.0, retry_period_s=0.2)


def stamp(seconds_ago: float = 0.0) -> str:
    t = datetime.now(UTC).timestamp() - seconds_ago
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod(
    name: str,
    kind: str = "spot",
    zone: str | None = "zone-a",
    ready: bool = True,
    unschedulable_for: float | None = None,
    age_s: float = 600.0,
) -> dict[str, Any]:
    conditions: list[dict[str, Any]] = []
    if ready:
        conditions.append(
            {"type": "Ready", "status": "True", "lastTransitionTime": stamp(age_s / 2)}
        )
    if unschedulable_for is not None:
        conditions.append(
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "lastTransitionTime": stamp(unschedulable_for),
            }
        )
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NS,
            "creationTimestamp": stamp(age_s),
            "labels": {"app.kubernetes.io/name": NAME, "spotstart.dev/capacity": kind},
        },
        "spec": {"nodeName": f"node-{zone}" if zone else None, "containers": []},
        "status": {"phase": "Running" if zone else "Pending", "conditions": conditions},
    }


async def post(api: Any, path: str, body: dict[str, Any]) -> None:
    async with api.post(path, json=body) as resp:
        assert resp.status < 300, await resp.text()


async def patch(api: Any, path: str, body: dict[str, Any]) -> None:
    headers = {"Content-Type": "application/merge-patch+json"}
    async with api.patch(path, json=body, headers=headers) as resp:
        assert resp.status < 300, await resp.text()


async def cluster(api: Any, *pods: dict[str, Any], spot: int = 2, od: int = 0) -> None:
    """Nodes in every zone, the two Deployments, and ``pods``."""
    for zone in ZONES:
        await post(
            api,
            "/api/v1/nodes",
            {"metadata": {"name": f"node-{zone}", "labels": {"topology.kubernetes.io/zone": zone}}},
        )
    for kind, replicas in (("spot", spot), ("ondemand", od)):
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
    for p in pods:
        await post(api, PODS, p)


def replicas(api: Any, kind: str) -> int:
    return int(api.objects["apps/v1/deployments", NS, f"{NAME}-{kind}"]["spec"]["replicas"])


def history(api: Any, kind: str) -> list[int]:
    """Every replica count the Deployment has held, in order."""
    obj = api.objects["apps/v1/deployments", NS, f"{NAME}-{kind}"]
    return [int(v["spec"]["replicas"]) for v in obj.history if v is not None]


def scale_patches(api: Any, kind: str) -> list[Any]:
    path = f"/apis/apps/v1/namespaces/{NS}/deployments/{NAME}-{kind}/scale"
    return [r for r in api if r.method == "PATCH" and r.url.path == path]


async def until(check: Callable[[], bool], timeout_s: float = 15.0) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


def config(**kw: Any) -> ControllerConfig:
    base: dict[str, Any] = {
        "name": NAME,
        "namespace": NS,
        "zones": ZONES,
        "target": 2,
        "max_on_demand": 2,
        "policy": "spread_fallback",
        "calm_s": 0.0,
        "resync_s": 60.0,
        "lease": FAST,
        "identity": "controller-1",
    }
    base.update(kw)
    return ControllerConfig(**base)


class Running:
    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(controller.run(self.stop))

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 10)
        await self.controller.client.close()


async def start(api: Any, **kw: Any) -> Running:
    running = Running(Controller(config(**kw), make_client(str(api.url))))
    await until(lambda: running.controller.elector.is_leader or running.task.done())
    return running


@pytest.fixture
async def controllers() -> AsyncIterator[list[Running]]:
    started: list[Running] = []
    yield started
    for r in started:
        await r.close()


async def test_a_notice_annotation_scales_on_demand_up_in_one_reconcile(
    kmock: Any, controllers: list[Running]
) -> None:
    await cluster(kmock, pod("llm-spot-1", zone="zone-a"), pod("llm-spot-2", zone="zone-b"))
    run = await start(kmock)
    controllers.append(run)
    c = run.controller
    await until(lambda: c.reconciles >= 1)
    assert (replicas(kmock, "spot"), replicas(kmock, "ondemand")) == (2, 0)
    before = c.reconciles
    await patch(
        kmock,
        f"{PODS}/llm-spot-1",
        {
            "metadata": {
                "annotations": {
                    "spotstart.dev/notice": "preemption",
                    "spotstart.dev/notice-deadline": stamp(-15),
                }
            }
        },
    )
    await until(lambda: replicas(kmock, "ondemand") == 1 and c.reconciles > before)
    assert c.reconciles - before == 1  # the first reconcile after the notice did it
    # the replacement spot pod is asked for at the notice too, while the noticed pod drains
    assert replicas(kmock, "spot") == 3
    assert c.metrics.notice_to_replacement._sum.get() > 0  # observed once
    events = [o for (res, _, _), o in kmock.objects.items() if "events" in str(res)]
    assert any("notice on llm-spot-1" in e["message"] for e in events)
    assert {e["involvedObject"]["name"] for e in events} == {"llm-spot", "llm-ondemand"}


async def test_a_zone_stockout_falls_back_to_on_demand(
    kmock: Any, controllers: list[Running]
) -> None:
    await cluster(
        kmock,
        pod("llm-spot-1", zone="zone-a"),
        pod("llm-spot-2", zone=None, ready=False, unschedulable_for=300),
    )
    controllers.append(await start(kmock, policy="warm_hedge", stockout_after_s=60))
    await until(lambda: replicas(kmock, "ondemand") == 1)
    assert replicas(kmock, "spot") == 2  # the stuck pod keeps trying; no extra spot pods
    assert max(history(kmock, "ondemand")) == 1


async def test_a_young_unscheduled_pod_is_not_a_stockout_for_warm_hedge(
    kmock: Any, controllers: list[Running]
) -> None:
    """A pod that has just been created is expected to get a node (ready within the cold
    start); on-demand is not bought for it until it has been stuck for stockout_after_s."""
    await cluster(
        kmock,
        pod("llm-spot-1", zone="zone-a"),
        pod("llm-spot-2", zone=None, ready=False, unschedulable_for=1, age_s=1),
    )
    run = await start(
        kmock,
        policy="warm_hedge",
        stockout_after_s=600,
        spot_cold_start_s=60,
        on_demand_cold_start_s=300,
    )
    controllers.append(run)
    await until(lambda: run.controller.reconciles >= 1)
    assert replicas(kmock, "ondemand") == 0


async def test_a_cut_watch_is_resumed(kmock: Any, controllers: list[Running]) -> None:
    await cluster(kmock, pod("llm-spot-1", zone="zone-a"), pod("llm-spot-2", zone="zone-b"))
    kmock[kmock_lib.action.WATCH][:2] << b""  # the first two watches end at once
    run = await start(kmock)
    controllers.append(run)
    await until(lambda: len([r for r in kmock if r.params.get("watch") == "true"]) >= 3)
    await patch(
        kmock,
        f"{PODS}/llm-spot-2",
        {"metadata": {"annotations": {"spotstart.dev/notice": "preemption"}}},
    )
    await until(lambda: replicas(kmock, "ondemand") == 1)
    watches = [r for r in kmock if r.params.get("watch") == "true"]
    assert len(watches) >= 3
    # it resumed from the version it had, not from scratch
    assert all(r.params.get("resourceVersion") for r in watches)


@pytest.mark.parametrize("form", ["status", "event"])
async def test_410_gone_relists(kmock: Any, controllers: list[Running], form: str) -> None:
    await cluster(kmock, pod("llm-spot-1", zone="zone-a"), pod("llm-spot-2", zone="zone-b"))
    gone = {
        "apiVersion": "v1",
        "kind": "Status",
        "status": "Failure",
        "code": 410,
        "reason": "Expired",
        "message": "too old resource version",
    }
    if form == "status":
        kmock[kmock_lib.action.WATCH][:1] << 410 << gone
    else:
        kmock[kmock_lib.action.WATCH][:1] << ({"type": "ERROR", "object": gone},)
    run = await start(kmock)
    controllers.append(run)
    await until(lambda: run.controller.metrics.relists._value.get() >= 2)
    # a pod that vanished while the watch was gone is dropped by the relist
    async with kmock.delete(f"{PODS}/llm-spot-2") as resp:
        assert resp.status == 200
    await until(lambda: replicas(kmock, "ondemand") == 1)
    lists = [
        r for r in kmock if r.method == "GET" and r.url.path == PODS and not r.params.get("watch")
    ]
    assert len(lists) >= 2


@pytest.mark.parametrize("code", [500, 429])
async def test_a_storm_of_errors_backs_off_without_duplicate_scale_ups(
    kmock: Any, controllers: list[Running], code: int
) -> None:
    await cluster(kmock, pod("llm-spot-1", zone="zone-a"), pod("llm-spot-2", zone="zone-b"))
    path = f"/apis/apps/v1/namespaces/{NS}/deployments/{NAME}-ondemand/scale"
    failure = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code}
    reaction = kmock["patch", path][:6] << code
    if code == 429:
        reaction << "Retry-After: 0"
    reaction << failure
    kmock[kmock_lib.action.LIST][:3] << code << failure  # the first lists fail as well
    run = await start(kmock)
    controllers.append(run)
    await until(lambda: run.controller.informer.synced.is_set())
    await patch(
        kmock,
        f"{PODS}/llm-spot-1",
        {"metadata": {"annotations": {"spotstart.dev/notice": "preemption"}}},
    )
    await until(
        lambda: replicas(kmock, "ondemand") == 1 and len(scale_patches(kmock, "ondemand")) >= 2
    )
    await asyncio.sleep(0.3)
    # kmock applies a write even when it answers an error (like a server that fails after
    # committing): the retries re-send the same absolute count, so it never goes past 1
    assert max(history(kmock, "ondemand")) == 1
    assert all(r.data["spec"] == {"replicas": 1} for r in scale_patches(kmock, "ondemand"))
    assert run.controller.metrics.api_errors.labels(str(code))._value.get() >= 3


async def test_two_controllers_one_leader_and_a_handover(
    kmock: Any, controllers: list[Running]
) -> None:
    await cluster(kmock, pod("llm-spot-1", zone="zone-a"), pod("llm-spot-2", zone="zone-b"))
    first = await start(kmock, identity="controller-1")
    controllers.append(first)
    second = Running(Controller(config(identity="controller-2"), make_client(str(kmock.url))))
    controllers.append(second)
    await asyncio.sleep(1.0)  # several retry periods: the second keeps trying
    assert first.controller.elector.is_leader and not second.controller.elector.is_leader
    assert second.controller.reconciles == 0
    lease = kmock.objects["coordination.k8s.io/v1/leases", NS, f"{NAME}-controller"]
    assert lease["spec"]["holderIdentity"] == "controller-1"
    await first.close()
    controllers.remove(first)
    await until(lambda: second.controller.elector.is_leader, timeout_s=10)
    await patch(
        kmock,
        f"{PODS}/llm-spot-2",
        {"metadata": {"annotations": {"spotstart.dev/notice": "preemption"}}},
    )
    await until(lambda: replicas(kmock, "ondemand") == 1)
    assert lease["spec"]["holderIdentity"] == "controller-2"


async def test_racing_candidates_never_both_lead(kmock: Any) -> None:
    """Five candidates try at once on an expired lease, over and over: the resourceVersion
    precondition lets one win each time."""
    from spotstart.k8s.lease import LeaderElector

    clients = [make_client(str(kmock.url)) for _ in range(5)]
    try:
        electors = [
            LeaderElector(c, NS, "race", f"candidate-{i}", FAST) for i, c in enumerate(clients)
        ]
        for _ in range(5):
            await asyncio.gather(*(e.try_acquire_or_renew() for e in electors))
            assert sum(e.is_leader for e in electors) == 1
            leader = next(e for e in electors if e.is_leader)
            await leader.release()
            assert not leader.is_leader
    finally:
        for c in clients:
            await c.close()


async def test_on_demand_is_released_only_after_the_calm_period(
    kmock: Any, controllers: list[Running]
) -> None:
    await cluster(
        kmock,
        pod("llm-spot-1", zone="zone-a"),
        pod("llm-spot-2", zone="zone-b", ready=False, age_s=5),
        pod("llm-ondemand-1", kind="ondemand", zone="zone-c"),
        od=1,
    )
    run = await start(kmock, calm_s=1.5, resync_s=0.1)
    controllers.append(run)
    await until(lambda: run.controller.reconciles >= 1)
    assert replicas(kmock, "ondemand") == 1
    await patch(
        kmock,
        f"{PODS}/llm-spot-2",
        {
            "status": {
                "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": stamp()}]
            }
        },
    )
    await asyncio.sleep(0.8)  # spot is back, but the calm period has not passed
    assert replicas(kmock, "ondemand") == 1
    await until(lambda: replicas(kmock, "ondemand") == 0)
    # the released pod was marked so that the ReplicaSet removes it first
    od_pod = kmock.objects["v1/pods", NS, "llm-ondemand-1"]
    assert (
        od_pod["metadata"]["annotations"]["controller.kubernetes.io/pod-deletion-cost"] == "-1000"
    )


async def test_never_above_max_on_demand(kmock: Any, controllers: list[Running]) -> None:
    await cluster(
        kmock,
        pod("llm-spot-1", zone=None, ready=False, unschedulable_for=900),
        pod("llm-spot-2", zone=None, ready=False, unschedulable_for=900),
    )
    run = await start(kmock, target=2, max_on_demand=1, stockout_after_s=60)
    controllers.append(run)
    await until(lambda: replicas(kmock, "ondemand") == 1)
    await asyncio.sleep(0.3)
    assert max(history(kmock, "ondemand")) == 1
    assert run.controller.last_decision is not None and run.controller.last_decision.capped


async def test_dry_run_decides_and_writes_nothing(
    kmock: Any, controllers: list[Running], caplog: pytest.LogCaptureFixture
) -> None:
    await cluster(kmock, pod("llm-spot-1", zone="zone-a"))
    caplog.set_level("INFO", "spotstart.k8s")
    run = await start(kmock, dry_run=True)
    controllers.append(run)
    await until(lambda: run.controller.reconciles >= 1)
    assert "dry run: would set spot=2 ondemand=1" in caplog.text
    assert not scale_patches(kmock, "ondemand") and not scale_patches(kmock, "spot")


async def test_the_cli_runs_as_a_process_and_hands_the_lease_back_on_sigterm(
    kmock: Any,
) -> None:
    await cluster(kmock, pod("llm-spot-1", zone="zone-a"), pod("llm-spot-2", zone="zone-b"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "spotstart", "k8s", "controller",
        "--name", NAME, "--namespace", NS, "--zones", ",".join(ZONES), "--target", "3",
        "--policy", "spread_fallback", "--calm-s", "0", "--kube-api", str(kmock.url),
        "--identity", "cli", "--lease-duration-s", "3", "--renew-deadline-s", "2",
        "--retry-period-s", "0.5",
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        # target 3 with 2 ready spot pods: one more of each
        await until(
            lambda: (replicas(kmock, "spot"), replicas(kmock, "ondemand")) == (3, 1), timeout_s=30
        )
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    lease = kmock.objects["coordination.k8s.io/v1/leases", NS, f"{NAME}-controller"]
    assert not lease["spec"].get("holderIdentity")
    assert proc.stderr is not None
    err = (await proc.stderr.read()).decode()
    assert "scaled llm-ondemand 0 -> 1" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--name", NAME, "--target", "2"], b"--zones"),
        (["--config", "examples/deploy.yaml"], b"--config needs --cloud"),
        (
            ["--name", NAME, "--zones", "a", "--target", "2", "--renew-deadline-s", "20"],
            b"lease timing",
        ),
    ],
)
async def test_the_cli_refuses_a_config_it_cannot_use(args: list[str], says: bytes) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "spotstart", "k8s", "controller", *args,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    assert proc.returncode == 2
    assert says in err and b"Traceback" not in err
    assert len(err.strip().splitlines()) == 1  # one line
