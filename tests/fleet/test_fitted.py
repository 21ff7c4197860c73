"""The synthetic trace spotstart ships (examples/fleet-fitted.yaml) is derived from the public
one, not copied: every number in it is re-derived here from ../shared's real files; and the
demo's plan line uses it with nothing beside the install, saying so."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]

from spotstart.cli.story import FLEET, FLEET_FITTED, _plan_line
from spotstart.fleet import ConfigError, load_config
from spotstart.fleet.traces import CapacityTrace, fit_two_state, load_trace, synthetic_trace


def test_the_fitted_config_holds_the_parameters_of_the_public_trace(traces_dir: Path) -> None:
    real = yaml.safe_load(FLEET.read_text())
    fitted = yaml.safe_load(FLEET_FITTED.read_text())
    assert [z["name"] for z in fitted["zones"]] == [z["name"] for z in real["zones"]]
    for zr, zf in zip(real["zones"], fitted["zones"], strict=True):
        trace = load_trace(traces_dir / zr["trace"], zr["name"])
        up, down = fit_two_state(trace)
        s = zf["synthetic"]
        assert (s["mean_up_hours"], s["mean_down_hours"]) == (round(up, 4), round(down, 4))
        assert int(s["hours"] * 3600 / fitted["tick_seconds"]) == len(trace.capacity)
        assert fitted["tick_seconds"] == trace.tick_seconds and s["nodes"] == 1
    # the rest is examples/fleet.yaml's fleet, unchanged
    for key in set(real) - {"traces_dir", "zones"}:
        assert fitted[key] == real[key], key


def test_the_fitted_trace_is_the_same_on_every_load_and_as_long_as_the_real_one() -> None:
    a, b = load_config(FLEET_FITTED), load_config(FLEET_FITTED)
    assert a.capacity.shape == (9, 20158) and a.spec.tick_seconds == 195
    assert np.array_equal(a.capacity, b.capacity)
    # each zone's share of time up is near what its fitted means imply
    doc = yaml.safe_load(FLEET_FITTED.read_text())
    for row, z in zip(a.capacity, doc["zones"], strict=True):
        up, down = z["synthetic"]["mean_up_hours"], z["synthetic"]["mean_down_hours"]
        assert abs((row > 0).mean() - up / (up + down)) < 0.1, z["name"]


def test_fit_recovers_the_means_a_long_synthetic_trace_was_drawn_with() -> None:
    t = synthetic_trace(
        "z", ticks=400_000, tick_seconds=195, mean_up_hours=5.0, mean_down_hours=0.8, seed=3
    )
    up, down = fit_two_state(t)
    assert up == pytest.approx(5.0, rel=0.05) and down == pytest.approx(0.8, rel=0.05)


def test_fit_refuses_a_trace_with_one_state() -> None:
    flat = CapacityTrace("flat", 60.0, np.ones(100, dtype=np.int64))
    with pytest.raises(ConfigError, match="never fails"):
        fit_two_state(flat)


def test_the_demo_plan_line_uses_the_fitted_trace_and_says_how_to_get_the_real_one() -> None:
    line = _plan_line(30.0)
    assert line.startswith("plan (a synthetic 9-zone trace fitted to the public AWS one"), line
    assert "% available at" in line and "--traces URL" in line and str(FLEET) in line


def test_the_demo_plan_line_reads_real_traces_when_given(traces_dir: Path) -> None:
    line = _plan_line(30.0, str(traces_dir))
    assert line.startswith(f"plan (9-zone AWS trace aws-02-15-2023 from {traces_dir}"), line
    assert "synthetic" not in line
