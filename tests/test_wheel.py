"""The package as a user gets it: `python -m build` (an sdist, then the wheel built from that
sdist, as PyPI would ship them), the wheel installed with its `demo` extra into a fresh venv
with no checkout on the path and no ../shared beside it, and `spotstart demo --quick` run
from it. Not for the package's behaviour itself: the rest of tests/ covers that from the
checkout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the CPU wheel CI installs (tests/setup.sh, README command 1): the same pin, the same pip
# configuration (index, find-links), so pip never pulls a CUDA build
TORCH = "torch==2.13.0"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout_s: float) -> str:
    res = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    assert res.returncode == 0, (
        f"{cmd[:4]} exit {res.returncode}\n{res.stdout[-3000:]}\n" + (res.stderr[-5000:])
    )
    return res.stdout


def _pip_cache_dir() -> str | None:
    """The main venv's pip cache, so the fresh venv takes the wheels it already downloaded."""
    res = subprocess.run(
        [sys.executable, "-m", "pip", "cache", "dir"], capture_output=True, text=True, check=False
    )
    return res.stdout.strip() or None if res.returncode == 0 else None


def _clean_env(venv: Path | None) -> dict[str, str]:
    """This process's environment without anything that points at the checkout or steers
    spotstart: no PYTHONPATH, no activated venv, no SPOTSTART_* settings."""
    drop = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SPOTSTART_")}
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and not _inside(Path(p), ROOT)]
    if venv is not None:
        path.insert(0, str(venv / "bin"))
    env["PATH"] = os.pathsep.join(path)
    cache = _pip_cache_dir()
    if cache:
        env["PIP_CACHE_DIR"] = cache
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
    except ValueError:
        return False
    return True


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    _run(
        [sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)],
        cwd=dist,
        env=_clean_env(None),
        timeout_s=600,
    )
    wheels = sorted(dist.glob("spotstart-*.whl"))
    assert len(wheels) == 1, sorted(p.name for p in dist.iterdir())
    return wheels[0]


def _tracked_package_files() -> list[str]:
    out = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "src/spotstart"],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        pytest.skip("not a git checkout: the tracked file list is unknown")
    return [line.removeprefix("src/") for line in out.stdout.splitlines() if line]


def test_the_wheel_holds_every_file_of_the_package_and_nothing_of_the_checkout(
    wheel: Path,
) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    tracked = _tracked_package_files()
    # package data the CLI reads at run time, named so a lost glob fails loudly
    for must in ("spotstart/py.typed", "spotstart/examples/fleet.yaml"):
        assert must in names, must
    assert {n for n in tracked if not n.endswith(".py")}, "no package data tracked at all?"
    missing = sorted(set(tracked) - names)
    assert not missing, f"tracked under src/spotstart but not in {wheel.name}: {missing}"
    # and nothing else of the checkout: no untracked file (a local secret beside the examples),
    # no stale module of an earlier build's build/lib or egg-info, no bytecode
    package = {n for n in names if n.startswith("spotstart/")}
    extra = sorted(package - set(tracked))
    assert not extra, f"in {wheel.name} but not tracked under src/spotstart: {extra}"
    tops = {n.split("/", 1)[0] for n in names}  # no tests/, bench/, examples/ at the top
    assert all(t == "spotstart" or t.endswith(".dist-info") for t in tops), tops
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "spotstart = spotstart.cli.main:main" in text


def test_the_wheel_alone_runs_the_quick_demo_with_no_checkout_beside_it(
    wheel: Path, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    home = tmp_path / "user"  # the working directory: nothing of the checkout, no ../shared
    home.mkdir()
    assert not (tmp_path / "shared").exists() and not (home.parent / "shared").exists()
    env = _clean_env(venv)
    _run([sys.executable, "-m", "venv", str(venv)], cwd=home, env=env, timeout_s=300)
    py = str(venv / "bin" / "python")
    _run(
        [py, "-m", "pip", "install", "-q", TORCH, f"{wheel}[demo]"],
        cwd=home,
        env=env,
        timeout_s=900,
    )
    where = _run(
        [py, "-c", "import spotstart, sys; print(spotstart.__file__); print(sys.path)"],
        cwd=home,
        env=env,
        timeout_s=60,
    ).splitlines()
    assert _inside(Path(where[0]), venv), where[0]  # the installed copy, not the checkout's src
    assert str(ROOT) not in where[1], where[1]

    out = subprocess.run(
        [str(venv / "bin" / "spotstart"), "demo", "--quick", "--json", "--workdir", "work"],
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-5000:]
    doc = json.loads(out.stdout)
    story = doc["story"]
    assert story["engine"] == "example"  # no vLLM in this venv: the example server, from the wheel
    assert story["requests_served"] > 0 and story["requests_lost"] == 0, story
    assert story["served_by"]["replica-a"] > 0 and story["served_by"]["replica-b"] > 0
    # the plan line: what this cold start is worth on a spot trace, with data the wheel found
    # on its own (not "(plan: trace file not found)")
    assert story["plan"].startswith("plan ("), story["plan"]
    assert "requests served" in out.stderr and "plan (" in out.stderr  # what a person reads
