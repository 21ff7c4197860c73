"""Red team: hostile or merely large events files against the warm/cold engine-init naming
(:func:`spotstart.timeline.engine_phases`). Its first version compared every phase with every
engine-init event (a list ``in`` test on dataclasses, then a scan of every init per vLLM
span and of every restore per server-start): at MAX_PHASES an events file of engine-init
lines took 13 s there alone on this machine (`timeline`'s read after the fix: 0.2 s). Measured here
by counting the phase comparisons, not by a clock."""

from __future__ import annotations

import pytest

from spotstart import timeline
from spotstart.timeline import Phase

T0 = 1.8e9


def hostile(n: int) -> list[Phase]:
    phases = []
    for i in range(n):
        phases.append(Phase("engine-init", T0 + i, T0 + i + 1, "spotstart", "", "warm"))
        phases.append(Phase("server-start", T0, T0 + 10 * n, "spotstart", "", "until healthy"))
        phases.append(Phase("server: engine-init", T0 + i, T0 + i + 0.5, "server-log", "", ""))
        phases.append(Phase("engine-cache-restore", T0 + i, T0 + i + 0.1, "spotstart", "", ""))
    return phases


def test_engine_phases_compares_phases_a_bounded_number_of_times_per_phase(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    compared = 0
    eq = Phase.__eq__

    def counting(self: Phase, other: object) -> bool:
        nonlocal compared
        compared += 1
        return eq(self, other)

    monkeypatch.setattr(Phase, "__eq__", counting)
    n = 1500
    out = timeline.engine_phases(hostile(n))
    assert len(out) == 4 * n
    # what the naming still does, on the hostile input
    assert sum(p.name == "engine-init (warm)" for p in out) == n
    assert sum(p.name == "server: engine-init (warm)" for p in out) == n
    cut = [p for p in out if p.name == "server-start"]
    assert all(p.end == T0 for p in cut)  # the first restore/engine-init inside starts at T0
    assert compared <= 4 * n, f"{compared} phase comparisons for {4 * n} phases"


def test_naming_keeps_to_the_same_pod_and_the_earliest_overlap() -> None:
    a_warm = Phase("engine-init", T0 + 10, T0 + 20, "spotstart", "pod-a", "warm")
    b_cold = Phase("engine-init", T0 + 10, T0 + 20, "spotstart", "pod-b", "cold")
    long_cold = Phase("engine-init", T0, T0 + 100, "spotstart", "pod-c", "cold")
    c_warm = Phase("engine-init", T0 + 50, T0 + 60, "spotstart", "pod-c", "warm")
    span_a = Phase("server: engine-init", T0 + 12, T0 + 18, "server-log", "pod-a", "")
    span_c = Phase("server: engine-init", T0 + 55, T0 + 58, "server-log", "pod-c", "")
    span_x = Phase("server: engine-init", T0 + 500, T0 + 501, "server-log", "pod-a", "")
    start_a = Phase("server-start", T0 + 5, T0 + 30, "spotstart", "pod-a", "until healthy")
    start_d = Phase("server-start", T0 + 5, T0 + 30, "spotstart", "pod-d", "until healthy")
    out = timeline.engine_phases(
        [a_warm, b_cold, long_cold, c_warm, span_a, span_c, span_x, start_a, start_d]
    )
    names = [p.name for p in out]
    warm, cold = "engine-init (warm)", "engine-init (cold)"
    assert names[:4] == [warm, cold, cold, warm]
    assert names[4] == "server: engine-init (warm)"  # pod-a's own, not pod-b's cold one
    assert names[5] == "server: engine-init (cold)"  # pod-c: the earliest that overlaps
    assert names[6] == "server: engine-init"  # overlaps none
    assert out[7].end == T0 + 10 and out[8].end == T0 + 30  # pod-d has no restore inside
