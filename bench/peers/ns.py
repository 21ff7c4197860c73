"""bench/peers in network namespaces (`python bench/peers/run.py --netns`): N hosts, each a
namespace with its own address and tc-paced uplink and downlink (spotstart.emulate.netns),
the origin (the storage emulator) on the bridge behind its own paced uplink. Each host runs
what `spotstart k8s render` gives a pod with `peers: true`: a `serve-peers` sidecar on its
weights dir and `spotstart fetch --peers <every other host>`. The sidecars are all up before
the first arrival (a sidecar of a host not yet arrived serves an empty directory): on a real
fleet each node has its own CPUs, here 2 cores carry every host, and a Python process costs
~0.65 CPU-s to start. The fetches arrive --arrival-gap-s apart (spread = gap x (N - 1)).
Each run also records how busy this machine's CPUs were while it lasted (/proc/stat): a run
near 100% measures the 2 cores more than the design.

Two designs in the same run, on the same links and model: "new" = this checkout's code at
--new-rev (a git worktree, so half-edited files of the shared checkout are not measured), and
"today" = the code before issue 25, commit 46b2124 (a worktree too), each run with
PYTHONPATH at its src. Per run: origin bytes / model size, each node's ready time (from the
first arrival until its fetch process exited with the verified model), the last one vs one
node alone (N = 1, same links), and control bytes / data bytes (control: every /v1/inventory
request and answer the fetch processes sent and received, counted in their aiohttp client by
bench/peers/counted.py; data: the model bytes the fetches landed).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from spotstart.emulate.link import LinkConfig
from spotstart.emulate.netns import Host, HostNetwork
from spotstart.emulate.storage import StorageEmulator, StorageEmulatorOptions, env_for_gcs

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
RESULTS = REPO / "bench" / "results"
TODAY_REV = "46b2124"
BUCKET = "models"
PREFIX = "llm/"
PEER_PORT = 8471
TOKEN = "5f1e0c2b9a7d4e3f8a6b1c0d2e4f6a8b"
_RUNS = itertools.count()


def worktree(rev: str, path: Path) -> Path:
    """``path`` holding ``rev`` (a detached git worktree, made or moved there): its src."""
    want = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", rev], capture_output=True, text=True, check=True
    ).stdout.strip()
    if path.exists():
        have = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        if have != want:
            subprocess.run(["git", "-C", str(path), "checkout", "-q", "--detach", want], check=True)
    else:
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "-q", "--detach", str(path), want],
            check=True,
        )
    return path / "src"


class Node:
    """One host's sidecar and fetch, and what came of them."""

    def __init__(self, host: Host, dest: Path) -> None:
        self.host, self.dest = host, dest
        self.server: subprocess.Popen[str] | None = None
        self.fetch: subprocess.Popen[str] | None = None
        self.started = 0.0
        self.exited = 0.0
        self.out = self.err = ""

    def wait(self) -> None:
        assert self.fetch is not None
        self.out, self.err = self.fetch.communicate(timeout=900)
        self.exited = time.monotonic()


def run_fleet(
    net: HostNetwork,
    emu: StorageEmulator,
    work: Path,
    *,
    n: int,
    design: str,
    src: Path,
    gap_s: float,
    link_bytes_per_s: float,
    digests: dict[str, str],
) -> dict[str, Any]:
    tag = f"{design[0]}{next(_RUNS)}"
    token = work / "peer.token"
    token.write_text(TOKEN + "\n")
    os.chmod(token, 0o600)
    rate = link_bytes_per_s
    hosts = [
        net.add_host(f"{tag}n{i}", up_bytes_per_s=rate, down_bytes_per_s=rate) for i in range(n)
    ]
    env = {
        **os.environ,
        **env_for_gcs(emu.info),
        "PYTHONPATH": str(src),
        "SPOTSTART_NO_UPDATE_CHECK": "1",
    }
    env.pop("SPOTSTART_PEERS", None)
    nodes = [Node(h, work / f"node{i}") for i, h in enumerate(hosts)]
    waiters: list[threading.Thread] = []
    try:
        for node in nodes:
            node.dest.mkdir()
            if n > 1:
                serve = [sys.executable, "-P", "-m", "spotstart", "serve-peers", str(node.dest)]
                serve += ["--listen", f"{node.host.address}:{PEER_PORT}", "--json"]
                node.server = node.host.popen([*serve, "--peer-token-file", str(token)], env=env)
        for node in nodes:  # each sidecar prints its address once it listens
            if node.server is not None:
                assert node.server.stdout is not None
                if not node.server.stdout.readline():
                    raise RuntimeError(f"serve-peers on {node.host.name} did not start")
        emu.reset_stats()
        cpu0 = _cpu_times()
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        for i, node in enumerate(nodes):
            delay = t0 + i * gap_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            node.started = time.monotonic()
            argv = [sys.executable, "-P", str(HERE / "counted.py"), "fetch"]
            argv += [f"gs://{BUCKET}/{PREFIX}", str(node.dest), "--json"]
            if n > 1:
                others = [f"{h.address}:{PEER_PORT}" for h in hosts if h is not node.host]
                argv += ["--peers", ",".join(others), "--peer-token-file", str(token)]
            # as `k8s render` gives the fetch container: $POD_IP (the downward API), by which
            # the other nodes know this one (its sidecar listens there)
            node_env = {**env, "POD_IP": node.host.address}
            node_env["BENCH_CONTROL_OUT"] = str(work / f"control{i}.json")
            node.fetch = node.host.popen(argv, env=node_env)
            waiter = threading.Thread(target=node.wait, daemon=True)
            waiter.start()
            waiters.append(waiter)
        for waiter in waiters:
            waiter.join(timeout=900)
        failed = [
            f"node {i}: exit {node.fetch.returncode}: {node.err[-600:]}"
            for i, node in enumerate(nodes)
            if node.fetch is None or node.fetch.returncode != 0
        ]
        if failed:
            raise RuntimeError(f"{design} N={n}: " + "; ".join(failed))
        cpu1 = _cpu_times()
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        origin = int(emu.stats()["body_bytes_down"])
        reports = [json.loads(node.out) for node in nodes]
        control = [json.loads((work / f"control{i}.json").read_text()) for i in range(n)]
        wire = [node.host.link_bytes() for node in nodes]
    finally:
        for node in nodes:
            if node.server is not None and node.server.poll() is None:
                node.server.send_signal(signal.SIGTERM)
        for node in nodes:
            if node.server is not None:
                try:
                    node.server.communicate(timeout=20)
                except subprocess.TimeoutExpired:
                    node.server.kill()
        for host in hosts:
            net.remove_host(host.name)
    ru2 = resource.getrusage(resource.RUSAGE_CHILDREN)
    for node in nodes:  # every node holds the origin's bytes
        for key, digest in digests.items():
            got = hashlib.sha256((node.dest / key).read_bytes()).hexdigest()
            if got != digest:
                raise RuntimeError(f"{design} N={n}: {node.dest / key} differs from the origin")
    ready = [round(node.exited - t0, 2) for node in nodes]
    control_bytes = sum(c["inventory_answer_bytes"] + c["inventory_request_bytes"] for c in control)
    data_bytes = sum(int(r["bytes_transferred"]) for r in reports)
    return {
        "design": design,
        "nodes": n,
        "origin_body_bytes": origin,
        "ready_s": ready,
        "last_ready_s": max(ready),
        "arrivals_s": [round(node.started - t0, 2) for node in nodes],
        "spread_s": round(gap_s * (n - 1), 2),
        "fetch_cpu_s": round(ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime, 1),
        "sidecar_cpu_s": round(ru2.ru_utime + ru2.ru_stime - ru1.ru_utime - ru1.ru_stime, 1),
        "machine_cpu_s": round((cpu1[0] - cpu0[0]) / os.sysconf("SC_CLK_TCK"), 1),
        "cpu_busy": round(1 - (cpu1[1] - cpu0[1]) / max(1, cpu1[0] - cpu0[0]), 2),
        "bytes_from_peers": [int(r.get("bytes_from_peers", 0)) for r in reports],
        "peers_dropped": [r.get("peers_dropped", {}) for r in reports],
        "chunk_bytes": reports[0].get("chunk_bytes"),
        "streams": reports[0].get("concurrency_final"),
        "control_bytes": control_bytes,
        "inventory_answers": sum(c["inventory_answers"] for c in control),
        "inventory_not_modified": sum(c["inventory_not_modified"] for c in control),
        "answers_without_length": sum(c["answers_without_length"] for c in control),
        "peerset_control_bytes": (
            sum(c["peerset_control_bytes"] for c in control)
            if all(c["peerset_control_bytes"] is not None for c in control)
            else None
        ),
        "data_bytes": data_bytes,
        "control_x_data": round(control_bytes / data_bytes, 5) if data_bytes else None,
        "wire_sent_bytes": [w["sent"] for w in wire],
        "wire_received_bytes": [w["received"] for w in wire],
    }


def _cpu_times() -> tuple[int, int]:
    """(all, idle + iowait) jiffies of this machine's CPUs so far."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields), fields[3] + fields[4]


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true", help="smoke: N = 4, 32 MB, 1 rep")
    ap.add_argument(
        "--link-mbps", type=float, default=10, help="each host's up and down, MB/s (10)"
    )
    ap.add_argument("--arrival-gap-s", type=float, default=0.5, help="between two arrivals (0.5)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--new-rev", default="HEAD", help="the new design's commit (HEAD)")
    ap.add_argument("--designs", nargs="+", default=["new", "today"])
    ap.add_argument(
        "--handoff", type=Path, help="also write the N=8/16 figures here (for the simulation)"
    )


def main(args: argparse.Namespace) -> int:
    nodes: list[int] = args.nodes if args.nodes_given else [4, 8, 16]
    model_mb: int = args.model_mb if args.model_mb_given else 64
    reps: int = args.reps
    if args.quick:
        nodes, model_mb, reps = ([4] if not args.nodes_given else nodes), 32, 1
    srcs = {
        "new": worktree(args.new_rev, Path("/tmp/peers-new")),
        "today": worktree(TODAY_REV, Path("/tmp/peers-old")),
    }
    revs = {
        d: subprocess.run(
            ["git", "-C", str(p.parent), "log", "-1", "--format=%h %s"],
            capture_output=True,
            text=True,
        ).stdout.strip()[:100]
        for d, p in srcs.items()
    }
    link = args.link_mbps * 1e6
    args.origin_mbps = args.origin_mbps or 20.0
    origin_rate = args.origin_mbps * 1e6
    shard = (model_mb << 20) // 2
    rows: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-peers-ns-") as tmp,
        HostNetwork(origin_up_bytes_per_s=origin_rate) as net,
    ):
        work = Path(tmp)
        files = {
            "model-00001-of-00002.safetensors": os.urandom(shard),
            "model-00002-of-00002.safetensors": os.urandom(shard),
            "config.json": b'{"model_type": "llama"}',
        }
        digests = {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}
        model = sum(len(v) for v in files.values())
        opts = StorageEmulatorOptions(
            data_dir=work / "emu",
            # the origin's uplink is the tbf on the bridge; the emulator adds the first byte's
            # latency only
            link=LinkConfig(per_conn_bytes_per_s=None, first_byte_latency_s=0.03),
            buckets=(BUCKET,),
            host=net.origin_address,
        )
        with StorageEmulator(opts) as emu:
            emu.seed_gcs(BUCKET, {PREFIX + k: v for k, v in files.items()})
            del files
            count = 0
            for rep in range(reps):
                for n in [1, *nodes]:
                    for design in args.designs:
                        if n == 1 and design != args.designs[rep % len(args.designs)]:
                            continue  # one node alone: the origin only, the same for both
                        count += 1
                        run_dir = work / f"run{count}"
                        run_dir.mkdir()
                        row = run_fleet(
                            net,
                            emu,
                            run_dir,
                            n=n,
                            design=design if n > 1 else "alone",
                            src=srcs[design],
                            gap_s=args.arrival_gap_s,
                            link_bytes_per_s=link,
                            digests=digests,
                        )
                        row["rep"] = rep
                        row["origin_x_model"] = round(row["origin_body_bytes"] / model, 2)
                        rows.append(row)
                        print(
                            f"rep {rep} N={n} {row['design']}: origin {row['origin_x_model']}x "
                            f"the model, last ready {row['last_ready_s']} s, control/data "
                            f"{row['control_x_data']}, CPU-s fetches {row['fetch_cpu_s']} "
                            f"sidecars {row['sidecar_cpu_s']} machine busy {row['cpu_busy']}",
                            flush=True,
                        )
                        subprocess.run(["rm", "-rf", str(run_dir)], check=False)
    env = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "model_bytes": model,
        "model_mb": round(model / 1e6, 1),
        "arrival_gap_s": args.arrival_gap_s,
        "origin_up_mb_s": args.origin_mbps,
        "host_up_mb_s": args.link_mbps,
        "host_down_mb_s": args.link_mbps,
        "origin_first_byte_s": 0.03,
        "links": "veth pairs in network namespaces, tc tbf on both ends (kernel "
        f"{platform.release()}); the origin's uplink a tbf on the bridge",
        "shape": "each host: a serve-peers sidecar (all up before the first arrival) + fetch "
        "--peers <all others> with $POD_IP = its address (as k8s render) at its arrival; "
        "arrivals arrival_gap_s apart",
        "designs": {
            "new": f"{srcs['new']} at {revs['new']}",
            "today": f"{srcs['today']} at {revs['today']} (the code before issue 25)",
        },
        "control_bytes": "every /v1/inventory request and answer (heads + Content-Length "
        "bodies) the fetch processes sent and received, counted in their aiohttp client "
        "(bench/peers/counted.py); data bytes: the model bytes the fetches landed",
        "ready": "from the first arrival until a node's fetch process exited, bytes verified",
    }
    summary = summarize(rows, env)
    stamp = time.strftime("%Y%m%d-%H%M")
    RESULTS.mkdir(exist_ok=True)
    out = {"env": env, "summary": summary, "rows": rows}
    (RESULTS / f"peers-netns-{stamp}.json").write_text(json.dumps(out, indent=2))
    md = markdown(summary, env)
    (RESULTS / "peers-netns-latest.md").write_text(md)
    print(md)
    if args.handoff is not None:
        args.handoff.write_text(json.dumps(handoff(summary, rows, env), indent=2))
    return 0


def summarize(rows: list[dict[str, Any]], env: dict[str, Any]) -> list[dict[str, Any]]:
    alone = [r["last_ready_s"] for r in rows if r["design"] == "alone"]
    single = statistics.median(alone) if alone else None
    out: list[dict[str, Any]] = []
    keys = sorted({(r["nodes"], r["design"]) for r in rows if r["design"] != "alone"})
    for n, design in keys:
        group = [r for r in rows if r["nodes"] == n and r["design"] == design]
        last = round(statistics.median(r["last_ready_s"] for r in group), 2)
        out.append(
            {
                "nodes": n,
                "design": design,
                "runs": len(group),
                "origin_x_model": [r["origin_x_model"] for r in group],
                "origin_x_model_median": round(
                    statistics.median(r["origin_x_model"] for r in group), 2
                ),
                "last_ready_s": [r["last_ready_s"] for r in group],
                "last_ready_s_median": last,
                "single_node_s": single,
                "last_ready_x_single": round(last / single, 2) if single else None,
                "spread_s": group[0]["spread_s"],
                "goal_s": round(1.5 * single + group[0]["spread_s"], 2) if single else None,
                "cpu_busy": [r["cpu_busy"] for r in group],
                "control_x_data": [r["control_x_data"] for r in group],
                "control_x_data_median": statistics.median(r["control_x_data"] for r in group),
                "peerset_control_x_data_median": (
                    statistics.median(r["peerset_control_bytes"] / r["data_bytes"] for r in group)
                    if all(r["peerset_control_bytes"] is not None for r in group)
                    else None
                ),
                "from_peers_x_model": round(
                    statistics.median(sum(r["bytes_from_peers"]) for r in group)
                    / env["model_bytes"],
                    2,
                ),
            }
        )
    return out


def markdown(summary: list[dict[str, Any]], env: dict[str, Any]) -> str:
    single = summary[0]["single_node_s"] if summary else None
    lines = [
        f"# bench/peers --netns ({env['model_mb']} MB model; hosts in network namespaces, "
        f"{env['host_up_mb_s']:g} MB/s up and down each (tc tbf), origin {env['origin_up_mb_s']:g} "
        f"MB/s up; arrivals {env['arrival_gap_s']:g} s apart; {env['cpus']} CPUs shared by "
        "every host)",
        "",
        f"One node alone (origin only): {single} s (median). Goal: last ready <= 1.5 x that + "
        "the spread; origin <= 1.2x the model; control < 1% of data.",
        "",
        "| nodes | design | origin bytes / model | last node ready s | last / one alone "
        "| spread s | goal s | control / data | (PeerSet.control_bytes) | from peers / model "
        "| CPUs busy |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['nodes']} | {s['design']} | {s['origin_x_model_median']} "
            f"({', '.join(map(str, s['origin_x_model']))}) | {s['last_ready_s_median']} "
            f"({', '.join(map(str, s['last_ready_s']))}) | {s['last_ready_x_single']} | "
            f"{s['spread_s']} | {s['goal_s']} | {s['control_x_data_median'] * 100:.3f}% | "
            f"{_pct(s['peerset_control_x_data_median'])} | "
            f"{s['from_peers_x_model']} | {', '.join(f'{c:.0%}' for c in s['cpu_busy'])} |"
        )
    lines += [
        "",
        f"- new: {env['designs']['new']}",
        f"- today: {env['designs']['today']}",
        f"- control: {env['control_bytes']}; in brackets the new client's own "
        "PeerSet.control_bytes (inventory bytes received) where the version has it",
        f"- ready: {env['ready']}",
        f"- shape: {env['shape']}",
        "- medians of the runs, each run in brackets",
    ]
    return "\n".join(lines) + "\n"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.3f}%"


def handoff(
    summary: list[dict[str, Any]], rows: list[dict[str, Any]], env: dict[str, Any]
) -> dict[str, Any]:
    """The real runs in the shape bench/peers/sim.py --calibrate replays (medians per N and
    design; the runs themselves under "runs")."""
    out = []
    for s in summary:
        group = [r for r in rows if r["nodes"] == s["nodes"] and r["design"] == s["design"]]
        out.append(
            {
                "nodes": s["nodes"],
                "design": "swarm" if s["design"] == "new" else "today",
                "model_bytes": env["model_bytes"],
                "objects": 3,
                "chunk_bytes": group[0]["chunk_bytes"],
                "streams": group[0].get("streams"),
                "spread_s": s["spread_s"],
                "origin_rate": env["origin_up_mb_s"] * 1e6,
                "origin_conn_rate": None,
                "origin_rtt_s": env["origin_first_byte_s"],
                "downlink": env["host_down_mb_s"] * 1e6,
                "uplink": env["host_up_mb_s"] * 1e6,
                "serve_rate": None,
                "origin_x_model": s["origin_x_model_median"],
                "last_ready_s": s["last_ready_s_median"],
                "single_s": s["single_node_s"],
                "control_x_data": s["control_x_data_median"],
                "cpu_busy": s["cpu_busy"],
                "runs": len(group),
            }
        )
    return {
        "source": "bench/peers/run.py --netns (engineer netns): real fetch processes in "
        "network namespaces, tc-paced uplinks and downlinks; ready = from the first arrival "
        "until a node's fetch process exited (Python start-up included); single_s: one node "
        "alone on the same links, same measure",
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "env": env,
        "cpu_busy": "share of this machine's 2 CPUs busy during each run (/proc/stat); near "
        "100% the run measures CPU contention (every host shares 2 cores) more than the design",
        "rows": out,
        "runs": [r for r in rows if r["nodes"] in (1, 8, 16)],
    }
