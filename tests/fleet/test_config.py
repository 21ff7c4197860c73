"""Config loading: a valid file becomes a PlanConfig; each mistake is a one-line ConfigError."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]

from spotstart.errors import UsageError
from spotstart.fleet import ConfigError, build_config, load_config, run_plan

REPO = Path(__file__).resolve().parents[2]


def write_traces(tmp_path: Path) -> Path:
    d = tmp_path / "traces"
    d.mkdir()
    (d / "a.json").write_text(json.dumps({"metadata": {"gap_seconds": 60}, "data": [1] * 20}))
    (d / "b.json").write_text(
        json.dumps({"metadata": {"gap_seconds": 120}, "data": [1, 0, 1, 1, 1, 1, 1, 1]})
    )
    (d / "empty.json").write_text(json.dumps({"metadata": {"gap_seconds": 60}, "data": []}))
    return d


def doc(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "traces_dir": "traces",
        "zones": [{"name": "a", "trace": "a.json"}, {"name": "b", "trace": "b.json"}],
        "prices": {"spot_per_hour": 1.0, "on_demand_per_hour": 3.0},
        "target": {"replicas": 1},
    }
    base.update(over)
    return base


def test_a_valid_config_resamples_to_the_coarsest_tick(tmp_path: Path) -> None:
    write_traces(tmp_path)
    plan = build_config(doc(), base_dir=tmp_path)
    assert plan.spec.tick_seconds == 120.0
    assert plan.capacity.tolist() == [[1] * 8, [1, 0, 1, 1, 1, 1, 1, 1]]
    assert plan.policies[0][0] == "on_demand"
    assert all(0 <= r.availability <= 1 for r in run_plan(plan))


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"zonez": []}, "unknown key 'zonez'"),
        ({"prices": {"spot_per_hour": -1}}, r"prices.spot_per_hour: must be >= 0"),
        ({"prices": {"spot": 1}}, "unknown key 'spot'"),
        ({"zones": [{"name": "e", "trace": "empty.json"}]}, "empty trace"),
        ({"zones": [{"name": "m", "trace": "missing.json"}]}, "not found"),
        ({"zones": []}, "non-empty list"),
        ({"zones": [{"name": "a", "trace": "a.json", "synthetic": {}}]}, "exactly one"),
        (
            {"zones": [{"name": "a", "trace": "a.json"}, {"name": "a", "trace": "a.json"}]},
            "duplicate",
        ),
        ({"tick_seconds": 30}, "finer"),
        ({"target": {"replicas": 0}}, "positive"),
        ({"policies": ["best"]}, "unknown"),
        ({"capacity": "some"}, "count"),
        ({"startup": {"provision_seconds": -5}}, "must be >= 0"),
    ],
)
def test_config_mistakes_are_one_line_config_errors(
    tmp_path: Path, over: dict[str, Any], match: str
) -> None:
    write_traces(tmp_path)
    with pytest.raises(ConfigError, match=match) as info:
        build_config(doc(**over), base_dir=tmp_path)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, UsageError)


def test_load_config_reads_yaml_and_traces_dir_flag_overrides(tmp_path: Path) -> None:
    traces = write_traces(tmp_path)
    cfg = tmp_path / "sub" / "fleet.yaml"
    cfg.parent.mkdir()
    cfg.write_text(yaml.safe_dump(doc(traces_dir="nowhere")))
    with pytest.raises(ConfigError, match="not found"):
        load_config(cfg)
    assert load_config(cfg, traces_dir=traces).capacity.shape == (2, 8)
    (tmp_path / "bad.yaml").write_text("zones: [")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(tmp_path / "bad.yaml")


def test_request_rate_target_becomes_replicas_per_tick(tmp_path: Path) -> None:
    write_traces(tmp_path)
    target = {"requests_per_second": [1, 5, 9], "replica_rps": 4, "tick_seconds": 240}
    plan = build_config(doc(target=target), base_dir=tmp_path)
    assert plan.target.tolist() == [1, 1, 2, 2, 3, 3, 1, 1]


def test_synthetic_zones_need_no_files(tmp_path: Path) -> None:
    zones = [
        {"name": "s1", "synthetic": {"mean_up_hours": 5, "hours": 24, "seed": 3}},
        {"name": "s2", "synthetic": {"mean_up_hours": 5, "hours": 24, "seed": 4}},
    ]
    plan = build_config(doc(zones=zones), base_dir=tmp_path)
    assert plan.capacity.shape == (2, 288)


def test_the_example_config_loads(traces_dir: Path) -> None:
    plan = load_config(REPO / "examples" / "fleet.yaml", traces_dir=traces_dir)
    assert plan.capacity.shape == (9, 20158)
    assert len(plan.policies) == 7
