"""`spotstart plan run|sweep` as a user runs it (the parser built here, as main() builds it)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]

from spotstart.cli import plan_cmd
from spotstart.fleet import ConfigError


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="spotstart")
    sub = parser.add_subparsers(dest="command", required=True)
    plan_cmd.add_parser(sub)
    args = parser.parse_args(argv)
    return int(args.run(args))


@pytest.fixture
def config(tmp_path: Path) -> Path:
    zones = [
        {
            "name": f"s{i}",
            "synthetic": {"mean_up_hours": 6, "mean_down_hours": 1, "hours": 48, "seed": i},
        }
        for i in range(3)
    ]
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "zones": zones,
                "target": {"replicas": 2},
                "policies": ["on_demand", "spothedge", "warm_hedge"],
            }
        )
    )
    return cfg


def test_plan_run_prints_json_and_writes_png_and_html(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png, page = tmp_path / "out.png", tmp_path / "out.html"
    assert (
        run_cli(
            [
                "plan",
                "run",
                "--config",
                str(config),
                "--json",
                "--plot",
                str(png),
                "--html",
                str(page),
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert [r["policy"] for r in out["runs"]] == ["on_demand", "spothedge", "warm_hedge"]
    assert out["runs"][0]["availability"] == 1.0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = page.read_text()
    assert "data:image/png;base64," in text and "warm_hedge" in text and "src='http" not in text


def test_plan_run_prints_a_table(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["plan", "run", "--config", str(config), "--policy", "on_demand"]) == 0
    assert "on_demand" in capsys.readouterr().out


def test_plan_sweep_covers_cold_starts_and_zone_counts(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "sweep.png"
    assert (
        run_cli(
            [
                "plan",
                "sweep",
                "--config",
                str(config),
                "--cold-starts",
                "30,1080",
                "--json",
                "--plot",
                str(png),
            ]
        )
        == 0
    )
    points = json.loads(capsys.readouterr().out)["points"]
    assert {(p["axis"], p["value"]) for p in points} == {
        ("cold_start_s", 30.0),
        ("cold_start_s", 1080.0),
        ("zones", 1),
        ("zones", 2),
        ("zones", 3),
    }
    assert png.exists()
    assert run_cli(["plan", "sweep", "--config", str(config), "--zones", "1,3"]) == 0
    assert "availability/cost vs zones" in capsys.readouterr().out


def test_unknown_policy_flag_is_a_config_error(config: Path) -> None:
    with pytest.raises(ConfigError, match="unknown"):
        run_cli(["plan", "run", "--config", str(config), "--policy", "cheapest"])


def test_importing_the_command_does_not_import_numpy() -> None:
    import subprocess
    import sys

    code = "import sys, spotstart.cli.plan_cmd; print('numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_plan_run_reports_every_policy_against_the_optimum(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(["plan", "run", "--config", str(config), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    opt = out["optimal"]
    assert opt["kind"] == "optimal" and opt["availability"] == 1.0
    for r in out["runs"]:
        assert r["x_optimal_cost"] == pytest.approx(r["cost"] / opt["cost"])
        assert r["availability_vs_best"] == pytest.approx(r["availability"] - 1.0)
        if r["availability"] == 1.0:
            assert r["x_optimal_cost"] >= 1.0 - 1e-9
    assert run_cli(["plan", "run", "--config", str(config)]) == 0
    text = capsys.readouterr().out
    assert "x opt" in text and "offline optimum" in text and "exact MILP" in text
    assert run_cli(["plan", "run", "--config", str(config), "--no-optimal", "--json"]) == 0
    assert "optimal" not in json.loads(capsys.readouterr().out)


def test_plan_run_out_of_sample_tunes_on_the_first_part_only(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["plan", "run", "--config", str(config), "--out-of-sample", "0.5", "--json"]
    assert run_cli(argv) == 0
    out = json.loads(capsys.readouterr().out)
    split = out["out_of_sample"]
    ticks = split["train_ticks"][1]
    assert split["train_ticks"] == [0, ticks] and split["test_ticks"][0] == ticks
    assert out["runs"][-1]["policy"] == "warm_hedge tuned"
    assert set(split["tuned_options"]) >= {"committed_replicas", "calm_hours", "pack"}
    test_hours = (split["test_ticks"][1] - ticks) * 300 / 3600
    assert out["runs"][0]["horizon_s"] == pytest.approx(test_hours * 3600)
    assert run_cli(argv[:-1]) == 0
    assert "out of sample" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--out-of-sample", "1.5"], "a share between 0 and 1"),
        (["--out-of-sample", "0.5", "--no-optimal"], "drop --no-optimal"),
        (["--optimal-time-limit", "0"], "must be positive"),
    ],
)
def test_plan_run_usage_errors(config: Path, extra: list[str], message: str) -> None:
    from spotstart.errors import UsageError

    with pytest.raises(UsageError, match=message):
        run_cli(["plan", "run", "--config", str(config), *extra])


def test_plan_sweep_gives_each_point_its_cost_over_the_optimum(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["plan", "sweep", "--config", str(config), "--cold-starts", "120", "--zones", "3"]
    assert run_cli([*argv, "--json"]) == 0
    points = json.loads(capsys.readouterr().out)["points"]
    assert points and all(p["x_optimal_cost"] > 0 for p in points)
    assert all(p["optimal_kind"] == "optimal" for p in points)
    assert run_cli(argv) == 0
    assert "x optimal" in capsys.readouterr().out


def test_an_optimum_not_found_in_time_leaves_the_policies_standing(
    config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from spotstart.fleet import sweep
    from spotstart.fleet.errors import OptimumNotFound

    def too_slow(*args: object, **kw: object) -> None:
        raise OptimumNotFound("no optimum or bound within 1 s (9 variables): time limit")

    monkeypatch.setattr(sweep, "plan_optimum", too_slow)
    assert run_cli(["plan", "run", "--config", str(config), "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert "optimal" not in out and len(out["runs"]) == 3
    assert "offline optimum left out: no optimum or bound within 1 s" in captured.err
    argv = ["plan", "sweep", "--config", str(config), "--cold-starts", "120", "--zones", "3"]
    assert run_cli(argv) == 0
    assert "x optimal cost" in capsys.readouterr().out
