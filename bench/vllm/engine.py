"""One vLLM process tree, measured: launch, /health, first streamed token, its log's phases,
the peak memory of every process in the tree (sampled from /proc), then a clean stop.

Knows vLLM's log lines and the OpenAI streaming protocol; knows nothing of the contenders.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# vLLM's default log format stamps whole seconds; this config stamps milliseconds (UTC, ISO),
# and lets the Run:ai streamer's own INFO line ("Overall time to stream ...") through.
LOGGING_CONFIG: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "ms": {
            "format": "(%(processName)s pid=%(process)d) %(levelname)s "
            "%(asctime)s.%(msecs)03d [%(filename)s:%(lineno)d] %(message)s",
            "datefmt": "%Y-%m-%dT%H:%M:%S",
        }
    },
    "handlers": {
        "h": {
            "class": "logging.StreamHandler",
            "formatter": "ms",
            "level": "INFO",
            "stream": "ext://sys.stdout",
        }
    },
    "loggers": {
        "vllm": {"handlers": ["h"], "level": "INFO", "propagate": False},
        "runai_model_streamer": {"handlers": ["h"], "level": "INFO", "propagate": False},
    },
}

_STAMP = re.compile(r" (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}) \[[^\]]+\] (.*)$")

PROMPT = "the quick brown fox jumps over the lazy dog while spot instances come and go"


@contextlib.contextmanager
def engine_lock(path: Path | None) -> Iterator[float]:
    """flock(2) on ``path`` (as `flock FILE cmd` takes it): one vLLM at a time on the machine.
    Yields the seconds spent waiting for it."""
    if path is None:
        yield 0.0
        return
    t = time.monotonic()
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield time.monotonic() - t
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------- memory
def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def process_tree(root: int) -> list[int]:
    kids = _children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def _status_kb(pid: int, keys: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in keys:
                out[name] = int(rest.split()[0])
    return out


def _pss_kb(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


@dataclass
class TreeSampler:
    """Samples the RSS and PSS of every process under ``root`` every ``interval_s``; keeps the
    peak of the sums, and each process's own high-water mark (VmHWM, read until it exits)."""

    root: int
    interval_s: float = 0.25
    peak_rss_kb: int = 0
    peak_pss_kb: int = 0
    peak_procs: int = 0
    hwm_kb: dict[int, int] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)
    cpus: dict[int, str] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> TreeSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def sample(self) -> None:
        rss = pss = 0
        pids = process_tree(self.root)
        for pid in pids:
            st = _status_kb(pid, ("VmRSS", "VmHWM"))
            if not st:
                continue
            rss += st.get("VmRSS", 0)
            pss += _pss_kb(pid)
            self.hwm_kb[pid] = max(self.hwm_kb.get(pid, 0), st.get("VmHWM", 0))
            if pid not in self.names:
                with contextlib.suppress(OSError):
                    self.names[pid] = Path(f"/proc/{pid}/comm").read_text().strip()
            with contextlib.suppress(OSError):  # vLLM's CPU worker pins itself: when, to what
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("Cpus_allowed_list:"):
                        self.cpus[pid] = line.split(":", 1)[1].strip()
        self.peak_rss_kb = max(self.peak_rss_kb, rss)
        self.peak_pss_kb = max(self.peak_pss_kb, pss)
        self.peak_procs = max(self.peak_procs, len(pids))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self.sample()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def to_dict(self) -> dict[str, Any]:
        return {
            "peak_tree_rss_bytes": self.peak_rss_kb * 1024,
            "peak_tree_pss_bytes": self.peak_pss_kb * 1024,
            "sum_vmhwm_bytes": sum(self.hwm_kb.values()) * 1024,
            "processes": self.peak_procs,
            "vmhwm_by_process": {
                f"{self.names.get(p, '?')}[{p}]": kb * 1024 for p, kb in self.hwm_kb.items() if kb
            },
            "cpus_allowed_by_process": {
                f"{self.names.get(p, '?')}[{p}]": c for p, c in self.cpus.items()
            },
        }


# ------------------------------------------------------------------------------------- HTTP
def http_status(port: int, path: str, timeout_s: float = 2.0) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except OSError:
        return 0
    finally:
        conn.close()


@dataclass(frozen=True)
class Completion:
    status: int
    first_token_s: float  # request sent -> first streamed chunk with a token
    total_s: float  # request sent -> [DONE] (or the whole body)
    tokens: int
    finish_reason: str
    text: str


def complete(
    port: int, model: str, max_tokens: int, stream: bool = True, timeout_s: float = 120.0
) -> Completion:
    """One completion, timed with the first token as the client sees it (SSE)."""
    body = json.dumps(
        {
            "model": model,
            "prompt": PROMPT,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": stream,
        }
    ).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    t = time.perf_counter()
    first = 0.0
    tokens, finish, text = 0, "", []
    try:
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if not stream or resp.status != 200:
            data = resp.read()
            total = time.perf_counter() - t
            if resp.status == 200:
                doc = json.loads(data)
                choice = doc["choices"][0]
                return Completion(
                    200,
                    total,
                    total,
                    int(doc["usage"]["completion_tokens"]),
                    str(choice.get("finish_reason")),
                    choice.get("text", ""),
                )
            return Completion(resp.status, total, total, 0, data[:200].decode(errors="replace"), "")
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                break
            doc = json.loads(payload)
            for choice in doc.get("choices", []):
                if not first:
                    first = time.perf_counter() - t
                tokens += 1
                text.append(choice.get("text", ""))
                if choice.get("finish_reason"):
                    finish = str(choice["finish_reason"])
        return Completion(200, first, time.perf_counter() - t, tokens, finish, "".join(text))
    finally:
        conn.close()


# -------------------------------------------------------------------------------------- log
def _parse_stamp(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=UTC).timestamp()


def log_lines(path: Path) -> list[tuple[float, str]]:
    out = []
    with contextlib.suppress(OSError), path.open(encoding="utf-8", errors="replace") as f:
        for raw in f:
            m = _STAMP.search(raw.rstrip("\n"))
            if m:
                out.append((_parse_stamp(m.group(1)), m.group(2)))
    return out


_TOOK = re.compile(r"took ([0-9.]+) ?s")
_RUNAI = re.compile(r"Overall time to stream .*: ([0-9.]+)s")


def _loader_line(msg: str) -> bool:
    spotstart = msg.startswith("spotstart:") and " tensors, " in msg
    return spotstart or ("[RunAI Streamer]" in msg and "CPU ring" in msg)


def phases(path: Path, t0_wall: float) -> dict[str, Any]:
    """vLLM's start-up phases from its log, seconds. ``at_*``: since launch (t0_wall);
    the others: spans vLLM reports or that lie between two of its lines."""
    lines = log_lines(path)
    first: dict[str, float] = {}
    own: dict[str, float] = {}
    compile_hits = compile_misses = aot_failures = 0

    def mark(key: str, ts: float) -> None:
        first.setdefault(key, ts)

    for ts, msg in lines:
        if msg.startswith("vLLM server version"):
            mark("api_server", ts)
        elif msg.startswith("Initializing a V1 LLM engine"):
            mark("engine_core", ts)
        elif msg.startswith("Starting to load model"):
            mark("load_start", ts)
        elif msg.startswith("Warming up model for the compilation"):
            mark("warmup_start", ts)
        elif msg.startswith("Warming up done"):
            mark("warmup_done", ts)
        elif msg.startswith("Starting vLLM server on") or "Application startup complete" in msg:
            mark("api_up", ts)
        if msg.startswith("Loading weights took"):
            own.setdefault("weights_s", float(msg.split()[3]))
        elif "Overall time to stream" in msg and (m := _RUNAI.search(msg)):
            own.setdefault("weights_s", float(m.group(1)))
        elif msg.startswith("Initializing model took"):
            own.setdefault("init_model_s", float(msg.split()[3]))
        elif msg.startswith("init engine (profile, create kv cache, warmup model) took"):
            own.setdefault("init_engine_s", float(_TOOK.findall(msg)[-1]))
        elif "Initial profiling/warmup run took" in msg:
            own.setdefault("profiling_warmup_s", float(_TOOK.findall(msg)[-1]))
        elif "torch.compile took" in msg:
            own.setdefault("torch_compile_s", float(_TOOK.findall(msg)[-1]))
        elif "Dynamo bytecode transform time" in msg:
            own.setdefault("dynamo_s", float(msg.rsplit(":", 1)[1].split()[0]))
        elif _loader_line(msg):
            own.setdefault("loader_note", msg)  # type: ignore[arg-type]
        if "Directly load" in msg:
            compile_hits += 1
        elif "Compiling a graph for" in msg:
            compile_misses += 1
        elif "Compiling model again due to a load failure" in msg:
            aot_failures += 1
    out: dict[str, Any] = {f"at_{k}_s": round(v - t0_wall, 3) for k, v in first.items()}
    if "load_start" in first and "warmup_start" in first:
        out["model_load_s"] = round(first["warmup_start"] - first["load_start"], 3)
    if "warmup_start" in first and "warmup_done" in first:
        out["warmup_s"] = round(first["warmup_done"] - first["warmup_start"], 3)
    out.update(own)
    out["compile_cache"] = {
        "graphs_loaded": compile_hits,
        "graphs_compiled": compile_misses,
        "aot_load_failures": aot_failures,
    }
    return out


# ----------------------------------------------------------------------------------- launch
@dataclass
class VllmRun:
    ok: bool = False
    error: str = ""
    ready_s: float = 0.0  # since launch: /health 200
    first_token_s: float = 0.0  # since launch: first streamed token of the first request
    first_request: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    phases: dict[str, Any] = field(default_factory=dict)
    returncode: int | None = None
    log_tail: str = ""


def stop_group(proc: subprocess.Popen[bytes], grace_s: float = 20.0) -> int | None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace_s)
    # workers vLLM left behind are in its session: take them down too
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)
    return proc.returncode


def launch(
    argv: Sequence[str], env: Mapping[str, str], log: Path, cwd: Path
) -> subprocess.Popen[bytes]:
    with log.open("ab") as f:
        return subprocess.Popen(
            list(argv),
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def run_vllm(
    argv: Sequence[str],
    env: Mapping[str, str],
    port: int,
    log: Path,
    cwd: Path,
    t0: float,
    t0_wall: float,
    timeout_s: float,
    model: str = "tiny",
    keep: bool = False,
) -> tuple[VllmRun, subprocess.Popen[bytes] | None]:
    """Launch vLLM; poll /health; time one streamed completion; parse the log; stop it unless
    ``keep``. ``t0``/``t0_wall``: the contender's launch (perf_counter / wall clock), which may
    be before vLLM's (a fetch ran first)."""
    run = VllmRun()
    proc = launch(argv, env, log, cwd)
    sampler = TreeSampler(proc.pid).start()
    deadline = time.perf_counter() + timeout_s
    try:
        while True:
            if proc.poll() is not None:
                run.error = f"vLLM exited {proc.returncode} before /health answered"
                break
            if time.perf_counter() > deadline:
                run.error = f"not ready after {timeout_s:.0f} s"
                break
            if http_status(port, "/health") == 200:
                run.ready_s = time.perf_counter() - t0
                c = complete(port, model, 16)
                run.first_token_s = run.ready_s + c.first_token_s
                run.first_request = c.__dict__
                run.ok = c.status == 200 and c.tokens > 0
                if not run.ok:
                    run.error = f"first request: HTTP {c.status} {c.finish_reason}"
                break
            time.sleep(0.1)
    finally:
        sampler.stop()
        run.memory = sampler.to_dict()
        if not keep or not run.ok:
            run.returncode = stop_group(proc)
    time.sleep(0.2)
    run.phases = phases(log, t0_wall)
    with contextlib.suppress(OSError):
        run.log_tail = log.read_text(errors="replace")[-3000:]
    return run, (proc if keep and run.ok else None)
