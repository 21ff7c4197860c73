"""`spotstart k8s controller`: keeps ``target`` replicas of a served model ready by scaling
``NAME-spot`` and ``NAME-ondemand`` through their scale subresource, with the decisions of a
fleet policy (`ClusterDriver`, the same policy objects `spotstart plan` replays).

Three loops on one event loop:

* the pod informer: LIST, then WATCH from the list's resourceVersion; a cut stream resumes from
  the last version seen, ``410 Gone`` (as a status or an ERROR event) relists, other failures
  back off (Retry-After honoured); a watch is restarted every ``watch_timeout_s`` so a silently
  dead connection cannot freeze the view;
* leader election over a Lease (`LeaderElector`): only the leader writes;
* the reconciler: on every pod change (and every ``resync_s``) it asks the policy and writes
  absolute replica counts only where they differ, so a retried, repeated or concurrent
  reconcile never scales up twice. Each change is logged, recorded as a Kubernetes Event on the
  Deployment and counted in Prometheus metrics; ``--dry-run`` only logs.

With ``record_dir`` (``--record-trace DIR``) every decision also feeds what it saw per zone to a
`spotstart.fleet.record` recording (no API call of its own): the traces `spotstart plan`
replays. Only the leader decides, so only the leader records: the recording (and its lock) is
taken when this replica becomes leader and written and handed back when it stops leading, so a
leader and its standby can share one directory on a shared volume. A standby never exits for
the lock; a new leader whose predecessor still holds it (a lease lost during a hung write)
decides without recording and tries the lock again every lease retry period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import Event as KubeEvent
from lightkube.resources.core_v1 import Node, Pod
from lightkube.types import PatchType, on_error_raise
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from spotstart.errors import SpotstartError
from spotstart.fleet.config import check_target
from spotstart.fleet.model import Preempted, Zone
from spotstart.fleet.policies import CalmRelease, make_policy
from spotstart.fleet.record import RecordingBusy, TraceDirectory, TraceRecorder
from spotstart.k8s.api import Backoff, api_status, is_transient, pause, with_retries
from spotstart.k8s.driver import (
    DELETION_COST,
    ZONE_LABEL,
    ClusterDriver,
    ClusterSpec,
    Decision,
    observe_zones,
    pod_info,
)
from spotstart.k8s.lease import LeaderElector, LeaseTiming

log = logging.getLogger("spotstart.k8s")
NAME_LABEL = "app.kubernetes.io/name"
RELEASE_COST = "-1000"  # below the default 0: these pods go first on a scale-down


@dataclass(frozen=True)
class ControllerConfig:
    name: str
    namespace: str
    zones: tuple[str, ...]
    target: int
    max_on_demand: int
    policy: str = "warm_hedge"
    policy_options: Mapping[str, Any] = field(default_factory=dict)
    calm_s: float = 300.0
    spot_cold_start_s: float = 300.0
    on_demand_cold_start_s: float = 300.0
    notice_s: float = 30.0
    stockout_after_s: float = 120.0
    resync_s: float = 10.0
    watch_timeout_s: float = 300.0
    dry_run: bool = False
    identity: str = field(default_factory=lambda: f"{socket.gethostname()}-{time.time_ns()}")
    lease: LeaseTiming = field(default_factory=LeaseTiming)
    record_dir: str | None = None  # --record-trace: record what is observed per zone here
    record_gap_s: float = 60.0
    record_assumed_nodes: int | None = None  # None: target
    record_flush_s: float = 60.0  # write the closed ticks at most this often (and at exit)

    @property
    def spot(self) -> str:
        return f"{self.name}-spot"

    @property
    def on_demand(self) -> str:
        return f"{self.name}-ondemand"

    @property
    def lease_name(self) -> str:
        return f"{self.name}-controller"


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.decisions = Counter(
            "spotstart_controller_decisions",
            "replica count changes written (or logged in --dry-run)",
            ["deployment", "direction"],
            registry=r,
        )
        self.replicas = Gauge(
            "spotstart_controller_replicas",
            "pods by capacity kind, zone and state, as the policy saw them",
            ["kind", "zone", "state"],
            registry=r,
        )
        self.desired = Gauge(
            "spotstart_controller_desired_replicas",
            "the replica count the policy wants per Deployment",
            ["deployment"],
            registry=r,
        )
        self.notice_to_replacement = Histogram(
            "spotstart_controller_notice_to_replacement_seconds",
            "from seeing a pod's notice annotation to its replacement being requested",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.leader = Gauge("spotstart_controller_leader", "1 while leading", registry=r)
        self.api_errors = Counter(
            "spotstart_controller_api_errors", "failed API requests", ["code"], registry=r
        )
        self.relists = Counter(
            "spotstart_controller_relists", "full relists (410 Gone or start)", registry=r
        )
        self.watch_restarts = Counter(
            "spotstart_controller_watch_restarts", "watches resumed after a cut", registry=r
        )


class PodInformer:
    """The pods of one model (label ``app.kubernetes.io/name=NAME``), kept current by list +
    watch. ``changed`` is set on every change; ``synced`` once the first list is in."""

    def __init__(
        self,
        client: AsyncClient,
        namespace: str,
        name: str,
        metrics: ControllerMetrics,
        watch_timeout_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.labels: dict[str, Any] = {NAME_LABEL: name}
        self.metrics = metrics
        self.watch_timeout_s = watch_timeout_s
        self.pods: dict[str, dict[str, Any]] = {}
        self.noticed_at: dict[str, float] = {}  # pod -> when its notice was first seen
        self.changed = asyncio.Event()
        self.synced = asyncio.Event()
        self._clock = clock
        self.resource_version: str | None = None

    def _ours(self, raw: Mapping[str, Any]) -> bool:
        # the server filters by label; we check again (names from outside are untrusted)
        labels = (raw.get("metadata") or {}).get("labels") or {}
        return all(labels.get(k) == v for k, v in self.labels.items())

    def _put(self, raw: dict[str, Any]) -> None:
        name = (raw.get("metadata") or {}).get("name")
        if not isinstance(name, str) or not self._ours(raw):
            return
        self.pods[name] = raw
        info = pod_info(raw)
        if info is not None and (info.notice or info.node_shutdown):
            self.noticed_at.setdefault(name, self._clock())

    def _drop(self, raw: Mapping[str, Any]) -> None:
        name = (raw.get("metadata") or {}).get("name")
        if isinstance(name, str):
            self.pods.pop(name, None)
            self.noticed_at.pop(name, None)

    async def relist(self) -> None:
        listing = self.client.list(Pod, namespace=self.namespace, labels=self.labels)
        fresh: dict[str, dict[str, Any]] = {}
        async for pod in listing:
            raw = pod.to_dict()
            name = (raw.get("metadata") or {}).get("name")
            if isinstance(name, str) and self._ours(raw):
                fresh[name] = raw
        try:
            rv: str | None = listing.resourceVersion
        except Exception:  # an empty or version-less list
            rv = None
        for gone in set(self.pods) - set(fresh):
            self.noticed_at.pop(gone, None)
        self.pods = {}
        for raw in fresh.values():
            self._put(raw)
        self.resource_version = rv if rv and rv.isdigit() else None
        self.metrics.relists.inc()
        self.synced.set()
        self.changed.set()

    async def _watch(self) -> None:
        stream = self.client.watch(
            Pod,
            namespace=self.namespace,
            labels=self.labels,
            resource_version=self.resource_version,
            on_error=on_error_raise,
        )
        async with asyncio.timeout(self.watch_timeout_s):
            async for kind, obj in stream:
                raw = obj.to_dict()
                rv = (raw.get("metadata") or {}).get("resourceVersion")
                if isinstance(rv, str) and rv.isdigit():
                    self.resource_version = rv
                if kind == "BOOKMARK":
                    continue
                if kind == "DELETED":
                    self._drop(raw)
                else:
                    self._put(raw)
                self.changed.set()

    async def run(self, stop: asyncio.Event) -> None:
        backoff = Backoff()
        need_list = True
        while not stop.is_set():
            try:
                if need_list:
                    await self.relist()
                    need_list = False
                await self._watch()
                self.metrics.watch_restarts.inc()  # the server ended the stream: resume
            except TimeoutError:
                self.metrics.watch_restarts.inc()  # our own restart of a long watch
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                code = api_status(exc)
                self.metrics.api_errors.labels(str(code or "transport")).inc()
                if code == 410:
                    log.info("pod watch: resourceVersion expired (410): relisting")
                    need_list = True
                    self.resource_version = None
                    continue
                if not is_transient(exc) and code not in (401, 403, 404):
                    log.warning("pod watch: %s", exc)
                delay = backoff.next_delay(exc)
                log.info("pod watch: %s; retrying in %.2f s", code or exc, delay)
                if self.resource_version is None:
                    need_list = True
                await pause(stop, delay)
                continue
            backoff.reset()
            if self.resource_version is None:
                need_list = True  # nothing to resume from: the server gave no versions


class Controller:
    def __init__(
        self,
        cfg: ControllerConfig,
        client: AsyncClient,
        metrics: ControllerMetrics | None = None,
        *,
        wall: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.client = client
        self.metrics = metrics or ControllerMetrics()
        self._wall = wall
        self._clock = clock
        policy = make_policy(cfg.policy, **dict(cfg.policy_options))
        spec = ClusterSpec(
            zones=tuple(Zone(z, 1.0, 3.0) for z in cfg.zones),
            spot_cold_start_s=cfg.spot_cold_start_s,
            on_demand_cold_start_s=cfg.on_demand_cold_start_s,
            preemption_notice_s=cfg.notice_s,
            max_on_demand=cfg.max_on_demand,
            stockout_after_s=cfg.stockout_after_s,
        )
        self.driver = ClusterDriver(CalmRelease(policy, cfg.calm_s), spec, start_s=wall())
        self.informer = PodInformer(
            client, cfg.namespace, cfg.name, self.metrics, cfg.watch_timeout_s, clock
        )
        self.elector = LeaderElector(
            client,
            cfg.namespace,
            cfg.lease_name,
            cfg.identity,
            cfg.lease,
            clock=clock,
            wall=wall,
            on_change=self._leadership,
        )
        self.zone_of: dict[str, str] = {}
        self.last_decision: Decision | None = None
        self.reconciles = 0
        self._logged: tuple[int, int] | None = None
        self.recording: TraceDirectory | None = None
        self._flushed_at = -float("inf")
        self._record_failed = False
        self._record_off = cfg.record_dir is None  # no recording, or stopped for good
        self._record_tried_at = -float("inf")
        self._record_busy_logged = False
        if cfg.record_dir is not None:
            # checked at start, so a bad directory, zone or gap is exit 2 here and not a
            # warning at every election; the lock is held only while leading
            try:
                self._open_recording().close()
            except RecordingBusy:
                # the leader records there now: check what can be checked without the lock
                check_target("record target", cfg.target)
                TraceRecorder(
                    cfg.zones,
                    gap_s=cfg.record_gap_s,
                    start_s=wall(),
                    assumed_nodes=self._record_assumed,
                )

    @property
    def _record_assumed(self) -> int:
        cfg = self.cfg
        return cfg.target if cfg.record_assumed_nodes is None else cfg.record_assumed_nodes

    def _open_recording(self) -> TraceDirectory:
        cfg = self.cfg
        assert cfg.record_dir is not None
        return TraceDirectory.open(
            cfg.record_dir,
            zones=cfg.zones,
            gap_s=cfg.record_gap_s,
            start_s=self._wall(),
            assumed_nodes=self._record_assumed,
            source=f"spotstart k8s controller {cfg.namespace}/{cfg.name}",
            target=cfg.target,
            notice_s=cfg.notice_s,
        )

    def start_recording(self) -> bool:
        """Take the recording (its lock) if it is wanted and free; True when held afterwards.
        Busy (a predecessor still writes) or unreadable: logged, tried again later; never an
        exit and never a reason not to decide."""
        if self.recording is not None:
            return True
        if self._record_off:
            return False
        self._record_tried_at = self._clock()
        try:
            self.recording = self._open_recording()
        except RecordingBusy as exc:
            if not self._record_busy_logged:
                log.info("--record-trace: %s; recording once it is free", exc)
            self._record_busy_logged = True
            return False
        except (SpotstartError, OSError) as exc:
            log.warning("--record-trace: %s; not recording, trying again later", exc)
            return False
        self._record_busy_logged = False
        self._flushed_at = -float("inf")
        log.info("--record-trace %s: recording (leader)", self.recording.path)
        return True

    def stop_recording(self) -> None:
        """Write what is closed (ticks that ended by now) and hand the lock back."""
        if self.recording is None:
            return
        self.flush_recording(final=True)
        if self.recording is not None:
            self.recording.close()
            log.info("--record-trace %s: written and released", self.recording.path)
            self.recording = None

    def _leadership(self, leading: bool) -> None:
        self.metrics.leader.set(1 if leading else 0)
        if leading:
            self.start_recording()
            self.informer.changed.set()  # act at once on what we see
        else:
            self.stop_recording()

    async def _zones(self, nodes: set[str]) -> None:
        for node in nodes - set(self.zone_of):
            try:
                obj = await self.client.get(Node, node)
            except Exception as exc:
                self.metrics.api_errors.labels(str(api_status(exc) or "transport")).inc()
                continue  # counted as not-yet-placed this round
            labels = (obj.metadata.labels if obj.metadata is not None else None) or {}
            if labels.get(ZONE_LABEL):
                self.zone_of[node] = labels[ZONE_LABEL]

    async def _replicas(self, name: str) -> int | None:
        try:
            dep = await with_retries(
                lambda: self.client.get(Deployment, name, namespace=self.cfg.namespace),
                f"get deployment {name}",
            )
        except Exception as exc:
            if api_status(exc) == 404:
                log.warning("deployment %s/%s not found", self.cfg.namespace, name)
                return None
            raise
        return int(dep.spec.replicas or 0) if dep.spec is not None else 0

    def decide(self) -> Decision:
        pods = [p for p in (pod_info(raw) for raw in self.informer.pods.values()) if p]
        now = self._wall()
        decision = self.driver.step(now, self.cfg.target, pods, self.zone_of)
        self._observe(decision)
        if (
            self.recording is None
            and not self._record_off
            and self._clock() - self._record_tried_at >= self.cfg.lease.retry_period_s
        ):
            self.start_recording()  # a predecessor's lock, or a volume, freed since
        if self.recording is not None:
            try:
                seen = observe_zones(
                    decision, pods, self.zone_of, self.cfg.zones, now, self.cfg.stockout_after_s
                )
                self.recording.recorder.observe(now, seen)
            except Exception:
                # a recording never stops scaling: raised here, it failed every reconcile
                log.exception("--record-trace %s: recording stopped", self.recording.path)
                self.recording.close()
                self.recording = None
                self._record_off = True
            else:
                if self._clock() - self._flushed_at >= self.cfg.record_flush_s:
                    self.flush_recording()
        return decision

    def flush_recording(self, *, final: bool = False) -> None:
        """Write the recording's closed ticks (``final``: closing those that ended by now).
        A recording that cannot be written is logged, never a reason to stop scaling."""
        rec = self.recording
        if rec is None:
            return
        if final:
            rec.recorder.close_until(self._wall())
        self._flushed_at = self._clock()
        try:
            rec.flush()
            self._record_failed = False
        except (SpotstartError, OSError) as exc:
            if not self._record_failed:
                log.warning("--record-trace %s: %s; the controller goes on", rec.path, exc)
            self._record_failed = True
        if rec.recorder.full and not final:
            log.warning("--record-trace %s: tick limit reached; recording stopped", rec.path)
            rec.close()
            self.recording = None
            self._record_off = True

    def _observe(self, d: Decision) -> None:
        self.metrics.replicas.clear()
        for r in d.state.replicas:
            state = "noticed" if r.is_noticed else "ready" if r.is_ready else "starting"
            self.metrics.replicas.labels(r.kind.value, r.zone, state).inc()
        self.metrics.desired.labels(self.cfg.spot).set(d.spot_replicas)
        self.metrics.desired.labels(self.cfg.on_demand).set(d.on_demand_replicas)

    async def reconcile(self) -> Decision:
        """One pass: observe, decide, write what differs (Events included).

        ``reconciles`` counts passes that finished, so whoever waits on it sees their writes.
        """
        decision = await self._reconcile()
        self.reconciles += 1
        return decision

    async def _reconcile(self) -> Decision:
        nodes = {
            str((raw.get("spec") or {}).get("nodeName") or "")
            for raw in self.informer.pods.values()
        }
        await self._zones({n for n in nodes if n})
        decision = self.decide()
        self.last_decision = decision
        wanted = (
            (self.cfg.spot, decision.spot_replicas),
            (self.cfg.on_demand, decision.on_demand_replicas),
        )
        current = {name: await self._replicas(name) for name, _ in wanted}
        changes: list[tuple[str, int, int]] = []
        for name, want in wanted:
            have = current[name]
            if have is not None and have != want:
                changes.append((name, have, want))
        if self.cfg.dry_run:
            key = (decision.spot_replicas, decision.on_demand_replicas)
            if changes and key != self._logged:
                log.info("dry run: would set %s", decision.summary())
                for name, have, want in changes:
                    self.metrics.decisions.labels(name, "up" if want > have else "down").inc()
            self._logged = key
            return decision
        # scale-ups first (capacity before release; on-demand, the sure one, before spot), then
        # the released pods marked and scaled down; Events after every write
        changes.sort(key=lambda c: (c[2] < c[1], c[0] != self.cfg.on_demand))
        for name, have, want in changes:
            if want < have:
                await self._mark_released(decision)
            await with_retries(
                lambda name=name, want=want: self.client.patch(  # type: ignore[misc]
                    Deployment.Scale,
                    name,
                    {"spec": {"replicas": want}},
                    namespace=self.cfg.namespace,
                    patch_type=PatchType.MERGE,
                ),
                f"scale {name}",
            )
            direction = "up" if want > have else "down"
            self.metrics.decisions.labels(name, direction).inc()
            log.info("scaled %s %d -> %d: %s", name, have, want, decision.summary())
        if any(want > have for _, have, want in changes):
            now = self._clock()
            for e in decision.events:
                if isinstance(e, Preempted):
                    seen = self.informer.noticed_at.get(decision.names.get(e.replica_id, ""))
                    if seen is not None:
                        self.metrics.notice_to_replacement.observe(now - seen)
        for name, have, want in changes:
            await self._event(name, have, want, decision)
        return decision

    async def _mark_released(self, decision: Decision) -> None:
        for pod in decision.release:
            try:
                await with_retries(
                    lambda pod=pod: self.client.patch(  # type: ignore[misc]
                        Pod,
                        pod,
                        {"metadata": {"annotations": {DELETION_COST: RELEASE_COST}}},
                        namespace=self.cfg.namespace,
                        patch_type=PatchType.MERGE,
                    ),
                    f"mark {pod}",
                )
            except Exception as exc:  # the ReplicaSet then picks by its own ranking
                log.info("could not mark %s for release: %s", pod, exc)

    async def _event(self, name: str, have: int, want: int, decision: Decision) -> None:
        now = datetime.fromtimestamp(self._wall(), UTC)
        stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
        event: KubeEvent = KubeEvent.from_dict(  # type: ignore[assignment]
            {
                "metadata": {
                    "name": f"{name}.{time.time_ns():x}",
                    "namespace": self.cfg.namespace,
                },
                "involvedObject": {
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "name": name,
                    "namespace": self.cfg.namespace,
                },
                "reason": "ScaledUp" if want > have else "ScaledDown",
                "message": f"{have} -> {want} replicas ({self.cfg.policy}): {decision.summary()}",
                "type": "Normal",
                "source": {"component": "spotstart-controller"},
                "reportingComponent": "spotstart.dev/controller",
                "reportingInstance": self.cfg.identity,
                "firstTimestamp": stamp,
                "lastTimestamp": stamp,
                "count": 1,
            }
        )
        try:
            await self.client.create(event)
        except Exception as exc:  # an Event is a courtesy; never fail a reconcile on it
            log.info("could not record an event on %s: %s", name, exc)

    async def _reconcile_loop(self, stop: asyncio.Event) -> None:
        backoff = Backoff(base_s=0.5)
        changed = self.informer.changed
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), self.cfg.resync_s)
            changed.clear()
            if not self.elector.is_leader and self.recording is not None:
                self.stop_recording()  # the lease ran out while its renewal hung
            if stop.is_set() or not self.informer.synced.is_set() or not self.elector.is_leader:
                continue
            try:
                await self.reconcile()
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                code = api_status(exc)
                self.metrics.api_errors.labels(str(code or "transport")).inc()
                delay = backoff.next_delay(exc)
                log.warning("reconcile failed (%s); again in %.2f s", code or exc, delay)
                await pause(stop, delay)
                changed.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Until ``stop``: inform, elect, reconcile. The lease is handed back on the way out."""
        informer = asyncio.create_task(self.informer.run(stop), name="informer")
        elector = asyncio.create_task(self.elector.run(stop), name="elector")
        reconciler = asyncio.create_task(self._reconcile_loop(stop), name="reconciler")
        stopped = asyncio.create_task(stop.wait(), name="stop")
        tasks = (informer, elector, reconciler)
        try:
            done, _ = await asyncio.wait((*tasks, stopped), return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopped and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            stop.set()
            for task in (informer, reconciler, stopped):
                task.cancel()  # a watch waits on the network: cancel, do not wait
            await asyncio.gather(*tasks, stopped, return_exceptions=True)
            self.stop_recording()


__all__ = ["ApiError", "Controller", "ControllerConfig", "ControllerMetrics", "PodInformer"]
