"""Wire the guard together: notice watchers and signals -> DrainController -> proxy, supervised
server and hooks. The one loop here carries out the controller's commands; it decides nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp

from spotstart import events
from spotstart.errors import UsageError
from spotstart.guard.drain import Clock, Command, DrainConfig, DrainController, Phase
from spotstart.guard.kube import PodRef, mark_pod, notice_patch
from spotstart.guard.metrics import GuardMetrics
from spotstart.guard.notice import NoticeKind, NoticeWatcher, PreemptionNotice
from spotstart.guard.proxy import GuardProxy, ProxyConfig
from spotstart.guard.supervise import (
    OrphanReaper,
    Supervisor,
    become_subreaper,
    describe_exit,
    exit_status,
    stop_group,
)
from spotstart.guard.watchers import Faults, supervise

if TYPE_CHECKING:  # the cache's code is imported only when --engine-cache is given
    from spotstart.enginecache import EngineCacheConfig
    from spotstart.guard.warmstart import WarmStart

log = logging.getLogger("spotstart.guard")


@dataclass(frozen=True)
class GuardConfig:
    """Everything one guard does. ``termination_window_s``: how long after SIGTERM the node or
    pod is really gone (Kubernetes' terminationGracePeriodSeconds, 30 by default)."""

    proxy: ProxyConfig
    drain: DrainConfig = field(default_factory=DrainConfig)
    server_argv: tuple[str, ...] = ()
    stop_signal: int = signal.SIGTERM
    termination_window_s: float = 30.0
    on_notice_cmd: str | None = None
    webhook_url: str | None = None
    hook_timeout_s: float = 5.0
    mark_pod: PodRef | None = None  # annotate this pod with the notice (Kubernetes)
    # restore the engine's compile caches before the server starts, publish them after its
    # first ready (needs server_argv): see spotstart.guard.warmstart
    engine_cache: EngineCacheConfig | None = None
    # the most the restore may delay the server's start (None: no bound); then it starts cold
    engine_cache_restore_timeout_s: float | None = 600.0

    def __post_init__(self) -> None:
        if self.engine_cache is not None and not self.server_argv:
            raise UsageError(
                "GuardConfig.engine_cache needs server_argv: the guard starts the server with "
                "its cache directories pointed into the cache"
            )


def notice_env(notice: PreemptionNotice, now: float) -> dict[str, str]:
    """The environment an ``--on-notice`` command gets (also the webhook's JSON fields)."""
    return {
        "SPOTSTART_NOTICE_KIND": notice.kind.value,
        "SPOTSTART_NOTICE_SOURCE": notice.source,
        "SPOTSTART_NOTICE_WINDOW_S": f"{notice.window_s:.3f}",
        "SPOTSTART_NOTICE_DEADLINE_IN_S": f"{notice.deadline - now:.3f}",
        "SPOTSTART_NOTICE_DEADLINE_UNIX": f"{time.time() + notice.deadline - now:.3f}",
        "SPOTSTART_NOTICE_DETAIL": json.dumps(notice.detail, sort_keys=True),
        "SPOTSTART_HOSTNAME": socket.gethostname(),
    }


class _Guard:
    def __init__(self, config: GuardConfig, watchers: Sequence[NoticeWatcher], clock: Clock):
        self.config = config
        self.watchers = list(watchers)
        self.clock = clock
        self.controller = DrainController(config.drain, clock)
        # Each watcher's fault counts (its own ``faults``, or ours for one without, such as
        # the signal watcher): its restarts are counted there, and /metrics reads them.
        self.faults = [
            (w, f if isinstance(f := getattr(w, "faults", None), Faults) else Faults())
            for w in self.watchers
        ]
        self.metrics = GuardMetrics(self.controller, lambda: [(w.name, f) for w, f in self.faults])
        self.changed = asyncio.Event()
        self.proxy = GuardProxy(
            config.proxy, self.controller, self.metrics, clock, self.changed.set
        )
        self.supervisor = Supervisor(config.server_argv) if config.server_argv else None
        self.own_pids: set[int] = set()  # children we wait for ourselves (server, hooks)
        self.signals_seen = 0
        self.background: set[asyncio.Task[None]] = set()
        self.started_wall = time.time()
        self.notice_wall: float | None = None
        self.first_drain: PreemptionNotice | None = None
        self.ready_recorded = False
        self.warmstart: WarmStart | None = None
        if config.engine_cache is not None and config.server_argv:
            from spotstart.guard.warmstart import WarmStart

            self.warmstart = WarmStart(
                config.engine_cache,
                config.server_argv,
                self.metrics,
                config.engine_cache_restore_timeout_s,
            )
        self.server_started_wall: float | None = None
        # the zone this node is in, for `spotstart plan record` (the phase events say it)
        zone = os.environ.get("SPOTSTART_ZONE", "")
        self.event_fields = {"zone": zone} if zone else {}

    # -- events ----------------------------------------------------------------------------------

    def on_notice(self, notice: PreemptionNotice) -> None:
        decision = self.controller.on_notice(notice)
        self.changed.set()
        m = self.metrics
        m.notices.labels(notice.source, notice.kind.value, decision.action).inc()
        now = self.clock()
        if decision.action == "drain":
            if self.notice_wall is None:
                self.notice_wall = time.time()
                self.first_drain = notice
            m.notice_to_unready.observe(decision.unready_after_s)
            self.proxy.announce_drain()
            log.warning(
                "%s notice from %s: unready now; in-flight requests may run %.1fs, "
                "deadline in %.1fs",
                notice.kind.value,
                notice.source,
                (decision.drain_until or now) - now,
                notice.deadline - now,
            )
            self._spawn(self._run_hooks(notice))
            if self.warmstart is not None and self.warmstart.publishing:
                # the node is going: a half-done upload is worth nothing, and nothing of it is
                # visible (the manifest goes last)
                self._spawn(self.warmstart.cancel_publish())
            if self.config.mark_pod is not None:  # only a drain: the pod is really going
                patch = notice_patch(notice, now, time.time())
                self._spawn(
                    mark_pod(self.config.mark_pod, patch, timeout_s=self.config.hook_timeout_s)
                )
        elif decision.action == "warn":
            log.warning(
                "%s notice from %s (early signal, --early-signals warn): still serving",
                notice.kind.value,
                notice.source,
            )
            self._spawn(self._run_hooks(notice))
        elif decision.action == "tighten":
            log.warning("%s notice from %s moves the deadline earlier", notice.kind, notice.source)

    def on_signal(self, sig: signal.Signals) -> None:
        if sig is signal.SIGHUP:
            if self.supervisor is not None:
                log.info("forwarding SIGHUP to the server")
                self.supervisor.send(sig)
            return
        self.signals_seen += 1
        if self.signals_seen > 1:
            log.warning("second %s: skipping the rest of the drain", sig.name)
            self.controller.stop_now()
            self.changed.set()
            return
        now = self.clock()
        self.on_notice(
            PreemptionNotice(
                kind=NoticeKind.TERMINATION,
                source="signal",
                received_at=now,
                deadline=now + self.config.termination_window_s,
                detail={"signal": sig.name},
            )
        )

    def _own(self) -> set[int]:
        pid = self.supervisor.pid if self.supervisor is not None else None
        return self.own_pids | ({pid} if pid is not None else set())

    def _spawn(self, coro: object) -> None:
        assert asyncio.iscoroutine(coro)
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _watch(self, watcher: NoticeWatcher, faults: Faults) -> None:
        """Watch for ever: a watcher that raises or ends (a bug; metadata failures never
        escape one) is logged once per interval, counted, and started again with backoff,
        since a dead watcher is a missed preemption."""

        async def watch_once() -> None:
            async for notice in watcher.watch():
                self.on_notice(notice)

        await supervise(
            watch_once, f"notice watcher {watcher.name!r}", clock=self.clock, faults=faults
        )

    async def _reap(self) -> None:
        assert self.supervisor is not None
        returncode = await self.supervisor.wait()
        self.controller.on_server_exit(exit_status(returncode))
        if self.controller.crashed:
            log.error(
                "server exited unexpectedly: %s; guard unready, exiting with %d",
                describe_exit(returncode),
                self.controller.exit_code,
            )
        else:
            log.info("server stopped: %s", describe_exit(returncode))
        self.changed.set()
        # Workers the server started and left behind (its process group): stopped now that
        # readiness is off, whatever the exit was.
        pid = self.supervisor.pid
        if pid is not None:
            await stop_group(pid)

    # -- hooks -----------------------------------------------------------------------------------

    async def _run_hooks(self, notice: PreemptionNotice) -> None:
        env = notice_env(notice, self.clock())
        jobs = []
        if self.config.on_notice_cmd:
            jobs.append(self._run_command(self.config.on_notice_cmd, env))
        if self.config.webhook_url:
            jobs.append(self._post_webhook(self.config.webhook_url, env))
        await asyncio.gather(*jobs)

    async def _run_command(self, cmd: str, env: dict[str, str]) -> None:
        proc = await asyncio.create_subprocess_shell(cmd, env={**os.environ, **env})
        self.own_pids.add(proc.pid)
        try:
            code = await asyncio.wait_for(proc.wait(), self.config.hook_timeout_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            log.error(
                "--on-notice %r: still running after %.1fs; killed", cmd, self.config.hook_timeout_s
            )
            return
        if code != 0:
            log.error("--on-notice %r failed: %s", cmd, describe_exit(code))

    async def _post_webhook(self, url: str, env: dict[str, str]) -> None:
        body = {k.removeprefix("SPOTSTART_").lower(): v for k, v in env.items()}
        body["detail"] = json.loads(env["SPOTSTART_NOTICE_DETAIL"])
        timeout = aiohttp.ClientTimeout(total=self.config.hook_timeout_s)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.post(url, json=body) as resp,
            ):
                if resp.status >= 400:
                    log.error("--webhook %s answered %d", url, resp.status)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.error("--webhook %s failed: %s: %s", url, type(exc).__name__, exc)

    # -- the loop --------------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        await self.proxy.start()
        p = self.config.proxy
        log.info(
            "guard listening on http://%s:%d -> %s",
            p.listen_host,
            self.proxy.bound_port,
            p.upstream,
        )
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self.on_signal, sig)
        tasks = [asyncio.create_task(self._watch(w, f)) for w, f in self.faults]
        reap: asyncio.Task[None] | None = None
        try:
            if self.supervisor is not None and await self._restore_engine_cache():
                # Orphans of the server's processes come to us (as they would to PID 1): reap
                # them, leaving our own children (server, hooks) to their waiters. Started
                # after the engine cache's restore: its key probes the engine's python in
                # children asyncio waits for, whose exit status a reaper could take first.
                if become_subreaper() or os.getpid() == 1:
                    tasks.append(asyncio.create_task(OrphanReaper(self._own).run()))
                await self.supervisor.start()
                self.server_started_wall = time.time()
                reap = asyncio.create_task(self._reap())
            await self._loop()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            if reap is not None and self.supervisor is not None and not self.supervisor.running:
                # the server is gone; let its left-over workers be stopped (bounded)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(reap), 3.0)
            if reap is not None:
                tasks.append(reap)
            for task in tasks:
                task.cancel()
            if self.supervisor is not None and self.supervisor.running:
                self.supervisor.kill()  # no-op after a clean stop; never leave it orphaned
            await self.proxy.close()
            if self.warmstart is not None:
                await self.warmstart.cancel_publish()
            if self.background:  # hooks get what is left of their own timeout, no more
                await asyncio.wait(set(self.background), timeout=0.5)
                for task in set(self.background):
                    task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        c = self.controller.counters
        if self.notice_wall is not None:
            events.record(
                "drain",
                self.notice_wall,
                time.time(),
                detail=f"{c.drained} drained, {c.rejected} rejected, {c.dropped} dropped, "
                f"{c.aborted} aborted",
                fields=self._drain_fields(),
            )
        log.info(
            "guard done: %d accepted, %d drained, %d rejected, %d dropped, %d aborted, "
            "%d failed (%d lost); exit %d",
            c.accepted,
            c.drained,
            c.rejected,
            c.dropped,
            c.aborted,
            c.failed,
            c.lost,
            self.controller.exit_code,
        )
        return self.controller.exit_code

    async def _restore_engine_cache(self) -> bool:
        """With --engine-cache: the server's env pointed at the cache, its key computed and
        the cache restored, before the server starts. A notice (or SIGTERM) during the restore
        cancels it: False, no server is started and the drain ends as one with nothing to
        drain. True: start the server (warm or cold)."""
        ws, sup = self.warmstart, self.supervisor
        if ws is None or sup is None:
            return True
        env = ws.server_env(os.environ)
        sup.env = env
        restoring = asyncio.create_task(ws.restore(env))
        noticed = asyncio.create_task(self._until_notice())
        try:
            await asyncio.wait({restoring, noticed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            noticed.cancel()
        if restoring.done():
            return True
        restoring.cancel()
        await asyncio.gather(restoring, return_exceptions=True)
        log.warning("notice during the engine cache restore: restore cancelled, server not started")
        self.controller.server_never_started()
        return False

    async def _until_notice(self) -> None:
        while self.controller.phase is Phase.SERVING:
            self.changed.clear()
            await self.changed.wait()

    def _drain_fields(self) -> dict[str, str]:
        """The drain event's cause: the first notice that drained (its kind and watcher)."""
        n = self.first_drain
        cause = {"notice": n.kind.value, "source": n.source} if n is not None else {}
        return {**self.event_fields, **cause}

    async def _loop(self) -> None:
        while True:
            self.changed.clear()
            if not self.ready_recorded and self.controller.ready:  # health changes wake us
                self.ready_recorded = True
                events.record(
                    "server-start",
                    self.started_wall,
                    time.time(),
                    detail="until healthy",
                    fields=self.event_fields,
                )
                self._server_ready()
            for command in self.controller.tick():
                if command is Command.CANCEL_IN_FLIGHT:
                    n = self.controller.counters.in_flight
                    log.warning("drain deadline reached: cutting %d in-flight requests", n)
                    await self.proxy.cancel_in_flight()
                elif command is Command.STOP_SERVER and self.supervisor is not None:
                    log.info(
                        "stopping server with %s", signal.Signals(self.config.stop_signal).name
                    )
                    self.supervisor.send(self.config.stop_signal)
                    if not self.controller.upstream_ever_healthy:
                        self.proxy.poll_health_now()  # started after all? then the full grace
                elif command is Command.KILL_SERVER and self.supervisor is not None:
                    log.warning("server still running at its stop deadline: SIGKILL")
                    self.supervisor.kill()
                elif command is Command.EXIT:
                    if self.controller.server_stuck:
                        log.error("server not reaped even after SIGKILL; leaving it behind")
                    return
            wake = self.controller.next_wakeup()
            timeout = None if wake is None else max(0.0, wake - self.clock())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), timeout)

    def _server_ready(self) -> None:
        """The server's first ready: the engine-init event (warm or cold), then the publish."""
        ws = self.warmstart
        if ws is None or self.server_started_wall is None:
            return
        events.record(
            "engine-init",
            self.server_started_wall,
            time.time(),
            detail="warm" if ws.warm else "cold",
            fields={**self.event_fields, "cache": ws.outcome},
        )
        if self.controller.phase is Phase.SERVING:
            ws.publish_soon()


async def run_guard(
    config: GuardConfig,
    watchers: Sequence[NoticeWatcher] = (),
    clock: Clock = time.monotonic,
) -> int:
    """Run the guard until a notice has been drained (or the server died); returns the exit code.

    Example::

        code = asyncio.run(run_guard(GuardConfig(ProxyConfig("http://127.0.0.1:8000"))))
    """
    return await _Guard(config, watchers, clock).run()
