"""bench/route: lost streams under spot preemptions without and with `spotstart route`.

Two replicas, each `spotstart guard --cloud gce` (a metadata emulator per replica life)
supervising bench/route/upstream.py (vLLM's completion shapes, a deterministic greedy "model",
``--tps`` tokens/s per stream). A closed loop of ``--clients`` streams with a long-tailed output
length (lognormal, clipped to 50..1500 tokens); every ``--every`` s a GCE preemption notice to
one replica, in turn; its guard drains (GCE's 30 s notice, ``--safety-margin``: a few seconds
for requests), stops it and exits; the replica comes back ``--replace-s`` later on the same
port (a spot node replaced). Run twice, same schedule:

- direct: clients round-robin over the guards (a refusal before the answer starts is sent to
  the next guard: a careful client; not lost);
- router: clients through `spotstart route` (the guards run ``--continue-grace``).

Lost: a request whose answer started but did not end with the tokens asked, ``[DONE]`` and one
finish_reason (or an error event / 5xx). Wrong: an answer complete but not the text the
deterministic model gives uninterrupted. Then the router's added time per token: one client,
streams of ``--overhead-tokens`` from an unpaced replica, straight to its guard vs through the
router, interleaved. Output: bench/results/route-<stamp>.json and route-latest.md."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).parent))

from upstream import next_id, prompt_ids, word  # noqa: E402

from spotstart.emulate.metadata import MetadataEmulator  # noqa: E402

RESULTS = ROOT / "bench" / "results"
MODEL = "tiny"  # tests/engines/kit.py's served name; the stand-in takes any
PY = sys.executable


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def expected_text(prompt: str, n: int) -> str:
    ctx = prompt_ids(prompt)
    out = []
    for _ in range(n):
        t = next_id(ctx)
        ctx.append(t)
        out.append(word(t))
    return "".join(out)


class Replica:
    """One replica slot: guard port and upstream port fixed; each life a new emulator."""

    def __init__(self, i: int, a: argparse.Namespace, logdir: Path, tps: float) -> None:
        self.i, self.a, self.tps = i, a, tps
        self.gport, self.uport = free_port(), free_port()
        self.logdir = logdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.emu: MetadataEmulator | None = None
        self.lives = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gport}"

    def start(self, continue_grace: bool) -> None:
        self.emu = MetadataEmulator("gce")
        self.emu.__enter__()
        self.lives += 1
        self.uport = free_port()  # a new node: the old server may still hold its port
        argv = [
            PY, "-m", "spotstart", "guard",
            "--upstream", f"http://127.0.0.1:{self.uport}",
            "--listen", self.address,
            "--cloud", "gce", "--metadata-url", self.emu.url,
            "--health-interval", "0.2",
            "--safety-margin", str(self.a.safety_margin),
            "--stop-grace", "2", "--min-grace", "1",
            "--replica-id", f"r{self.i}",
        ]  # fmt: skip
        if continue_grace:
            argv += ["--continue-grace", "1"]
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        if self.a.vllm_model:  # real vLLM (the engines venv), the kit's environment
            sys.path.insert(0, str(ROOT))
            from tests.engines import kit

            python, why = kit.engine_python_or_reason()
            if python is None:
                raise SystemExit(f"--vllm-model: {why}")
            argv += ["--", *kit.vllm_argv(python, self.a.vllm_model, self.uport, "--enforce-eager")]
            cache = kit.cache_env(Path(self.a.vllm_cache))
            env = kit.engine_env(cache) | {"PYTHONPATH": env["PYTHONPATH"]}
        else:
            argv += ["--", PY, str(Path(__file__).with_name("upstream.py"))]
            argv += ["--port", str(self.uport), "--tps", str(self.tps)]
        log = open(self.logdir / f"guard{self.i}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)

    def preempt(self) -> None:
        assert self.emu is not None
        self.emu.preempt()

    def stop(self) -> None:
        """The guard and the server it started (in a session of its own: killing the guard
        alone left it running)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        log = (self.logdir / f"guard{self.i}.log").read_text(errors="replace")
        for pid in re.findall(r"started server pid (\d+)", log)[-1:]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(pid), signal.SIGKILL)
        if self.emu is not None:
            self.emu.__exit__(None, None, None)
            self.emu = None


async def wait_ready(session: aiohttp.ClientSession, url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
            async with session.get(url) as r:
                if r.status == 200:
                    return
        await asyncio.sleep(0.1)
    raise TimeoutError(url)


@dataclass
class Outcome:
    asked: int
    tokens: int = 0
    done: bool = False
    finish: list[str] = field(default_factory=list)
    error: str | None = None
    started: bool = False
    refusals: int = 0
    text: str = ""
    ttft_s: float | None = None
    max_gap_s: float = 0.0
    total_s: float = 0.0
    usage_tokens: int | None = None  # the usage chunk's completion_tokens (vLLM holds back
    # the text of a split UTF-8 character: chunks are not tokens there)

    @property
    def complete(self) -> bool:
        tokens = self.tokens if self.usage_tokens is None else self.usage_tokens
        return (
            self.error is None and self.done and self.finish == ["length"]
            and tokens == self.asked
        )  # fmt: skip


async def one_stream(
    session: aiohttp.ClientSession, urls: list[str], prompt: str, n: int
) -> Outcome:
    out = Outcome(asked=n)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": n, "stream": True, "temperature": 0,
            "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.monotonic()
    for url in urls:
        try:
            async with session.post(url + "/v1/completions", json=body) as resp:
                if resp.status in (502, 503) or resp.status >= 500:
                    await resp.read()
                    out.refusals += 1
                    continue
                out.started = True
                last = time.monotonic()
                buf = b""
                async for piece in resp.content.iter_any():
                    buf += piece
                    while b"\n\n" in buf:
                        event, buf = buf.split(b"\n\n", 1)
                        for line in event.split(b"\n"):
                            if not line.startswith(b"data: "):
                                continue
                            if line[6:] == b"[DONE]":
                                out.done = True
                                continue
                            doc = json.loads(line[6:])
                            if "error" in doc:
                                out.error = "error event"
                                continue
                            usage = doc.get("usage")
                            if isinstance(usage, dict):
                                out.usage_tokens = usage.get("completion_tokens")
                            for ch in doc.get("choices", []):
                                if ch.get("text") or ch.get("token_ids"):
                                    now = time.monotonic()
                                    if out.ttft_s is None:
                                        out.ttft_s = now - t0
                                    else:
                                        out.max_gap_s = max(out.max_gap_s, now - last)
                                    last = now
                                    out.tokens += 1
                                    out.text += ch["text"]
                                if ch.get("finish_reason"):
                                    out.finish.append(ch["finish_reason"])
                out.total_s = time.monotonic() - t0
                return out
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            if out.started:
                out.error = repr(exc)[:200]
                out.total_s = time.monotonic() - t0
                return out
            out.refusals += 1
    out.error = out.error or "refused everywhere"
    return out


def length_mix(rng: random.Random, a: argparse.Namespace) -> int:
    return int(min(1500, max(50, rng.lognormvariate(math.log(a.median_tokens), a.sigma))))


async def load_phase(
    a: argparse.Namespace, mode: str, replicas: list[Replica], router_url: str | None
) -> dict[str, Any]:
    rng = random.Random(a.seed)
    outcomes: list[Outcome] = []
    wrong = 0
    stop_at = math.inf  # set once every replica is ready (vLLM takes a minute to start)
    timeout = aiohttp.ClientTimeout(total=600, sock_connect=2)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        for r in replicas:
            await wait_ready(s, f"http://{r.address}/readyz", a.ready_timeout)
        if router_url:
            for _ in range(100):
                async with s.get(router_url + "/metrics") as resp:
                    text = await resp.text()
                if text.count("spotstart_route_replica_ready{") >= 2 and all(
                    f'replica_ready{{replica="{r.address}"}} 1' in text for r in replicas
                ):
                    break
                await asyncio.sleep(0.1)
        counter = [0]
        stop_at = time.monotonic() + a.seconds

        async def client(c: int) -> None:
            nonlocal wrong
            while time.monotonic() < stop_at:
                n = length_mix(rng, a)
                prompt = f"user {c} asks question {counter[0]} about spot nodes and drains"
                counter[0] += 1
                if router_url:
                    urls = [router_url]
                else:
                    k = counter[0] % len(replicas)
                    urls = [f"http://{r.address}" for r in replicas[k:] + replicas[:k]]
                o = await one_stream(s, urls, prompt, n)
                outcomes.append(o)
                if o.complete and not a.vllm_model and o.text != expected_text(prompt, n):
                    wrong += 1
                if not o.started:
                    await asyncio.sleep(0.2)

        async def preemptions() -> list[dict[str, Any]]:
            events = []
            k = 0
            while time.monotonic() + a.every < stop_at:
                await asyncio.sleep(a.every)
                r = replicas[k % len(replicas)]
                k += 1
                t0 = time.monotonic()
                r.preempt()
                assert r.proc is not None
                while r.proc.poll() is None:  # noqa: ASYNC110 (a child process, polled)
                    await asyncio.sleep(0.1)
                gone = time.monotonic() - t0
                r.stop()
                await asyncio.sleep(a.replace_s)
                r.start(continue_grace=router_url is not None)
                await wait_ready(s, f"http://{r.address}/readyz", a.ready_timeout)
                events.append({"replica": r.i, "guard_exit_s": round(gone, 2),
                               "back_s": round(time.monotonic() - t0, 2)})  # fmt: skip
            return events

        pre = asyncio.create_task(preemptions())
        await asyncio.gather(*(client(c) for c in range(a.clients)))
        events = await pre
        router_metrics = ""
        if router_url:
            async with s.get(router_url + "/metrics") as resp:
                router_metrics = await resp.text()
    started = [o for o in outcomes if o.started]
    lost = [o for o in started if not o.complete]
    gaps = sorted(o.max_gap_s for o in started if o.complete)
    return {
        "mode": mode,
        "requests": len(outcomes),
        "started": len(started),
        "never_started": len(outcomes) - len(started),
        "lost": len(lost),
        "lost_tokens_asked": sorted(o.asked for o in lost),
        "wrong_text": wrong,
        "refusals_retried": sum(o.refusals for o in outcomes),
        "tokens_served": sum(o.tokens for o in started if o.complete),
        "max_gap_p50_s": _q(gaps, 0.5),
        "max_gap_p99_s": _q(gaps, 0.99),
        "preemptions": events,
        "router": _router_figures(router_metrics) if router_url else None,
    }


def _q(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 4)


def _router_figures(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    buckets: list[tuple[float, float]] = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        if name.startswith("spotstart_route_time_to_continue_seconds_bucket"):
            bound = name.split('le="')[1].split('"')[0]
            buckets.append((math.inf if bound == "+Inf" else float(bound), float(value)))
        elif name.endswith("_total") and name.startswith("spotstart_route_"):
            out[name] = float(value)
    total = buckets[-1][1] if buckets else 0
    for q in (0.5, 0.99):
        le = next((b for b, c in buckets if total and c >= q * total), None)
        out[f"time_to_continue_p{int(q * 100)}_le_s"] = le
    out["continuations_timed"] = total
    return out


async def overhead(a: argparse.Namespace, logdir: Path) -> dict[str, Any]:
    r = Replica(9, a, logdir, tps=0)
    r.start(continue_grace=True)
    rport = free_port()
    router = subprocess.Popen(  # noqa: ASYNC220 (started once, a bench)
        [PY, "-m", "spotstart", "route", "--listen", f"127.0.0.1:{rport}",
         "--replicas", r.address, "--poll-interval", "0.2"],
        env=dict(os.environ, PYTHONPATH=str(ROOT / "src")),
        stdout=open(logdir / "route-overhead.log", "ab"),  # noqa: SIM115, ASYNC230
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
            await wait_ready(s, f"http://{r.address}/readyz")
            await wait_ready(s, f"http://127.0.0.1:{rport}/readyz")
            await asyncio.sleep(1)
            per_tok: dict[str, list[float]] = {"direct": [], "router": []}
            ttft: dict[str, list[float]] = {"direct": [], "router": []}
            for i in range(a.overhead_repeats):
                for mode, url in (("direct", f"http://{r.address}"),
                                  ("router", f"http://127.0.0.1:{rport}")):  # fmt: skip
                    o = await one_stream(s, [url], f"overhead {i}", a.overhead_tokens)
                    assert o.complete, o
                    per_tok[mode].append(o.total_s / o.tokens)
                    ttft[mode].append(o.ttft_s or 0.0)
    finally:
        router.send_signal(signal.SIGKILL)
        router.wait(10)
        r.stop()
    med = {m: statistics.median(v) for m, v in per_tok.items()}
    return {
        "tokens_per_stream": a.overhead_tokens,
        "streams_each": a.overhead_repeats,
        "per_token_ms_direct": round(med["direct"] * 1e3, 4),
        "per_token_ms_router": round(med["router"] * 1e3, 4),
        "added_per_token_ms": round((med["router"] - med["direct"]) * 1e3, 4),
        "ttft_ms_direct": round(statistics.median(ttft["direct"]) * 1e3, 2),
        "ttft_ms_router": round(statistics.median(ttft["router"]) * 1e3, 2),
    }


async def amain(a: argparse.Namespace) -> dict[str, Any]:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logdir = Path(a.logs or f"/tmp/bench-route-{stamp}")
    logdir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240
    results: dict[str, Any] = {"args": vars(a) | {"logs": str(logdir)}, "phases": []}
    for mode in ("direct", "router"):
        replicas = [Replica(i, a, logdir, a.tps) for i in range(2)]
        router = None
        try:
            for r in replicas:
                r.start(continue_grace=mode == "router")
            router_url = None
            if mode == "router":
                rport = free_port()
                router = subprocess.Popen(  # noqa: ASYNC220 (started once, a bench)
                    [PY, "-m", "spotstart", "route", "--listen", f"127.0.0.1:{rport}",
                     "--replicas", ",".join(r.address for r in replicas),
                     "--poll-interval", "0.2", "--continue-timeout", "30"],
                    env=dict(os.environ, PYTHONPATH=str(ROOT / "src")),
                    stdout=open(logdir / "route.log", "ab"),  # noqa: SIM115, ASYNC230
                    stderr=subprocess.STDOUT,
                )  # fmt: skip
                router_url = f"http://127.0.0.1:{rport}"
                async with aiohttp.ClientSession() as s:
                    await wait_ready(s, router_url + "/livez")
            phase = await load_phase(a, mode, replicas, router_url)
            print(json.dumps(phase), flush=True)
            results["phases"].append(phase)
        finally:
            if router is not None:
                router.send_signal(signal.SIGKILL)
                router.wait(10)
            for r in replicas:
                r.stop()
    if a.overhead_repeats:
        results["overhead"] = await overhead(a, logdir)
        print(json.dumps(results["overhead"]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "route-vllm" if a.vllm_model else "route"
    (RESULTS / f"{name}-{stamp}.json").write_text(json.dumps(results, indent=1))
    (RESULTS / f"{name}-latest.md").write_text(markdown(results))
    return results


def markdown(res: dict[str, Any]) -> str:
    a = res["args"]
    engine = (
        f"real vLLM ({a['vllm_model']})"
        if a["vllm_model"]
        else f"the stand-in at {a['tps']} tokens/s per stream"
    )
    lines = [
        f"# bench/route ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"{a['clients']} clients, {a['seconds']} s per mode, a preemption every {a['every']} s "
        f"(replaced {a['replace_s']} s after its guard exits), {engine}, "
        f"lengths lognormal median {a['median_tokens']} sigma {a['sigma']} clipped 50..1500.",
        "",
        "| mode | requests | started | lost | wrong text | refusals retried | tokens served |"
        " max gap p50 / p99 (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in res["phases"]:
        lines.append(
            f"| {p['mode']} | {p['requests']} | {p['started']} | {p['lost']} | {p['wrong_text']} "
            f"| {p['refusals_retried']} | {p['tokens_served']} | {p['max_gap_p50_s']} / "
            f"{p['max_gap_p99_s']} |"
        )
    for p in res["phases"]:
        if p["router"]:
            lines += ["", "router: " + json.dumps(p["router"])]
        lines += [f"{p['mode']} preemptions: " + json.dumps(p["preemptions"])]
        lines += [f"{p['mode']} lost (tokens asked): {p['lost_tokens_asked']}"]
    if "overhead" in res:
        lines += ["", "overhead: " + json.dumps(res["overhead"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=90.0, help="per mode (90)")
    p.add_argument("--every", type=float, default=20.0, help="a preemption every S s (20)")
    p.add_argument("--replace-s", type=float, default=3.0, help="replica back S s after exit")
    p.add_argument("--tps", type=float, default=40.0, help="tokens/s per stream (40)")
    p.add_argument("--median-tokens", type=float, default=200.0)
    p.add_argument("--sigma", type=float, default=1.0)
    p.add_argument("--safety-margin", type=float, default=25.0, help="guard: of GCE's 30 s")
    p.add_argument("--overhead-tokens", type=int, default=500)
    p.add_argument("--overhead-repeats", type=int, default=10)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--vllm-model",
        default=None,
        metavar="DIR",
        help="real vLLM replicas (the engines venv, --enforce-eager) serving DIR, e.g. a model of "
        "tests/engines/make_model.py; --tps is then the engine's; texts are not checked",
    )
    p.add_argument("--vllm-cache", default="/tmp/bench-route-vllm-cache", metavar="DIR")
    p.add_argument("--ready-timeout", type=float, default=60.0, help="a replica's start (S)")
    p.add_argument("--logs", default=None)
    a = p.parse_args()
    asyncio.run(amain(a))


if __name__ == "__main__":
    main()
