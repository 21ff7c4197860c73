"""The demo's second act: the whole cold-start story on this machine.

A Llama-shaped model generated into the emulated bucket; replica A (the example server in
``examples/tiny_llm_server.py`` behind ``spotstart guard``, its own GCE metadata server) cold
starts from object storage with ``spotstart.load`` and serves a closed-loop load (plain and
streaming requests); a preemption notice arrives; A drains while replica B starts and takes
the weights from A (``--serve-peers``/``--peers``); the load moves to B. At the end:
requests served and lost, each replica's phase timeline (PNG, HTML, Chrome trace), and what
such a cold start is worth on the shared 9-zone spot trace (`plan`)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
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

REPO = Path(__file__).resolve().parents[3]
SERVER = REPO / "examples" / "tiny_llm_server.py"
FLEET = REPO / "examples" / "fleet.yaml"
PROMPT = [1, 2, 3, 4]


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


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if _ready(url):
            return time.monotonic() - t0
        if proc.poll() is not None:
            raise SystemExit(f"demo: a replica exited with {proc.returncode} before it was ready")
        time.sleep(0.05)
    raise SystemExit(f"demo: a replica was not ready within {timeout_s:.0f}s")


def _make_checkpoint(out: Path, size: Size) -> int:
    spec = importlib.util.spec_from_file_location("tiny_llm_server", SERVER)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return int(mod.make_checkpoint(out, size.hidden, size.intermediate, size.layers, size.vocab))


class Replica:
    def __init__(
        self,
        name: str,
        work: Path,
        model_url: str,
        env: dict[str, str],
        events: Path,
        peers: str | None,
    ) -> None:
        from spotstart.emulate.metadata import MetadataEmulator

        self.name = name
        self.ready = False  # as a Service's endpoints see it: /readyz, polled
        self.metadata = MetadataEmulator("gce")  # each node its own metadata server
        self.metadata.__enter__()
        self.cache = work / name / "weights"
        self.peer_port = _free_port()
        self.port, upstream = _free_port(), _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [
            sys.executable,
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
            "--safety-margin",
            "2",
            # a preempted node lives on until its deadline: keep its peer server up a while
            # after the drain so the replacement can take the weights from it
            "--linger",
            "6",
            "--health-path",
            "/health",
            "--health-interval",
            "0.2",
            "--events",
            str(events),
            "--serve-peers",
            f"{self.cache}:127.0.0.1:{self.peer_port}",
            "--",
            sys.executable,
            str(SERVER),
            "--model",
            model_url,
            "--port",
            str(upstream),
            "--cache-dir",
            str(self.cache),
        ]
        if peers:
            argv += ["--peers", peers]
        self.cache.mkdir(parents=True, exist_ok=True)
        self.log = (work / f"{name}.log").open("wb")
        self.started = time.time()
        self.proc = subprocess.Popen(
            argv,
            env={**env, "POD_NAME": name, "SPOTSTART_EVENTS": str(events)},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

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


async def _clients(replicas: list[Replica], tally: Tally, stop: threading.Event, n: int) -> None:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=60)

    async def client(i: int) -> None:
        stream = i % 2 == 1
        # a fresh connection a request: a keep-alive one the guard closes while draining
        # would fail a request it never accepted
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            while not stop.is_set():
                body = {"tokens": [i + 1, *PROMPT], "max_tokens": 4, "stream": stream}
                sent = False
                for r in [r for r in replicas if r.ready]:  # a Service routes to ready pods
                    try:
                        async with session.post(r.url + "/generate", json=body) as resp:
                            if resp.status == 503:
                                tally.rejected += 1
                                continue  # draining or loading: the next replica
                            sent = True
                            raw = await resp.read()
                            ok = resp.status == 200 and (
                                raw.rstrip().endswith(b"data: [DONE]")
                                if stream
                                else len(json.loads(raw)["tokens"]) == 4
                            )
                            if not ok:
                                tally.lost.append(f"{r.name}: {resp.status} {raw[:80]!r}")
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
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while not stop.is_set():
                for r in list(replicas):
                    try:
                        async with session.get(r.url + "/readyz") as resp:
                            r.ready = resp.status == 200
                    except (aiohttp.ClientError, TimeoutError):
                        r.ready = False
                await asyncio.sleep(0.1)

    await asyncio.gather(endpoints(), *(client(i) for i in range(n)))


def _answer(url: str) -> list[int]:
    req = urllib.request.Request(
        url + "/generate",
        data=json.dumps({"tokens": PROMPT, "max_tokens": 4}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return [int(t) for t in json.loads(r.read())["tokens"]]


def _plan_line(cold_start_s: float) -> str:
    try:
        import yaml  # type: ignore[import-untyped,unused-ignore]  # the `plan` extra

        from spotstart.fleet.config import build_config
        from spotstart.fleet.sweep import sweep_cold_start
    except ImportError:
        return "(install spotstart[plan] for what this cold start is worth on a spot trace)"
    try:
        doc = yaml.safe_load(FLEET.read_text())
        doc["policies"] = ["warm_hedge"]
        plan = build_config(doc, base_dir=FLEET.parent, source=str(FLEET))
        fast, slow = sweep_cold_start(plan, [cold_start_s, 18 * 60])
    except Exception as exc:
        return f"(plan: {exc})"
    return (
        f"plan (9-zone AWS trace, 3 replicas, warm_hedge): with this {cold_start_s:.0f} s cold "
        f"start {fast.availability:.3%} available at {fast.cost_relative:.3f} of on-demand; "
        f"with the talk's 18 min, {slow.availability:.3%} at {slow.cost_relative:.3f}"
    )


def run_story(
    console: Console, work: Path, emu: Any, small: bool, serve_s: float
) -> dict[str, Any]:
    """Act 2 of `spotstart demo`; returns the JSON summary."""
    from spotstart import timeline

    if not SERVER.is_file():
        raise SystemExit(f"demo: {SERVER} is missing (run the demo from a clone of the repo)")
    size = SMALL if small else FULL
    ckpt = work / "llm-checkpoint"
    total = _make_checkpoint(ckpt, size)
    emu.seed_gcs("models", {f"llm/{p.name}": p for p in ckpt.iterdir()})
    url = "gs://models/llm/"
    console.print(
        f"8. a Llama-shaped model ({size.layers} layers, hidden {size.hidden}, vocab "
        f"{size.vocab}: {total / 1e6:.0f} MB of BF16 tensors) is at {url}"
    )
    env = {**os.environ, "STORAGE_EMULATOR_HOST": emu.gcs.endpoint}
    events = work / "events.jsonl"
    events.unlink(missing_ok=True)
    tally, stop = Tally(), threading.Event()
    replicas: list[Replica] = []
    a = Replica("replica-a", work, url, env, events, None)
    replicas.append(a)
    b: Replica | None = None
    try:
        console.print("9. replica A cold-starts behind `spotstart guard` (load from the bucket)")
        a_ready = _wait_ready(a.url, a.proc, 300)
        expected = _answer(a.url)
        console.print(f"   ready in {a_ready:.1f} s; tokens for {PROMPT}: {expected}")
        loop = threading.Thread(
            target=lambda: asyncio.run(_clients(replicas, tally, stop, 4)), daemon=True
        )
        loop.start()
        console.print(f"10. 4 clients (2 streaming) for {serve_s:g} s ...")
        time.sleep(serve_s)
        console.print(
            "11. GCE preemption notice on replica A's node; replica B starts, "
            "taking the weights from A"
        )
        a.metadata.preempt(in_s=0)
        b = Replica("replica-b", work, url, env, events, f"127.0.0.1:{a.peer_port}")
        replicas.append(b)
        b_ready = _wait_ready(b.url, b.proc, 300)
        console.print(f"   replica B ready in {b_ready:.1f} s")
        same = _answer(b.url) == expected
        code_a = a.proc.wait(timeout=60)
        time.sleep(min(serve_s, 3))
    finally:
        stop.set()
        time.sleep(0.5)
        code_a = a.stop()
        code_b = b.stop() if b is not None else -1
    phases = timeline.collect([events])
    out = work / "timeline"
    written = timeline.write_all(phases, out, "spotstart demo: two replicas, one preemption")
    cold = [p for p in phases if p.pod == "replica-b" and p.name == "server-start"]
    cold_s = cold[0].seconds if cold else b_ready
    summary = {
        "requests_served": tally.served,
        "requests_streamed": tally.streamed,
        "requests_lost": len(tally.lost),
        "lost": tally.lost[:5],
        "rejected_503_retried": tally.rejected,
        "served_by": tally.by_replica,
        "same_tokens_after_replacement": same,
        "replica_a_exit": code_a,
        "replica_b_exit": code_b,
        "replacement_cold_start_s": round(cold_s, 2),
        "timeline": {k: str(v) for k, v in written.items()},
        "phases": [
            {"pod": p.pod, "phase": p.name, "seconds": round(p.seconds, 2), "detail": p.detail}
            for p in phases
        ],
    }
    summary["plan"] = _plan_line(cold_s)
    return summary
