"""The command starts light: `spotstart --version` and `--help` import no heavy dependency, a
file:// fetch no cloud SDK, and the lazy public API still resolves (issue 22: start-up was a
third of a 512 MB fetch). Each check runs a fresh interpreter and reads its ``sys.modules``;
nothing here times anything."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spotstart.cli import main as cli_main

# Imported by some subcommand, never by --version / --help: each costs tens of milliseconds or
# more (aiohttp ~150 ms with its TLS context, awscrt's native library ~45 ms, torch seconds).
HEAVY = (
    "aiohttp",
    "awscrt",
    "botocore",
    "google.auth",
    "obstore",
    "rich",
    "numpy",
    "torch",
    "yaml",
    "prometheus_client",
    "zstandard",
)
CLOUD_SDKS = ("botocore", "boto3", "google", "obstore", "azure")

# Runs `python -m spotstart ARGV...` inside a wrapper that prints, as JSON on the last line of
# stderr at exit, every module the run imported. The exit code and stdout are the command's.
_PROBE = """
import atexit, json, runpy, sys
atexit.register(lambda: print(json.dumps(sorted(sys.modules)), file=sys.stderr))
sys.argv = ["spotstart", *sys.argv[1:]]
runpy.run_module("spotstart", run_name="__main__", alter_sys=True)
"""


def _run(*argv: str, cwd: Path | None = None) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOTSTART_")}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )
    modules = set(json.loads(proc.stderr.strip().splitlines()[-1]))
    return proc, modules


def _heavy_in(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in names))


def test_version_imports_nothing_heavy() -> None:
    proc, modules = _run("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "spotstart 0.1.0"
    assert _heavy_in(modules, HEAVY) == []
    # no subcommand module either: they are what pulls the heavy ones
    commands = {m for m in modules if m.startswith("spotstart.cli.")} - {"spotstart.cli.main"}
    assert commands == set()
    assert "spotstart.fetch" not in modules


def test_help_lists_every_subcommand_and_imports_nothing_heavy() -> None:
    proc, modules = _run("--help")
    assert proc.returncode == 0, proc.stderr
    for name, (_, help_line) in cli_main.COMMANDS.items():
        assert name in proc.stdout
        assert help_line.split()[0] in proc.stdout
    assert "exit codes:" in proc.stdout
    assert _heavy_in(modules, HEAVY) == []


def test_an_unknown_subcommand_is_a_usage_error_listing_the_real_ones() -> None:
    proc, modules = _run("fecth")
    assert proc.returncode == 2
    assert "invalid choice: 'fecth'" in proc.stderr
    assert "fetch" in proc.stderr.split("invalid choice")[1]
    assert _heavy_in(modules, HEAVY) == []


def test_a_subcommand_help_is_its_own_and_imports_only_its_module() -> None:
    proc, modules = _run("plan", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage: spotstart plan" in proc.stdout
    assert "spotstart.cli.plan_cmd" in modules
    assert "spotstart.cli.fetch_cmd" not in modules
    assert "aiohttp" not in modules


def test_the_stand_ins_say_what_the_subcommands_say() -> None:
    """`--help` shows COMMANDS' help lines without importing the modules: they must be the
    ones each module registers, and every registered subcommand must be in COMMANDS."""

    def helps(parser: argparse.ArgumentParser) -> dict[str, str | None]:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return {c.dest: c.help for c in sub._choices_actions}

    full = helps(cli_main.build_parser())
    assert full == {name: help_line for name, (_, help_line) in cli_main.COMMANDS.items()}
    assert helps(cli_main.build_parser(only=None)) == full
    for name in cli_main.COMMANDS:
        assert helps(cli_main.build_parser(only=name)) == full


def test_fetch_of_a_local_file_imports_no_cloud_sdk(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(100_000))
    dest = tmp_path / "dest"
    proc, modules = _run("fetch", f"file://{src}/", str(dest), "--json")
    assert proc.returncode == 0, proc.stderr
    assert (dest / "a.bin").read_bytes() == (src / "a.bin").read_bytes()
    assert json.loads(proc.stdout.strip().splitlines()[-1])["files_fetched"] == 1
    assert _heavy_in(modules, CLOUD_SDKS) == []
    # --json output is for machines: no rich, and no peer server (aiohttp.web) unless serving
    assert _heavy_in(modules, ("rich", "spotstart.fetch.peer_server", "aiohttp.web")) == []


def test_errors_still_map_to_their_exit_codes_without_rich(tmp_path: Path) -> None:
    proc, modules = _run("fetch", f"file://{tmp_path}/missing/", str(tmp_path / "d"), "--json")
    assert proc.returncode == 3, proc.stderr
    assert "spotstart: error:" in proc.stderr
    assert "rich" not in modules  # stderr is a pipe here: plain text, no colour


@pytest.mark.parametrize("name", ["fetch", "FetchConfig", "SpotstartError", "load", "iter_tensors"])
def test_the_lazy_public_api_resolves_to_the_documented_objects(name: str) -> None:
    code = (
        "import sys, spotstart\n"
        "assert 'aiohttp' not in sys.modules and 'torch' not in sys.modules\n"
        f"obj = getattr(spotstart, {name!r})\n"
        "import spotstart.fetch.engine\n"  # a submodule import must not shadow spotstart.fetch
        f"assert getattr(spotstart, {name!r}) is obj\n"
        "assert callable(spotstart.fetch)\n"
        "assert spotstart.fetch.__module__ == 'spotstart.fetch.engine'\n"
        "print(obj.__module__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith("spotstart.")


def test_the_fetch_package_imported_first_leaves_spotstart_fetch_the_function() -> None:
    code = (
        "import spotstart.fetch.config\n"
        "import spotstart\n"
        "from spotstart import fetch\n"
        "assert callable(fetch) and spotstart.fetch is fetch, spotstart.fetch\n"
        "assert sorted(set(dir(spotstart)) & set(spotstart.__all__)) == spotstart.__all__\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
