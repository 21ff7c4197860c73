"""The guard's drain state machine: what to do with requests and the supervised server while a
preemption notice counts down. Pure: no sockets, no signals, no clock reads of its own (the clock
is injected); guard/proxy.py, guard/supervise.py and guard/run.py carry out its commands.

Stages, as kopf's ``running.py`` does them: signal (a notice) -> flag (unready, new requests
rejected at once) -> grace (in-flight requests run until ``drain_until``) -> cancel (requests
still running then are cut and counted as dropped) -> stop the supervised server (stop signal,
then SIGKILL at ``stop_by``) -> DONE, always before ``notice.deadline - safety_margin_s``.
The server is never signalled while a request is in flight: the stop signal comes only once
every accepted request has ended or been cut (vLLM's SIGTERM aborts what it is generating).

What the engine does on its own is an input too: an answer it aborted (``finish_reason``
"abort") is counted as lost, never drained; an engine that says it is shutting down (vLLM's
500 "cannot schedule new futures after shutdown") turns the guard unready and every new
request is answered 503 + Retry-After instead of being forwarded; a server that never became
healthy (still starting: vLLM ignores SIGTERM then) gets ``starting_stop_grace_s``, not
``stop_grace_s``, before SIGKILL.

Example::

    ctl = DrainController(DrainConfig(safety_margin_s=5), clock=time.monotonic)
    if ctl.try_accept():           # SERVING: count it in flight
        ...; ctl.finish()
    ctl.on_notice(notice)          # DRAINING: ready is False from here on
    for command in ctl.tick(): ... # CANCEL_IN_FLIGHT, STOP_SERVER, KILL_SERVER, EXIT
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from spotstart.guard.notice import PreemptionNotice

Clock = Callable[[], float]
Outcome = Literal["ok", "failed", "cut", "aborted", "refused"]

KILL_WAIT_S = 1.0  # after SIGKILL, how long to wait for the reap before leaving regardless


class Phase(enum.Enum):
    SERVING = "serving"
    DRAINING = "draining"
    STOPPING = "stopping"
    DONE = "done"


class Command(enum.Enum):
    """What the I/O layer must do now, in this order."""

    CANCEL_IN_FLIGHT = "cancel_in_flight"  # cut the requests still running (they are dropped)
    STOP_SERVER = "stop_server"  # send the stop signal to the supervised server
    KILL_SERVER = "kill_server"  # its grace is over: SIGKILL
    EXIT = "exit"  # the guard is done; exit with ``exit_code``


@dataclass(frozen=True)
class DrainConfig:
    """How a drain spends the notice window.

    The window ``deadline - now`` minus ``safety_margin_s`` is the budget, never less than
    ``min_grace_s`` (a notice that arrives late, or whose deadline is already past by our clock,
    still lets in-flight requests try to finish: readiness flips first either way); with a
    supervised server, ``min(stop_grace_s, budget / 2)`` of it is kept for stopping the server
    and the rest lets in-flight requests finish. Once the stop signal is sent the server gets
    ``stop_grace_s`` (within the budget) before SIGKILL, however early the drain ended.
    ``linger_s`` keeps answering 503 (instead of vanishing) for at least that long after a
    notice, so load balancers see the guard unready before it is gone. Early signals (the VM
    keeps running: rebalance, live migration) only warn unless ``early_signals="drain"``.
    """

    safety_margin_s: float = 5.0
    stop_grace_s: float = 10.0
    supervising: bool = False
    early_signals: Literal["drain", "warn"] = "warn"
    linger_s: float = 0.0
    min_grace_s: float = 5.0
    retry_after_s: int = 1  # clients should retry elsewhere now: this replica will not be back
    # a server that never answered its health check healthy is still starting: vLLM ignores
    # SIGTERM then (it comes up and serves), so SIGKILL follows soon, not after stop_grace_s
    starting_stop_grace_s: float = 1.0
    # how long a refusal "shutting down" keeps requests from the engine before one request is
    # let through to ask again: the 500's body is the engine's, and an engine that is not
    # shutting down (a false reading) must not stay unready for good
    shutdown_recheck_s: float = 5.0


@dataclass(frozen=True)
class DrainCounters:
    """Requests seen by the guard. ``drained``: completed after a notice; ``rejected``: answered
    503 + Retry-After without the engine starting them (draining, the engine shutting down or
    not accepting connections); ``dropped``: cut at the drain deadline; ``aborted``: ended by
    the engine with ``finish_reason`` "abort" (lost: never counted drained); ``failed``: ended
    by an upstream or client error (not by the drain). Lost requests: ``dropped + aborted``."""

    accepted: int
    in_flight: int
    drained: int
    rejected: int
    dropped: int
    failed: int
    aborted: int = 0

    @property
    def lost(self) -> int:
        """Accepted requests the engine did not finish: cut by the drain or aborted by it."""
        return self.dropped + self.aborted


@dataclass(frozen=True)
class NoticeDecision:
    """What a notice did: ``action`` is "drain" (started a drain), "tighten" (an earlier deadline
    for a running drain), "warn" (an early signal under ``early_signals="warn"``) or "ignore"."""

    action: Literal["drain", "tighten", "warn", "ignore"]
    notice: PreemptionNotice
    drain_until: float | None
    stop_by: float | None
    unready_after_s: float  # clock time from notice.received_at to the guard turning unready


class DrainController:
    """The state machine. Not thread-safe: call it from one event loop."""

    def __init__(self, config: DrainConfig, clock: Clock) -> None:
        self.config = config
        self._clock = clock
        self.phase = Phase.SERVING
        self.upstream_healthy = not config.supervising
        self.upstream_ever_healthy = self.upstream_healthy
        self.upstream_shutting_down = False
        self._down_since_shutdown = False
        self._shutdown_seen_at = 0.0
        self._probing = False  # a request let through to ask an engine "shutting down" again
        self._probe_since = 0.0
        self.notice: PreemptionNotice | None = None
        self.drain_started_at: float | None = None
        self.drain_until: float | None = None
        self.linger_until: float | None = None
        self.stop_by: float | None = None
        self.server_exit_code: int | None = None
        self.crashed = False
        self.server_stuck = False
        self._stop_sent = False
        self._stop_again = False  # a server that started after ignoring the stop signal
        self._budget_stop_by: float | None = None  # stop_by before a starting server's cut
        self._kill_sent = False
        self._no_server = False  # a drain began before the supervised server was started
        self._accepted = self._in_flight = self._drained = 0
        self._rejected = self._dropped = self._failed = self._aborted = 0

    def now(self) -> float:
        """The injected clock's time (the I/O layer schedules ``next_wakeup()`` against it)."""
        return self._clock()

    # -- readiness and requests ------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Serving, the server healthy, not crashed, and no refusal "shutting down" within the
        last ``shutdown_recheck_s`` (after that, ready again so that a request comes to ask
        the engine again: behind a load balancer no request comes to an unready replica, and
        a false reading would keep a healthy engine out for good)."""
        return (
            self.phase is Phase.SERVING
            and self.upstream_healthy
            and not (self.upstream_shutting_down and not self._recheck_due())
            and not self.crashed
        )

    def _recheck_due(self) -> bool:
        return self._clock() - self._shutdown_seen_at >= self.config.shutdown_recheck_s

    @property
    def counters(self) -> DrainCounters:
        return DrainCounters(
            accepted=self._accepted,
            in_flight=self._in_flight,
            drained=self._drained,
            rejected=self._rejected,
            dropped=self._dropped,
            failed=self._failed,
            aborted=self._aborted,
        )

    def set_upstream_health(self, healthy: bool) -> None:
        """The health poll's verdict. A shutdown the engine announced is over only once its
        health has failed and come back (a new process: vLLM's /health stays 200 while it
        shuts down, so a 200 alone proves nothing)."""
        self.upstream_healthy = healthy
        if healthy:
            self.note_upstream_started()
        if self.upstream_shutting_down:
            if not healthy:
                self._down_since_shutdown = True
            elif self._down_since_shutdown:
                self.upstream_shutting_down = self._down_since_shutdown = False

    def note_upstream_started(self) -> None:
        """The server answered (its health check, or a request): it has started, so it acts on
        the stop signal and gets ``stop_grace_s``, never a still-starting server's short cut.
        Learnt after a starting server's stop signal (it came up meanwhile, or was up and the
        health poll had not said so yet): the stop signal is sent again (one a starting vLLM
        ignored is lost) and the grace is the full one, within the notice."""
        if self.upstream_ever_healthy:
            return
        self.upstream_ever_healthy = True
        if self._stop_sent and not self._kill_sent and self.phase is Phase.STOPPING:
            self._stop_again = True
            limit = self._clock() + self.config.stop_grace_s
            budget = self._budget_stop_by
            self.stop_by = limit if budget is None else min(budget, limit)

    def on_upstream_shutting_down(self) -> bool:
        """The engine refused a request because it is shutting down: unready, and new requests
        are answered 503 without being forwarded, but for one every ``shutdown_recheck_s`` to
        ask again (a refusal again keeps it so; any other answer ends it). True when this is
        news."""
        news = not self.upstream_shutting_down
        self.upstream_shutting_down = True
        self._down_since_shutdown = False
        self._shutdown_seen_at = self._clock()
        return news

    def try_accept(self) -> bool:
        """A new request: True (count it in flight) while SERVING and the engine is not
        shutting down, else False (answer 503). While it is shutting down, one request every
        ``shutdown_recheck_s`` is accepted to ask again (``probing`` is then True until its
        ``finish(..., probe=True)``)."""
        if self._probing and self._clock() - self._probe_since >= self.config.shutdown_recheck_s:
            # the engine has held the probe that long: it took it (vLLM refuses within
            # milliseconds once shutting down), so it is not shutting down
            self.upstream_shutting_down = self._down_since_shutdown = False
        if (
            self.phase is Phase.SERVING
            and not self.crashed
            and (not self.upstream_shutting_down or self._may_probe())
        ):
            if self.upstream_shutting_down:
                self._probing = True
                self._probe_since = self._clock()
            self._accepted += 1
            self._in_flight += 1
            return True
        self._rejected += 1
        return False

    @property
    def probing(self) -> bool:
        return self._probing

    def _may_probe(self) -> bool:
        return not self._probing and self._recheck_due()

    def finish(self, outcome: Outcome = "ok", probe: bool = False) -> None:
        """An accepted request ended: "ok" completed, "failed" by an error, "cut" by the drain,
        "aborted" by the engine (``finish_reason`` "abort"), "refused" by the engine before it
        started it (answered 503: counted rejected, not accepted). ``probe``: the request
        ``try_accept`` let through to an engine said to be shutting down; an answer that is
        not a refusal means it is not (the engine started the request)."""
        self._in_flight -= 1
        if probe:
            self._probing = False
            if outcome in ("ok", "aborted", "failed") and self.upstream_shutting_down:
                self.upstream_shutting_down = self._down_since_shutdown = False
        if outcome in ("ok", "aborted"):
            self.note_upstream_started()  # it answered: it has started
        if outcome == "cut":
            self._dropped += 1
        elif outcome == "aborted":
            self._aborted += 1
        elif outcome == "refused":
            self._accepted -= 1
            self._rejected += 1
        elif outcome == "failed":
            self._failed += 1
        elif self.notice is not None:
            self._drained += 1

    @property
    def retry_after_s(self) -> int:
        return self.config.retry_after_s

    # -- events ----------------------------------------------------------------------------------

    def on_notice(self, notice: PreemptionNotice) -> NoticeDecision:
        now = self._clock()
        unready_after = max(0.0, now - notice.received_at)
        if notice.kind.is_early_signal and self.config.early_signals == "warn":
            return NoticeDecision("warn", notice, self.drain_until, self.stop_by, unready_after)
        drain_until, stop_by = self._plan(notice, now)
        if self.phase is Phase.SERVING:
            self.phase = Phase.DRAINING
            self.notice = notice
            self.drain_started_at = now
            self.drain_until, self.stop_by = drain_until, stop_by
            self.linger_until = min(now + self.config.linger_s, drain_until)
            return NoticeDecision("drain", notice, drain_until, stop_by, unready_after)
        if (
            self.phase is Phase.DRAINING
            and self.drain_until is not None
            and (drain_until < self.drain_until)
        ):
            self.drain_until, self.stop_by = drain_until, stop_by
            self.linger_until = min(self.linger_until or now, drain_until)
            return NoticeDecision("tighten", notice, drain_until, stop_by, 0.0)
        return NoticeDecision("ignore", notice, self.drain_until, self.stop_by, 0.0)

    def stop_now(self) -> None:
        """Skip what is left of the grace (a second SIGTERM/SIGINT): cut and stop at once."""
        now = self._clock()
        if self.phase is Phase.SERVING:
            self.phase = Phase.DRAINING
            self.drain_started_at = now
        if self.phase is Phase.DRAINING:
            self.drain_until = self.linger_until = now
            self.stop_by = now + min(self.config.stop_grace_s, 1.0)

    def server_never_started(self) -> None:
        """A notice came before the supervised server was started (the guard was still
        restoring the engine's cache): there is no server to stop, so the drain ends as an
        unsupervised one does, with exit code 0."""
        self._no_server = True

    def on_server_exit(self, code: int) -> None:
        """The supervised server exited (``code``: its exit status, 128+N for signal N)."""
        self.server_exit_code = code
        if not self._stop_sent:
            self.crashed = True  # it was not asked to stop
        if self.phase in (Phase.SERVING, Phase.DRAINING, Phase.STOPPING):
            self.phase = Phase.DONE

    @property
    def exit_code(self) -> int:
        """0 after a planned stop; the server's own status when it exited unasked (non-zero
        for a crash: a clean exit 0 unasked is passed on as 0, like an init process); 1 when
        the server could not be reaped even after SIGKILL."""
        if self.crashed and self.server_exit_code is not None:
            return self.server_exit_code
        return 1 if self.server_stuck else 0

    # -- time ------------------------------------------------------------------------------------

    def tick(self) -> list[Command]:
        """Advance with the clock; returns the commands to carry out now, in order."""
        now = self._clock()
        commands: list[Command] = []
        if self.phase is Phase.DRAINING:
            assert self.drain_until is not None and self.linger_until is not None
            idle = self._in_flight == 0 and now >= self.linger_until
            if idle or now >= self.drain_until:
                if self._in_flight > 0:
                    commands.append(Command.CANCEL_IN_FLIGHT)
                self.phase = Phase.STOPPING
                # The server gets stop_grace_s from its stop signal (now), within the budget.
                last = self.stop_by if self.stop_by is not None else now
                self.stop_by = max(now, min(last, now + self.config.stop_grace_s))
        if self.phase is Phase.STOPPING:
            if not self.config.supervising or self._no_server:
                self.phase = Phase.DONE
            elif not self._stop_sent:
                self._stop_sent = True
                commands.append(Command.STOP_SERVER)
                if not self.upstream_ever_healthy:  # still starting: it may ignore the signal
                    limit = now + self.config.starting_stop_grace_s
                    self._budget_stop_by = self.stop_by
                    self.stop_by = limit if self.stop_by is None else min(self.stop_by, limit)
            elif self._stop_again and not self._kill_sent:
                self._stop_again = False
                commands.append(Command.STOP_SERVER)
            elif not self._kill_sent and self.stop_by is not None and now >= self.stop_by:
                self._kill_sent = True
                commands.append(Command.KILL_SERVER)
            elif self._kill_sent and self.stop_by is not None and now >= self.stop_by + KILL_WAIT_S:
                self.server_stuck = True  # not even SIGKILL reaped it (D state): leave anyway
                self.phase = Phase.DONE
        if self.phase is Phase.DONE:
            commands.append(Command.EXIT)
        return commands

    def next_wakeup(self) -> float | None:
        """The clock time at which ``tick()`` has something to do unless an event comes first."""
        if self.phase is Phase.DRAINING:
            assert self.drain_until is not None and self.linger_until is not None
            if self._in_flight == 0:
                return self.linger_until
            return self.drain_until
        if self.phase is Phase.STOPPING and self._stop_again:
            return self._clock()
        if self.phase is Phase.STOPPING and self.stop_by is not None:
            return self.stop_by + (KILL_WAIT_S if self._kill_sent else 0.0)
        return None

    def _plan(self, notice: PreemptionNotice, now: float) -> tuple[float, float]:
        budget = max(self.config.min_grace_s, notice.deadline - self.config.safety_margin_s - now)
        grace = min(self.config.stop_grace_s, budget / 2) if self.config.supervising else 0.0
        return now + budget - grace, now + budget
