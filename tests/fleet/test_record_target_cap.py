"""The target a plan keeps is capped (MAX_TARGET_REPLICAS, 10,000): a plan's time grows with
it (a fleet.yaml or a recorded guard log claiming 20,000 replicas ran 47 s, a million would run
for hours). Refused with exit 2 and one line, before any simulation or any file is written:
`plan run` (target.replicas, requests_per_second's peak), `plan record` (the most nodes ready
at once in hostile logs, or --target), a recording's fleet.yaml, and the controller's
--record-trace."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from spotstart.errors import UsageError
from spotstart.fleet.config import MAX_TARGET_REPLICAS, build_config
from spotstart.fleet.errors import ConfigError
from spotstart.fleet.record import TraceDirectory
from tests.fleet.test_plan_record import T0, cli, event

pytest.importorskip("yaml")


def plan(target: dict[str, Any]) -> dict[str, Any]:
    return {
        "capacity": "any",
        "tick_seconds": 60,
        "horizon_hours": 1,
        "target": target,
        "prices": {"spot_per_hour": 1.0, "on_demand_per_hour": 3.0},
        "zones": [{"name": "a", "synthetic": {"mean_up_hours": 1.0, "mean_down_hours": 0.1}}],
        "policies": ["on_demand"],
    }


def plan_run(tmp_path: Path, doc: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "fleet.yaml"
    config.write_text(yaml.safe_dump(doc))
    return subprocess.run(
        [sys.executable, "-m", "spotstart", "plan", "run", "--config", str(config), "--json",
         "--no-optimal"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_the_cap_itself_is_accepted_and_run(tmp_path: Path) -> None:
    cfg = build_config(plan({"replicas": MAX_TARGET_REPLICAS}), base_dir=tmp_path)
    assert int(cfg.target.max()) == MAX_TARGET_REPLICAS
    done = plan_run(tmp_path, plan({"replicas": 3}))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["runs"][0]["policy"] == "on_demand"


@pytest.mark.parametrize(
    ("target", "says"),
    [
        ({"replicas": MAX_TARGET_REPLICAS + 1}, "target.replicas: 10,001 replicas"),
        ({"replicas": 20_000}, "target.replicas: 20,000 replicas"),
        ({"replicas": 1e300}, "target.replicas"),
        ({"replicas": float("inf")}, "target.replicas: inf replicas"),  # was an OverflowError
        ({"requests_per_second": [1, 2_000_000], "replica_rps": 10}, "at its peak: 200,000"),
        ({"requests_per_second": [float("inf")]}, "at its peak: inf"),
    ],
)
def test_plan_run_refuses_a_target_over_the_cap_with_exit_2(
    tmp_path: Path, target: dict[str, Any], says: str
) -> None:
    with pytest.raises(ConfigError, match="a plan keeps 1 to 10,000"):
        build_config(plan(target), base_dir=tmp_path)
    done = plan_run(tmp_path, plan(target))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in done.stderr
    assert done.stdout == ""  # nothing simulated


def hosts_log(tmp_path: Path, n: int) -> Path:
    """One log with ``n`` nodes ready at once (a hostile or merged log)."""
    log = tmp_path / "n.jsonl"
    log.write_text(
        "".join(event("server-start", 0, 60, zone="a", host=f"n{i}") for i in range(n))
        + event("drain", 200, 230, zone="a", host="n0")
    )
    return log


def test_plan_record_refuses_logs_claiming_more_ready_nodes_than_the_cap(tmp_path: Path) -> None:
    out = tmp_path / "r"
    log = hosts_log(tmp_path, MAX_TARGET_REPLICAS + 1)
    with pytest.raises(UsageError, match="the most nodes ready at once is 10,001, over the 10,000"):
        cli("--events", str(log), "--out", str(out))
    assert not out.exists()
    with pytest.raises(UsageError, match="--target 20,000, over"):
        cli("--events", str(log), "--out", str(out), "--target", "20000")
    assert not out.exists()
    # a --target within the cap records those logs; plan reads what was written
    assert cli("--events", str(log), "--out", str(out), "--target", "50") == 0
    assert "target: {replicas: 50}" in (out / "fleet.yaml").read_text()


def test_a_recording_with_a_target_over_the_cap_is_refused_before_its_directory(
    tmp_path: Path,
) -> None:
    out = tmp_path / "rec"
    for kw in ({"target": 10_001}, {"assumed_nodes": 2**31 - 1}):  # assumed: the default target
        with pytest.raises(ConfigError, match="record target"):
            TraceDirectory.open(
                out, zones=["a"], gap_s=60, start_s=T0, source="t", **{"assumed_nodes": 1, **kw}
            )
        assert not out.exists()


def test_the_controller_refuses_to_record_a_target_over_the_cap(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "spotstart", "k8s", "controller", "--name", "llm",
         "--zones", "zone-a", "--target", "20000", "--kube-api", "http://127.0.0.1:9",
         "--record-trace", str(tmp_path / "rec")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "record target: 20,000 replicas" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "rec").exists()


def test_plan_record_usage_error_is_exit_2_from_the_cli(tmp_path: Path) -> None:
    log = hosts_log(tmp_path, 3)
    done = subprocess.run(
        [sys.executable, "-m", "spotstart", "plan", "record", "--events", str(log),
         "--out", str(tmp_path / "r"), "--target", "10001"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--target 10,001, over the 10,000 replicas a plan keeps" in done.stderr
