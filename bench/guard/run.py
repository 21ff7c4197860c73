"""bench/guard: preemptions injected under load through `spotstart guard`, and the proxy's cost.

    python bench/guard/run.py                          # 20 preemptions, 5 s throughput runs
    python bench/guard/run.py --trials 4 --seconds 2   # smoke: ~1 min

Reports requests lost (accepted but cut, truncated or errored: goal 0), notice-to-unready p50/p99
(goal < 50 ms; seen from outside by polling /readyz, and inside from the guard's histogram),
drain time (notice to guard exit), and proxy overhead on latency and throughput against calling
the upstream directly at its saturation point (goal < 5%). Writes
bench/results/guard-latest.md and guard-<YYYYmmdd-HHMM>.json. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"

# `spotstart guard ...`, through cli/main.py once it knows the command, else the module directly
GUARD_LAUNCH = """
import argparse, sys
from spotstart.cli import guard_cmd, main
parser = main.build_parser()
sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
if "guard" in sub.choices:
    sys.exit(main.main(["guard", *sys.argv[1:]]))
parser = argparse.ArgumentParser(prog="spotstart")
guard_cmd.add_parser(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(["guard", *sys.argv[1:]])
sys.exit(args.run(args))
"""


class Proc:
    def __init__(self, cmd: list[str]) -> None:
        self.popen = subprocess.Popen(
            cmd, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.lines: list[str] = []
        self.threads = [
            threading.Thread(target=self._pump, args=(s,), daemon=True)
            for s in (self.popen.stdout, self.popen.stderr)
        ]
        for t in self.threads:
            t.start()

    def _pump(self, stream: Any) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, needle: str, timeout_s: float = 20.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.popen.poll() is None:
            for line in list(self.lines):
                if needle in line:
                    return line
            time.sleep(0.01)
        raise RuntimeError(f"no {needle!r} within {timeout_s}s:\n" + "\n".join(self.lines))

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(timeout=10)
        for t in self.threads:
            t.join(timeout=5)


def start_upstream(slots: int, service_ms: float) -> tuple[Proc, str]:
    p = Proc(
        [
            sys.executable,
            str(ROOT / "bench/guard/upstream.py"),
            "--slots",
            str(slots),
            "--service-ms",
            str(service_ms),
        ]
    )
    port = p.wait_for("upstream listening on").rsplit(" ", 1)[1]
    return p, f"http://127.0.0.1:{port}"


def start_guard(upstream: str, *extra: str) -> tuple[Proc, str]:
    p = Proc(
        [
            sys.executable,
            "-c",
            GUARD_LAUNCH,
            "--upstream",
            upstream,
            "--listen",
            "127.0.0.1:0",
            *extra,
        ]
    )
    url = p.wait_for("guard listening on").split(" on ", 1)[1].split(" ")[0]
    return p, url


async def wait_ready(session: aiohttp.ClientSession, url: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            async with session.get(url + "/readyz") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.01)
    raise RuntimeError(f"{url} not ready within {timeout_s}s")


# -- proxy overhead ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadResult:
    target: str
    concurrency: int
    seconds: float
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def closed_loop(url: str, concurrency: int, seconds: float, target: str) -> LoadResult:
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        end = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal errors
            for _ in range(10_000_000):
                if time.monotonic() >= end:
                    return
                t0 = time.monotonic()
                try:
                    async with session.get(url + "/gen") as r:
                        await r.read()
                        ok = r.status == 200
                except aiohttp.ClientError:
                    ok = False
                if ok:
                    latencies.append(time.monotonic() - t0)
                else:
                    errors += 1

        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.monotonic() - t0
    return LoadResult(
        target,
        concurrency,
        wall,
        len(latencies),
        errors,
        len(latencies) / wall,
        pct(latencies, 0.5) * 1e3,
        pct(latencies, 0.99) * 1e3,
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used (Linux /proc): cost that contention cannot inflate."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def sequential_p50_ms(url: str, n: int = 300) -> float:
    """One client, one request at a time: the latency a hop adds without queueing."""
    lat: list[float] = []
    async with aiohttp.ClientSession() as s:
        for i in range(n + 20):
            t0 = time.perf_counter()
            async with s.get(url + "/gen") as r:
                await r.read()
            if i >= 20:  # warm-up: connections, caches
                lat.append(time.perf_counter() - t0)
    return statistics.median(lat) * 1e3


async def overhead(slots: int, service_ms: float, seconds: float, repeats: int) -> dict[str, Any]:
    upstream, up_url = start_upstream(slots, service_ms)
    guard, g_url = start_guard(up_url, "--cloud", "none")
    try:
        async with aiohttp.ClientSession() as s:
            await wait_ready(s, g_url)
        seq = {"direct": await sequential_p50_ms(up_url), "guard": await sequential_p50_ms(g_url)}
        runs: list[LoadResult] = []
        guard_cpu_s = 0.0
        for _ in range(repeats):  # interleaved: drift on a shared box hits both alike
            runs.append(await closed_loop(up_url, slots, seconds, "direct"))
            before = cpu_seconds(guard.popen.pid)
            runs.append(await closed_loop(g_url, slots, seconds, "guard"))
            guard_cpu_s += cpu_seconds(guard.popen.pid) - before
    finally:
        guard.popen.send_signal(signal.SIGTERM)
        guard.stop()
        upstream.stop()

    def best(target: str) -> LoadResult:
        return max((r for r in runs if r.target == target), key=lambda r: r.rps)

    d, g = best("direct"), best("guard")
    return {
        "service_ms": service_ms,
        "slots": slots,
        "direct": asdict(d),
        "guard": asdict(g),
        "throughput_overhead_pct": (1 - g.rps / d.rps) * 100,
        "p50_overhead_pct": (g.p50_ms / d.p50_ms - 1) * 100,
        "p50_added_ms": g.p50_ms - d.p50_ms,
        "sequential_p50_ms": seq,
        "sequential_added_ms": seq["guard"] - seq["direct"],
        "guard_cpu_us_per_request": guard_cpu_s
        / max(1, sum(r.requests + r.errors for r in runs if r.target == "guard"))
        * 1e6,
        "runs": [asdict(r) for r in runs],
    }


# -- preemptions under load ----------------------------------------------------------------------


@dataclass(frozen=True)
class Trial:
    index: int
    source: str
    accepted_ok: int
    rejected_503: int
    lost: int  # sent before the notice: connection errors, truncated bodies, other statuses
    refused_after_exit: int  # sent after the notice, when the guard had already exited
    streams_in_flight_at_notice: int
    notice_to_unready_ms: float  # injection -> first 503 on /readyz, seen from outside
    internal_unready_ms: float  # the guard's own histogram (watcher receipt -> unready)
    drain_s: float  # injection -> guard process gone
    exit_code: int | None


async def trial(index: int, up_url: str, clients: int, emu: Any) -> Trial:
    source = "gce" if emu is not None and index % 2 else "sigterm"
    extra = ["--cloud", "none"]
    if source == "gce":
        emu.reset()
        extra = ["--cloud", "gce", "--metadata-url", emu.url]
    guard, url = start_guard(
        up_url,
        *extra,
        "--health-interval",
        "0.2",
        "--safety-margin",
        "1",
        "--termination-window",
        "15",
        "--linger",
        "1",
    )
    notified = asyncio.Event()
    ok = rejected = lost = refused = 0
    in_flight_streams = 0
    streams_now = 0
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as probe:
            await wait_ready(probe, url)
            done = 0

            async def client(i: int, session: aiohttp.ClientSession) -> None:
                nonlocal ok, rejected, lost, refused, done, streams_now
                path = "/sse?n=10&gap=0.05" if i % 2 else "/gen"
                for _ in range(2000):
                    after = notified.is_set()
                    streams_now += i % 2
                    try:
                        async with session.get(url + path) as r:
                            body = await r.read()
                            if r.status == 503 and r.headers.get("Retry-After"):
                                rejected += 1
                            elif r.status == 200 and (
                                body.endswith(b"[DONE]\n\n") if i % 2 else body
                            ):
                                ok += 1
                            else:
                                lost += 1
                    except (aiohttp.ClientError, OSError):
                        if after:  # sent after the notice, found the guard gone: not accepted
                            refused += 1
                        else:
                            lost += 1
                    finally:
                        streams_now -= i % 2
                    done += 1
                    if after:
                        return

            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=connector) as session:
                load = asyncio.ensure_future(
                    asyncio.gather(*(client(i, session) for i in range(clients)))
                )
                for _ in range(5000):
                    if done >= 2 * clients and streams_now >= 2:
                        break
                    await asyncio.sleep(0.002)
                in_flight_streams = streams_now
                injected = time.monotonic()
                if source == "gce":
                    emu.preempt(in_s=0)
                else:
                    os.kill(guard.popen.pid, signal.SIGTERM)
                notified.set()
                unready_ms = float("nan")
                internal_ms = float("nan")
                for _ in range(5000):
                    async with probe.get(url + "/readyz") as r:
                        if r.status == 503:
                            unready_ms = (time.monotonic() - injected) * 1e3
                            break
                async with probe.get(url + "/spotstart/metrics") as r:
                    for line in (await r.text()).splitlines():
                        if line.startswith("spotstart_guard_notice_to_unready_seconds_sum"):
                            internal_ms = float(line.split()[1]) * 1e3
                await asyncio.wait_for(load, 30)
        code: int | None
        try:
            code = await asyncio.to_thread(guard.popen.wait, 20)
        except subprocess.TimeoutExpired:
            code = None
        drain_s = time.monotonic() - injected
    finally:
        guard.stop()
    return Trial(
        index,
        source,
        accepted_ok=ok,
        rejected_503=rejected,
        lost=lost,
        refused_after_exit=refused,
        streams_in_flight_at_notice=in_flight_streams,
        notice_to_unready_ms=unready_ms,
        internal_unready_ms=internal_ms,
        drain_s=drain_s,
        exit_code=code,
    )


# -- report --------------------------------------------------------------------------------------


def render(result: dict[str, Any]) -> str:
    t = result["trials"]
    s = result["summary"]
    lines = [
        "# bench/guard: preemptions under load",
        "",
        f"{result['when']} on {result['machine']}; {len(t)} preemptions "
        f"({s['by_source']}), {result['clients']} closed-loop clients (half SSE streams "
        "~0.5 s, half short requests), loopback only.",
        "",
        "| metric | value | goal |",
        "|---|---|---|",
        f"| requests lost (accepted, then cut/truncated/errored) | {s['lost']} "
        f"of {s['accepted_ok'] + s['lost']} | 0 |",
        f"| clean 503 + Retry-After after the notice | {s['rejected']} | all later requests |",
        f"| sent after the notice, guard already gone (refused) | {s['refused_after_exit']} | |",
        f"| notice-to-unready p50 / p99 (outside, /readyz) | {s['unready_p50_ms']:.1f} / "
        f"{s['unready_p99_ms']:.1f} ms | < 50 ms |",
        f"| notice-to-unready p50 / p99 (guard's histogram) | {s['internal_p50_ms']:.3f} / "
        f"{s['internal_p99_ms']:.3f} ms | |",
        f"| drain time (notice to guard exit) p50 / max | {s['drain_p50_s']:.2f} / "
        f"{s['drain_max_s']:.2f} s | < window - margin |",
        f"| guard exit codes | {s['exit_codes']} | all 0 |",
        "",
        "## Proxy overhead at the upstream's saturation point",
        "",
        "| upstream | direct rps | guard rps | throughput cost | direct p50 | guard p50 | "
        "p50 cost | p99 direct / guard | one client: added p50 | guard CPU / request |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for o in result["overhead"]:
        d, g = o["direct"], o["guard"]
        lines.append(
            f"| {o['slots']} slots x {o['service_ms']:g} ms | {d['rps']:.0f} | {g['rps']:.0f} | "
            f"{o['throughput_overhead_pct']:+.1f}% | {d['p50_ms']:.2f} ms | {g['p50_ms']:.2f} ms"
            f" | {o['p50_overhead_pct']:+.1f}% (+{o['p50_added_ms']:.2f} ms) | "
            f"{d['p99_ms']:.1f} / {g['p99_ms']:.1f} ms | +{o['sequential_added_ms']:.2f} ms | "
            f"{o['guard_cpu_us_per_request']:.0f} us |"
        )
    lines += [
        "",
        "Concurrency = the upstream's slots (its saturation point: throughput = slots / service "
        "time), best of the interleaved runs. The 20 ms and 0 ms rows are stress cases, not an "
        "inference server: the upstream, the guard and the load generator (all Python) then "
        "compete for the same CPU cores, so they measure the guard's CPU cost per request "
        "(about as much as the upstream's own) rather than the latency it adds.",
        "",
    ]
    return "\n".join(lines)


async def amain(a: argparse.Namespace) -> dict[str, Any]:
    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.1f} at the start (other work on the box)"
    )
    emu = None
    try:
        import spotstart.guard.watchers.detect  # noqa: F401
        from spotstart.emulate.metadata import MetadataEmulator

        emu = MetadataEmulator("gce").start()
    except ImportError:
        pass
    trials: list[Trial] = []
    upstream, up_url = start_upstream(a.slots, a.service_ms)
    try:
        for i in range(a.trials):
            tr = await trial(i, up_url, a.clients, emu)
            print(
                f"trial {i} ({tr.source}): {tr.accepted_ok} ok, {tr.rejected_503} rejected, "
                f"{tr.lost} lost, unready {tr.notice_to_unready_ms:.1f} ms, "
                f"drain {tr.drain_s:.2f}s, exit {tr.exit_code}",
                flush=True,
            )
            trials.append(tr)
    finally:
        upstream.stop()
        if emu is not None:
            emu.stop()
    over = []
    for service_ms in dict.fromkeys((a.service_ms, 20.0, 0.0)):
        over.append(await overhead(a.slots, service_ms, a.seconds, a.repeats))
        print(
            f"overhead at {service_ms} ms: {over[-1]['throughput_overhead_pct']:+.1f}% rps, "
            f"{over[-1]['p50_overhead_pct']:+.1f}% p50",
            flush=True,
        )
    unready = [t.notice_to_unready_ms for t in trials]
    internal = [t.internal_unready_ms for t in trials]
    drains = [t.drain_s for t in trials]
    summary = {
        "lost": sum(t.lost for t in trials),
        "accepted_ok": sum(t.accepted_ok for t in trials),
        "rejected": sum(t.rejected_503 for t in trials),
        "refused_after_exit": sum(t.refused_after_exit for t in trials),
        "by_source": ", ".join(
            f"{n} {src}"
            for src in ("sigterm", "gce")
            if (n := sum(t.source == src for t in trials))
        ),
        "unready_p50_ms": statistics.median(unready),
        "unready_p99_ms": pct(unready, 0.99),
        "internal_p50_ms": statistics.median(internal),
        "internal_p99_ms": pct(internal, 0.99),
        "drain_p50_s": statistics.median(drains),
        "drain_max_s": max(drains),
        "exit_codes": sorted({str(t.exit_code) for t in trials}),
    }
    return {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine,
        "clients": a.clients,
        "args": vars(a),
        "summary": summary,
        "trials": [asdict(t) for t in trials],
        "overhead": over,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--slots", type=int, default=16, help="upstream batch size (16)")
    p.add_argument(
        "--service-ms",
        type=float,
        default=100.0,
        help="upstream time per request (100: a short completion; real ones take seconds); "
        "20 and 0 ms rows are always added as CPU-bound stress cases",
    )
    p.add_argument("--seconds", type=float, default=5.0, help="per throughput run (5)")
    p.add_argument("--repeats", type=int, default=2, help="throughput runs per target (2)")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args()
    result = asyncio.run(amain(a))
    a.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M", time.gmtime())
    (a.out / f"guard-{stamp}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    md = render(result)
    (a.out / "guard-latest.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
