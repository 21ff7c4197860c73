"""Red team of the quick CLI (issue 22): the lazy parser and lazy `import spotstart` against
a user's working directory that holds a `spotstart/` (or `vllm/`) package of someone else's
(a cloned repository, a shared /tmp): `python -m X` puts the working directory first on
sys.path, so every `sys.executable -m spotstart...` the demo starts would import it; and
optional extras missing: the documented message and exit code, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "src" / "spotstart" / "examples"

HOSTILE = """import os, sys
here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(here, "PWNED"), "a") as f:
    f.write(" ".join(sys.argv) + "\\n")
"""


def _hostile_cwd(tmp_path: Path) -> Path:
    cwd = tmp_path / "cloned-repo"
    for pkg in ("spotstart", "vllm"):
        (cwd / pkg).mkdir(parents=True)
        (cwd / pkg / "__init__.py").write_text(HOSTILE)
        (cwd / pkg / "__main__.py").write_text(HOSTILE)
    return cwd


def _spotstart(*args: str, cwd: Path, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    exe = Path(sys.executable).parent / "spotstart"
    return subprocess.run(
        [str(exe), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


@pytest.mark.timeout(600)
def test_the_quick_demo_run_from_a_directory_with_a_spotstart_package_never_imports_it(
    tmp_path: Path,
) -> None:
    cwd = _hostile_cwd(tmp_path)
    res = _spotstart("demo", "--quick", "--json", "--workdir", "work", cwd=cwd)
    assert not (cwd / "PWNED").exists(), (cwd / "PWNED").read_text()
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.parametrize(
    ("blocked", "args", "message", "code"),
    [
        ("torch", ["load", "file:///etc/hostname"], "pip install 'spotstart[torch]'", 2),
        (
            "yaml",
            ["k8s", "render", "--config", str(EXAMPLES / "fleet.yaml"), "--cloud", "gke"],
            "pip install 'spotstart[k8s]'",
            2,
        ),
        (
            "lightkube",
            ["k8s", "controller", "--config", str(EXAMPLES / "fleet.yaml")],
            "pip install 'spotstart[k8s]'",
            2,
        ),
        ("yaml", ["plan", "run", "--config", str(EXAMPLES / "fleet.yaml")], "spotstart[plan]", 2),
        ("numpy", ["plan", "run", "--config", str(EXAMPLES / "fleet.yaml")], "spotstart[plan]", 2),
    ],
)
def test_a_missing_extra_is_its_documented_message_and_exit_code(
    blocked: str, args: list[str], message: str, code: int, tmp_path: Path
) -> None:
    prog = (
        "import sys\n"
        f"sys.modules[{blocked!r}] = None  # `import {blocked}` raises ImportError\n"
        "from spotstart.cli.main import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", prog, *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == code, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert message in res.stderr.strip().splitlines()[-1]
