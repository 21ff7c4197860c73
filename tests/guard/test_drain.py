"""The drain state machine over fake time: no sockets, no sleeps."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from spotstart.guard.drain import Command, DrainConfig, DrainController, Phase
from spotstart.guard.notice import NoticeKind, PreemptionNotice


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


def notice(
    clock: FakeClock, window_s: float, kind: NoticeKind = NoticeKind.PREEMPTION
) -> PreemptionNotice:
    return PreemptionNotice(kind, "test", clock.now, clock.now + window_s)


def make(**config: object) -> tuple[DrainController, FakeClock]:
    clock = FakeClock()
    ctl = DrainController(DrainConfig(**config), clock)  # type: ignore[arg-type]
    return ctl, clock


def test_serving_accepts_and_counts_requests() -> None:
    ctl, _ = make()
    assert ctl.ready and ctl.try_accept() and ctl.try_accept()
    ctl.finish()
    c = ctl.counters
    assert (c.accepted, c.in_flight, c.drained, c.rejected) == (2, 1, 0, 0)
    assert ctl.tick() == []


def test_notice_makes_guard_unready_at_once_and_rejects_new_requests() -> None:
    ctl, clock = make(safety_margin_s=5)
    assert ctl.try_accept()
    decision = ctl.on_notice(notice(clock, 30))
    assert decision.action == "drain" and decision.unready_after_s == 0.0
    assert not ctl.ready and ctl.phase is Phase.DRAINING
    assert not ctl.try_accept()
    assert ctl.counters.rejected == 1


def test_in_flight_requests_finish_during_drain_and_count_as_drained() -> None:
    ctl, clock = make(safety_margin_s=5)
    assert ctl.try_accept() and ctl.try_accept()
    ctl.on_notice(notice(clock, 30))
    clock.now += 1
    assert ctl.tick() == []  # still two in flight, deadline far
    ctl.finish()
    ctl.finish()
    assert ctl.tick() == [Command.EXIT]
    c = ctl.counters
    assert (c.drained, c.dropped, c.in_flight) == (2, 0, 0)


def test_requests_still_running_at_deadline_minus_margin_are_cut_and_counted_dropped() -> None:
    ctl, clock = make(safety_margin_s=5)
    assert ctl.try_accept()
    ctl.on_notice(notice(clock, 30))
    assert ctl.next_wakeup() == pytest.approx(clock.now + 25)
    clock.now += 24.9
    assert ctl.tick() == []
    clock.now += 0.1
    assert ctl.tick() == [Command.CANCEL_IN_FLIGHT, Command.EXIT]
    ctl.finish("cut")
    assert ctl.counters.dropped == 1 and ctl.counters.drained == 0


@pytest.mark.parametrize(
    ("window_s", "margin_s", "grace_s", "drain_for_s", "stop_for_s"),
    [
        (120, 5, 10, 105, 10),  # AWS: two minutes, plenty
        (30, 5, 10, 15, 10),  # GCE / Kubernetes default grace
        (10, 5, 10, 2.5, 2.5),  # short window: the grace is squeezed to half the budget
        (4, 5, 10, 2.5, 2.5),  # inside the margin already: still the 5 s minimum grace
        (-60, 5, 10, 2.5, 2.5),  # a deadline already past (AWS time behind our clock): same
    ],
)
def test_supervised_drain_splits_the_window_between_requests_and_server_stop(
    window_s: float, margin_s: float, grace_s: float, drain_for_s: float, stop_for_s: float
) -> None:
    ctl, clock = make(safety_margin_s=margin_s, stop_grace_s=grace_s, supervising=True)
    t0 = clock.now
    d = ctl.on_notice(notice(clock, window_s))
    assert d.drain_until == pytest.approx(t0 + drain_for_s)
    assert d.stop_by == pytest.approx(t0 + drain_for_s + stop_for_s)
    assert d.stop_by <= t0 + max(window_s - margin_s, DrainConfig.min_grace_s)


def test_supervised_server_gets_stop_signal_then_kill_after_stop_grace() -> None:
    ctl, clock = make(safety_margin_s=5, stop_grace_s=10, supervising=True)
    ctl.set_upstream_health(True)
    ctl.on_notice(notice(clock, 30))
    assert ctl.tick() == [Command.STOP_SERVER]  # nothing in flight: stop at once
    # --stop-grace counts from the stop signal, not from the end of the whole window
    assert ctl.phase is Phase.STOPPING and ctl.next_wakeup() == pytest.approx(clock.now + 10)
    clock.now += 9.9
    assert ctl.tick() == []
    clock.now += 0.1
    assert ctl.tick() == [Command.KILL_SERVER]
    assert ctl.tick() == []
    ctl.on_server_exit(137)
    assert ctl.tick() == [Command.EXIT] and ctl.exit_code == 0 and not ctl.crashed


def test_server_crash_makes_guard_unready_and_passes_exit_code_on() -> None:
    ctl, _ = make(supervising=True)
    assert not ctl.ready  # until the first good health check
    ctl.set_upstream_health(True)
    assert ctl.ready
    ctl.on_server_exit(3)
    assert not ctl.ready and ctl.crashed and ctl.exit_code == 3
    assert ctl.tick() == [Command.EXIT]


def test_unhealthy_upstream_is_unready_but_still_proxies() -> None:
    ctl, _ = make()
    ctl.set_upstream_health(False)
    assert not ctl.ready and ctl.try_accept()


@pytest.mark.parametrize(
    ("policy", "kind", "action", "phase"),
    [
        ("drain", NoticeKind.REBALANCE, "drain", Phase.DRAINING),
        ("drain", NoticeKind.MIGRATION, "drain", Phase.DRAINING),
        ("warn", NoticeKind.REBALANCE, "warn", Phase.SERVING),
        ("warn", NoticeKind.MAINTENANCE, "warn", Phase.SERVING),
        ("warn", NoticeKind.MIGRATION, "warn", Phase.SERVING),
        ("warn", NoticeKind.PREEMPTION, "drain", Phase.DRAINING),
        ("warn", NoticeKind.TERMINATION, "drain", Phase.DRAINING),
        ("warn", NoticeKind.RESTART, "drain", Phase.DRAINING),
    ],
)
def test_early_signals_drain_or_only_warn_by_policy(
    policy: str, kind: NoticeKind, action: str, phase: Phase
) -> None:
    ctl, clock = make(early_signals=policy)
    assert ctl.on_notice(notice(clock, 60, kind)).action == action
    assert ctl.phase is phase


@pytest.mark.parametrize("kind", [NoticeKind.MIGRATION, NoticeKind.REBALANCE])
def test_by_default_an_event_that_keeps_the_vm_only_warns(kind: NoticeKind) -> None:
    ctl, clock = make()
    assert ctl.on_notice(notice(clock, 60, kind)).action == "warn"
    assert ctl.ready and ctl.tick() == []


def test_an_earlier_second_notice_tightens_the_deadline_a_later_one_is_ignored() -> None:
    ctl, clock = make(safety_margin_s=5)
    assert ctl.try_accept()
    ctl.on_notice(notice(clock, 120))
    assert ctl.on_notice(notice(clock, 200)).action == "ignore"
    d = ctl.on_notice(notice(clock, 30))
    assert d.action == "tighten" and ctl.drain_until == pytest.approx(clock.now + 25)


def test_linger_keeps_answering_503_before_exiting_even_when_idle() -> None:
    ctl, clock = make(safety_margin_s=5, linger_s=2)
    ctl.on_notice(notice(clock, 30))
    assert ctl.tick() == [] and ctl.next_wakeup() == pytest.approx(clock.now + 2)
    clock.now += 2
    assert ctl.tick() == [Command.EXIT]


def test_stop_now_skips_the_rest_of_the_grace() -> None:
    ctl, clock = make(safety_margin_s=5)
    assert ctl.try_accept()
    ctl.on_notice(notice(clock, 60))
    ctl.stop_now()
    assert ctl.tick() == [Command.CANCEL_IN_FLIGHT, Command.EXIT]


def test_notice_to_unready_is_measured_from_the_watchers_receipt() -> None:
    ctl, clock = make()
    n = notice(clock, 30)
    clock.now += 0.004
    assert ctl.on_notice(n).unready_after_s == pytest.approx(0.004)


def test_failed_requests_are_neither_drained_nor_dropped() -> None:
    ctl, clock = make()
    assert ctl.try_accept()
    ctl.on_notice(notice(clock, 30))
    ctl.finish("failed")
    c = ctl.counters
    assert (c.failed, c.drained, c.dropped, c.in_flight) == (1, 0, 0, 0)


def test_stop_grace_never_runs_past_the_budget() -> None:
    ctl, clock = make(safety_margin_s=5, stop_grace_s=10, supervising=True)
    assert ctl.try_accept()
    ctl.on_notice(notice(clock, 30))  # drain until +15, stop by +25
    clock.now += 14
    ctl.finish()
    assert ctl.tick() == [Command.STOP_SERVER]
    assert ctl.next_wakeup() == pytest.approx(1000 + 24)  # 10 s grace from +14


def test_guard_leaves_anyway_when_the_server_survives_sigkill() -> None:
    ctl, clock = make(safety_margin_s=5, stop_grace_s=10, supervising=True)
    ctl.set_upstream_health(True)  # it came up (one still starting gets less: see below)
    ctl.on_notice(notice(clock, 30))
    assert ctl.tick() == [Command.STOP_SERVER]
    clock.now += 10
    assert ctl.tick() == [Command.KILL_SERVER]
    assert ctl.next_wakeup() == pytest.approx(clock.now + 1.0)
    clock.now += 1.0
    assert ctl.tick() == [Command.EXIT] and ctl.exit_code == 1
    assert clock.now < 1000 + 30  # still before the deadline
