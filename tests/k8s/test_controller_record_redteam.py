"""Red team of the controller's --record-trace: a recording that fails must never stop the
controller deciding (the promise of `Controller.flush_recording`, kept for the observing too).
No API server is needed: `decide` reads the informer's pods, which are none here."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from spotstart.fleet.record import RecordError
from spotstart.k8s.api import make_client
from spotstart.k8s.controller import Controller
from tests.k8s.test_controller import config

pytest.importorskip("lightkube")


def recording_controller(tmp_path: Path, **kw: Any) -> Controller:
    cfg = config(record_dir=str(tmp_path / "rec"), record_gap_s=60, record_flush_s=0, **kw)
    return Controller(cfg, make_client("http://127.0.0.1:9"), wall=lambda: 1_764_590_000.0)


def test_a_recording_that_raises_stops_recording_never_deciding(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before the fix an exception in the recorder (an OverflowError from --record-assume
    2**31 was one) left `decide`, so every reconcile failed and nothing was ever scaled."""
    c = recording_controller(tmp_path)
    assert c.recording is None  # taken on leading, never at start
    assert c.start_recording() and c.recording is not None

    def broken(at_s: float, observations: Any) -> int:
        raise OverflowError("signed integer is greater than maximum")

    c.recording.recorder.observe = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR):
        decision = c.decide()
    assert decision is not None and c.recording is None
    assert "recording stopped" in caplog.text
    assert c.decide() is not None  # and it goes on deciding
    assert c.recording is None  # stopped for good: not taken again


def test_an_assumed_count_over_32_bits_is_refused_at_start(tmp_path: Path) -> None:
    with pytest.raises(RecordError, match="assumed nodes"):
        recording_controller(tmp_path, record_assumed_nodes=2**31)
