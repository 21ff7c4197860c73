"""The demo's second act: the whole cold-start story on this machine.

A Llama-shaped model generated into the emulated bucket; replica A (vLLM with
``--load-format spotstart``, or the example server in ``examples/tiny_llm_server.py``, behind
``spotstart guard``, its own GCE metadata server) cold starts from object storage and serves
a closed-loop load (plain and streaming requests); a preemption notice arrives; A drains
while replica B starts and takes the weights from A (``--serve-peers``/``--peers``); the
load moves to B. At the end: requests served and lost, each replica's phase timeline (PNG,
HTML, Chrome trace), and what such a cold start is worth on the shared 9-zone spot trace
(`plan`). Which server, and how it is run and asked: :mod:`spotstart.cli.demo_engine`."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from spotstart.cli.demo_engine import DemoServer, VllmServer, weights_dir

# The example configs and server ship inside the package (a wheel holds them too).
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SERVER = EXAMPLES / "tiny_llm_server.py"
FLEET = EXAMPLES / "fleet.yaml"
# the same fleet on a synthetic trace fitted to the public one: no network, no data beside us
FLEET_FITTED = EXAMPLES / "fleet-fitted.yaml"


@dataclass(frozen=True)
class Size:
    hidden: int
    intermediate: int
    layers: int
    vocab: int


FULL = Size(768, 2048, 8, 32000)  # ~210 MB of BF16 tensors
SMALL = Size(256, 704, 2, 4096)  # for the test run: ~8 MB


@dataclass
class Tally:
    served: int = 0
    streamed: int = 0
    rejected: int = 0  # 503 while draining or loading: retried, not lost
    lost: list[str] = field(default_factory=list)
    by_replica: dict[str, int] = field(default_factory=dict)
    no_ready_s: float = 0.0  # while clients ran: no replica ready (the cold start, seen)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


# vLLM's prefix, "(EngineCore pid=7) INFO 12-06 14:31:02 [file.py:12] ", and the guard's,
# "spotstart guard: INFO "
_LOG_PREFIX = re.compile(
    r"^(?:\(\w+ pid=\d+\) )?(?:[A-Z]+ \d\d-\d\d [\d:.]+ \[[^\]]{0,120}\] |"
    r"spotstart guard: [A-Z]+ )?"
)


def _last_log_line(path: Path) -> str:
    """The last line of a replica's log, its prefix dropped: what the server is doing."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    return _LOG_PREFIX.sub("", lines[-1])[:90] if lines else ""


def _wait_ready(r: Replica, timeout_s: float, console: Console) -> float:
    """Seconds until the replica's guard says ready; its log's last line shown meanwhile
    (a spinner on a terminal, a line every 10 s otherwise: vLLM takes a minute or more)."""
    t0 = time.monotonic()
    status = console.status(f"{r.name} starting") if console.is_terminal else None
    said = t0
    try:
        if status is not None:
            status.start()
        while time.monotonic() - t0 < timeout_s:
            if _ready(r.url):
                return time.monotonic() - t0
            if r.proc.poll() is not None:
                raise SystemExit(
                    f"demo: {r.name} exited with {r.proc.returncode} before it was ready; "
                    f"its log: {r.log_path}\n  last line: {_last_log_line(r.log_path)}"
                )
            now = time.monotonic()
            if status is not None:
                status.update(f"{r.name} starting, {now - t0:.0f} s: {_last_log_line(r.log_path)}")
            elif now - said >= 10:
                said = now
                console.print(f"   ... {now - t0:.0f} s: {_last_log_line(r.log_path)}")
            # 20 polls a second while a fast server may be ready; then 5, to leave the CPU to
            # a slow one
            time.sleep(0.05 if now - t0 < 10 else 0.2)
    finally:
        if status is not None:
            status.stop()
    raise SystemExit(f"demo: {r.name} was not ready within {timeout_s:.0f}s; its log: {r.log_path}")


def _make_checkpoint(out: Path, size: Size) -> int:
    spec = importlib.util.spec_from_file_location("tiny_llm_server", SERVER)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return int(mod.make_checkpoint(out, size.hidden, size.intermediate, size.layers, size.vocab))


class Replica:
    """One node: its GCE metadata server, ``spotstart guard`` in front of the server, the
    guard's peer server over the replica's weight cache."""

    def __init__(
        self,
        name: str,
        work: Path,
        model_url: str,
        env: dict[str, str],
        events: Path,
        peers: str | None,
        server: DemoServer,
    ) -> None:
        from spotstart.emulate.metadata import MetadataEmulator

        self.name = name
        self.ready = False  # as a Service's endpoints see it: /readyz, polled
        self.held = False  # ready, but kept from clients a moment (the answer check)
        self.metadata = MetadataEmulator("gce")  # each node its own metadata server
        self.metadata.__enter__()
        replica_dir = work / name
        self.cache = weights_dir(replica_dir)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.peer_port = _free_port()
        self.port, upstream = _free_port(), _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**env, **server.env(), "POD_NAME": name, "SPOTSTART_EVENTS": str(events)}
        # the server under the guard (vLLM's `python -m vllm...`) neither: a `vllm/` or
        # `spotstart/` in the directory the demo runs from is no module of theirs (3.11+)
        env["PYTHONSAFEPATH"] = "1"
        self.created = time.monotonic()
        self.notes = server.prepare(replica_dir, model_url, env, peers)
        argv = [
            sys.executable,
            "-P",  # not the working directory's `spotstart/` (sys.path[0] of `-m`)
            "-m",
            "spotstart",
            "guard",
            "--upstream",
            f"http://127.0.0.1:{upstream}",
            "--listen",
            f"127.0.0.1:{self.port}",
            "--cloud",
            "gce",
            "--metadata-url",
            self.metadata.url,
            "--termination-window",
            "15",
            *server.guard_flags,
            "--health-path",
            "/health",
            "--health-interval",
            "0.2",
            "--events",
            str(events),
            "--serve-peers",
            f"{self.cache}:127.0.0.1:{self.peer_port}",
            "--",
            *server.argv(model_url, upstream, replica_dir, peers),
        ]
        self.log_path = work / f"{name}.log"
        self.log = self.log_path.open("wb")
        self.started = time.time()
        self.proc = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def stop(self, timeout_s: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.log.close()
        self.metadata.__exit__(None, None, None)
        return code


async def _clients(
    replicas: list[Replica], tally: Tally, stop: threading.Event, n: int, server: DemoServer
) -> None:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=120)

    async def client(i: int) -> None:
        stream = i % 2 == 1
        # a fresh connection a request: a keep-alive one the guard closes while draining
        # would fail a request it never accepted
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            while not stop.is_set():
                body = server.request(i, stream)
                sent = False
                # a Service routes to ready pods
                for r in [r for r in replicas if r.ready and not r.held]:
                    try:
                        async with session.post(r.url + server.path, json=body) as resp:
                            if resp.status == 503:
                                tally.rejected += 1
                                continue  # draining or loading: the next replica
                            sent = True
                            verdict = server.judge(resp.status, await resp.read(), stream)
                            if not verdict.served:
                                tally.lost.append(f"{r.name}: {verdict.why}")
                            else:
                                tally.served += 1
                                tally.streamed += stream
                                tally.by_replica[r.name] = tally.by_replica.get(r.name, 0) + 1
                            break
                    except aiohttp.ClientConnectorError:
                        continue  # not listening (gone, or not yet): not accepted
                    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                        tally.lost.append(f"{r.name}: {type(exc).__name__}: {exc}")
                        sent = True
                        break
                if not sent:
                    await asyncio.sleep(0.1)

    async def endpoints() -> None:
        """Readiness as kube-proxy learns it: each replica's /readyz, every 100 ms."""
        last = time.monotonic()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while not stop.is_set():
                for r in list(replicas):
                    try:
                        async with session.get(r.url + "/readyz") as resp:
                            r.ready = resp.status == 200
                    except (aiohttp.ClientError, TimeoutError):
                        r.ready = False
                now = time.monotonic()
                if not any(r.ready for r in replicas):
                    tally.no_ready_s += now - last
                last = now
                await asyncio.sleep(0.1)

    await asyncio.gather(endpoints(), *(client(i) for i in range(n)))


def _answer(url: str, server: DemoServer) -> str:
    req = urllib.request.Request(
        url + server.path,
        data=json.dumps(server.question()).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        return server.answer_of(r.read())


def _plan_line(cold_start_s: float, traces: str | None = None) -> str:
    """What this cold start is worth on the 9-zone AWS spot trace: the real one from
    ``traces`` (a folder or URL, ``--traces``), else the synthetic one fitted to it."""
    try:
        import yaml  # type: ignore[import-untyped,unused-ignore]  # the `plan` extra

        from spotstart.fleet.config import build_config
        from spotstart.fleet.sweep import sweep_cold_start
    except ImportError:
        return "(install spotstart[plan] for what this cold start is worth on a spot trace)"
    config = FLEET if traces else FLEET_FITTED
    try:
        doc = yaml.safe_load(config.read_text())
        doc["policies"] = ["warm_hedge"]
        plan = build_config(doc, base_dir=config.parent, traces_dir=traces, source=str(config))
        fast, slow = sweep_cold_start(plan, [cold_start_s, 18 * 60])
    except Exception as exc:
        return f"(plan: {exc})"
    which = (
        f"9-zone AWS trace aws-02-15-2023 from {traces}"
        if traces
        else "a synthetic 9-zone trace fitted to the public AWS one, aws-02-15-2023"
    )
    line = (
        f"plan ({which}, 3 replicas, warm_hedge): with this {cold_start_s:.0f} s cold "
        f"start {fast.availability:.3%} available at {fast.cost_relative:.3f} of on-demand; "
        f"with the talk's 18 min, {slow.availability:.3%} at {slow.cost_relative:.3f}"
    )
    if not traces:
        line += (
            "; on the real trace: `spotstart demo --traces URL` or `spotstart plan run "
            f"--config {FLEET}` (fetches it from GitHub; --traces-dir URL or folder for a copy)"
        )
    return line


def _model_files(ckpt: Path, size: Size, server: DemoServer) -> int:
    """The checkpoint (and for vLLM its config and tokenizer) in ``ckpt``; tensor bytes."""
    total = _make_checkpoint(ckpt, size)
    if isinstance(server, VllmServer):
        from spotstart.cli.demo_model import write_hf_files

        write_hf_files(
            ckpt, size.hidden, size.intermediate, size.layers, size.vocab, server.max_model_len
        )
    return total


_PEER_MB = re.compile(r"(\d+) MB from peers")
_PEER_BYTES = re.compile(r"(\d+) bytes from peers")
_LOADER_LINE = re.compile(r"spotstart: \d+ tensors, [^\n]{0,300}")


def _from_peers_mb(phases: list[Any]) -> dict[str, float]:
    """Per replica, the MB its fetch and load events say peers gave."""
    out: dict[str, float] = {}
    for p in phases:
        if p.source != "spotstart" or p.name not in ("fetch", "load"):
            continue
        mb = (m := _PEER_MB.search(p.detail)) and float(m[1])
        mb = mb or ((m := _PEER_BYTES.search(p.detail)) and int(m[1]) / 1e6) or 0.0
        out[p.pod] = round(out.get(p.pod, 0.0) + mb, 1)
    return out


def _loader_lines(replicas: list[Replica]) -> dict[str, str]:
    """The line ``--load-format spotstart`` logs in each vLLM: sources, MB, peak memory."""
    out = {}
    for r in replicas:
        try:
            found = _LOADER_LINE.findall(r.log_path.read_text("utf-8", errors="replace"))
        except OSError:
            continue
        if found:
            out[r.name] = found[-1].strip()
    return out


def _say_notes(console: Console, r: Replica) -> None:
    for note in r.notes:
        console.print(f"   {r.name}: {note}")


def _server_phases(replicas: list[Replica], year: int) -> list[Any]:
    """vLLM's own timing lines (load weights, init engine) from each replica's log."""
    from spotstart import timeline

    out = []
    for r in replicas:
        try:
            text = r.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        out += timeline.from_server_log(text, year, pod=r.name)
    return out


def run_story(
    console: Console,
    work: Path,
    emu: Any,
    small: bool,
    serve_s: float,
    server: DemoServer,
    traces: str | None = None,
) -> dict[str, Any]:
    """Act 2 of `spotstart demo`; returns the JSON summary. ``traces``: where the plan line
    reads the real spot trace (a folder or URL); None: the synthetic one fitted to it."""
    from spotstart import timeline

    if not SERVER.is_file():
        raise SystemExit(f"demo: {SERVER} is missing (reinstall spotstart: it ships there)")
    size = SMALL if small else FULL
    ckpt = work / "llm-checkpoint"
    total = _model_files(ckpt, size, server)
    emu.seed_gcs("models", {f"llm/{p.name}": p for p in ckpt.iterdir()})
    url = "gs://models/llm/"
    console.print(
        f"8. a Llama-shaped model ({size.layers} layers, hidden {size.hidden}, vocab "
        f"{size.vocab}: {total / 1e6:.0f} MB of BF16 tensors) is at {url}"
    )
    vllm = isinstance(server, VllmServer)
    env = {**os.environ, "STORAGE_EMULATOR_HOST": emu.gcs.endpoint}
    events = work / "events.jsonl"
    events.unlink(missing_ok=True)
    tally, stop = Tally(), threading.Event()
    replicas: list[Replica] = []
    how = (
        "vLLM, --load-format spotstart from the bucket; config and tokenizer fetched first"
        if vllm
        else "the example server, spotstart.load from the bucket"
    )
    console.print(f"9. replica A cold-starts behind `spotstart guard` ({how})")
    a = Replica("replica-a", work, url, env, events, None, server)
    replicas.append(a)
    b: Replica | None = None
    try:
        _say_notes(console, a)
        _wait_ready(a, server.ready_timeout_s, console)
        a_ready = time.monotonic() - a.created
        expected = _answer(a.url, server)
        console.print(f"   ready in {a_ready:.1f} s; its answer to the test prompt: {expected}")
        loop = threading.Thread(
            target=lambda: asyncio.run(_clients(replicas, tally, stop, 4, server)), daemon=True
        )
        loop.start()
        console.print(f"10. 4 clients (2 streaming) for {serve_s:g} s ...")
        time.sleep(serve_s)
        console.print(
            "11. GCE preemption notice on replica A's node; replica B starts, "
            "taking the weights from A"
            + (" (its vLLM with the compile caches A left: a warm start)" if vllm else "")
        )
        a.metadata.preempt(in_s=0)
        b = Replica("replica-b", work, url, env, events, f"127.0.0.1:{a.peer_port}", server)
        b.held = True  # asked the test prompt alone first: batching must not blur the check
        replicas.append(b)
        _say_notes(console, b)
        _wait_ready(b, server.ready_timeout_s, console)
        b_ready = time.monotonic() - b.created
        console.print(f"   replica B ready in {b_ready:.1f} s")
        same = _answer(b.url, server) == expected
        b.held = False
        code_a = a.proc.wait(timeout=60)
        time.sleep(min(serve_s, server.serve_after_s))
    finally:
        stop.set()
        time.sleep(0.5)
        code_a = a.stop()
        code_b = b.stop() if b is not None else -1
    phases = timeline.collect([events])
    if vllm:
        year = time.gmtime(a.started).tm_year
        phases = sorted(phases + _server_phases(replicas, year), key=lambda p: (p.start, p.end))
    out = work / "timeline"
    written = timeline.write_all(phases, out, "spotstart demo: two replicas, one preemption")
    cold_s = b_ready  # from the replacement's first step (its init fetches) to ready
    summary = {
        "engine": server.name,
        "requests_served": tally.served,
        "requests_streamed": tally.streamed,
        "requests_lost": len(tally.lost),
        "lost": tally.lost[:5],
        "rejected_503_retried": tally.rejected,
        "served_by": tally.by_replica,
        "seconds_without_a_ready_replica": round(tally.no_ready_s, 1),
        "same_answer_after_replacement": same,
        "weights_from_peers_mb": _from_peers_mb(phases),
        "replica_a_exit": code_a,
        "replica_b_exit": code_b,
        "replica_a_ready_s": round(a_ready, 2),
        "replica_b_ready_s": round(b_ready, 2),
        "replacement_cold_start_s": round(cold_s, 2),
        "timeline": {k: str(v) for k, v in written.items()},
        "phases": [
            {"pod": p.pod, "phase": p.name, "seconds": round(p.seconds, 2), "detail": p.detail}
            for p in phases
        ],
    }
    if isinstance(server, VllmServer):
        summary["engine_python"] = server.python
        summary["engine_cache"] = str(server.cache_root)
        summary["loader_log"] = _loader_lines(replicas)
    summary["plan"] = _plan_line(cold_s, traces)
    return summary
