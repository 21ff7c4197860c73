"""Reading, resampling and aligning spot-capacity traces; every shared trace file loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from spotstart.fleet import CapacityTrace, ConfigError, align, load_trace, resample_min
from spotstart.fleet.traces import synthetic_trace


def trace(data: list[int], tick: float = 10.0) -> CapacityTrace:
    return CapacityTrace("t", tick, np.array(data, dtype=np.int64))


def test_every_shared_trace_file_loads(traces_dir: Path) -> None:
    files = sorted(traces_dir.rglob("*.json"))
    assert len(files) >= 40
    for f in files:
        t = load_trace(f)
        assert t.tick_seconds > 0, f
        assert len(t.capacity) > 0, f
        assert t.capacity.min() >= 0, f


def test_the_nine_zone_aws_trace_spans_45_days_at_195_s(traces_dir: Path) -> None:
    folder = traces_dir / "availability/1-node/aws-02-15-2023"
    tick, cap = align([load_trace(f) for f in sorted(folder.glob("*.json"))])
    assert tick == 195.0
    assert cap.shape == (9, 20158)
    assert 44 < cap.shape[1] * tick / 86400 < 46


def test_resampling_takes_the_minimum_of_every_overlapping_sample() -> None:
    t = trace([1, 0, 1, 1, 1, 1])
    assert resample_min(t, 20.0).capacity.tolist() == [0, 1, 1]
    assert resample_min(t, 30.0).capacity.tolist() == [0, 1]
    # windows that straddle samples: [0,15) [15,30) [30,45) [45,60)
    assert resample_min(t, 15.0).capacity.tolist() == [0, 0, 1, 1]
    assert resample_min(t, 10.0) is t


def test_resampling_to_a_finer_tick_is_refused() -> None:
    with pytest.raises(ConfigError, match="finer"):
        resample_min(trace([1, 1], 30.0), 10.0)


def test_align_uses_the_coarsest_tick_and_the_common_window() -> None:
    tick, cap = align([trace([1, 1, 0, 1, 1, 1, 1, 1], 10.0), trace([3, 2, 1], 20.0)])
    assert tick == 20.0
    assert cap.tolist() == [[1, 0, 1], [3, 2, 1]]
    tick, cap = align([trace([1, 1, 1, 1], 10.0), trace([2, 2], 10.0)])
    assert cap.shape == (2, 2)


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ({"metadata": {"gap_seconds": 60}, "data": []}, "empty trace"),
        ({"metadata": {"gap_seconds": 0}, "data": [1]}, "gap_seconds"),
        ({"metadata": {"gap_seconds": 60}, "data": [1, -1]}, "non-negative"),
        ({"data": [1]}, "metadata"),
    ],
)
def test_bad_trace_files_are_config_errors(tmp_path: Path, doc: object, match: str) -> None:
    p = tmp_path / "t.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=match):
        load_trace(p)


def test_missing_and_unparsable_trace_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_trace(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="JSON"):
        load_trace(tmp_path / "bad.json")


def test_synthetic_traces_are_deterministic_per_seed() -> None:
    a = synthetic_trace("s", ticks=500, tick_seconds=300, mean_up_hours=2, mean_down_hours=1)
    b = synthetic_trace("s", ticks=500, tick_seconds=300, mean_up_hours=2, mean_down_hours=1)
    assert a.capacity.tolist() == b.capacity.tolist()
    assert 0 < a.capacity.mean() < 1
