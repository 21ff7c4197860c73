"""Peer fetch at fleet scale, on one machine: N nodes start a few seconds apart (replacements
after a zone loss), each with its own emulated NIC, the origin behind its own cap. Every node
runs what `spotstart k8s render` gives a pod with `peers: true`: a `serve-peers` sidecar on
its weights dir from the start, and `spotstart fetch --peers <every other node>`.

Reported for N = 1, 4, 8, without peers and with them two ways: peers' bytes proven by the
origin's MD5 recomputed over each whole file (no manifest), and by a chunk manifest
(`spotstart manifest`: SHA-256 per piece, checked as each peer chunk lands). Per run: bytes
the origin served (goal ~1x the model, not N x), the time from the first node's start until
the last node holds the verified model, and what verified it. Uplinks of serving nodes are
not capped (each node's downlink is); everything shares this machine's 2 cores, which the
table states.

    python bench/peers/run.py                  # 256 MB model, N = 1, 4, 8
    python bench/peers/run.py --model-mb 64 --nodes 1 4   # smoke

In network namespaces (real hosts, uplinks and downlinks paced with tc, today's design beside
the new one; needs root; see bench/peers/ns.py):

    python bench/peers/run.py --netns          # 64 MB model, N = 4, 8, 16, 2 reps
    python bench/peers/run.py --netns --quick  # smoke: N = 4, 32 MB
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ns  # bench/peers/ns.py (this directory is sys.path[0])

from spotstart.emulate.link import LinkConfig
from spotstart.emulate.proxy import LinkEmulator
from spotstart.emulate.storage import StorageEmulator, StorageEmulatorOptions, env_for_gcs

RESULTS = Path(__file__).resolve().parent.parent / "results"
MODES = ("origin", "md5", "manifest")
MODE_NAMES = {"origin": "no", "md5": "yes (origin's MD5)", "manifest": "yes (manifest)"}
BUCKET = "models"
PREFIX = "llm/"


def _spotstart(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "spotstart", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_fleet(
    emu: StorageEmulator,
    work: Path,
    n: int,
    mode: str,
    stagger_s: float,
    nic: LinkConfig,
) -> dict[str, Any]:
    base_env = {**os.environ, **env_for_gcs(emu.info)}
    origin_host, origin_port = emu.info["gcs"]["endpoint"].removeprefix("http://").split(":")
    dirs = [work / f"node{i}" for i in range(n)]
    for d in dirs:
        d.mkdir()
    links = [LinkEmulator(nic) for _ in range(n)]  # node i's NIC: all it downloads
    servers: list[subprocess.Popen[str]] = []
    fetches: list[subprocess.Popen[str]] = []
    peers = mode != "origin"
    try:
        serve_ports = []
        if peers:
            for d in dirs:
                proc = _spotstart(
                    "serve-peers", str(d), "--listen", "127.0.0.1:0", "--json", env=base_env
                )
                assert proc.stdout is not None
                serve_ports.append(int(json.loads(proc.stdout.readline())["listen"].split(":")[1]))
                servers.append(proc)
        emu.reset_stats()
        t0 = time.monotonic()
        ready: list[float] = [0.0] * n
        reports: list[dict[str, Any]] = [{}] * n
        started: list[float] = []
        for i in range(n):
            link = links[i]
            origin = link.open_proxy((origin_host, int(origin_port)), http=True, flavor="gcs")
            env = {
                **base_env,
                **env_for_gcs({"gcs": {"endpoint": f"http://127.0.0.1:{origin.port}"}}),
            }
            argv = ["fetch", f"gs://{BUCKET}/{PREFIX}", str(dirs[i]), "--json"]
            if peers:
                others = [
                    f"127.0.0.1:{link.open_proxy(('127.0.0.1', serve_ports[j]), http=True).port}"
                    for j in range(n)
                    if j != i
                ]
                if others:
                    argv += ["--peers", ",".join(others)]
            delay = t0 + i * stagger_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            started.append(time.monotonic() - t0)
            fetches.append(_spotstart(*argv, env=env))
        for i, proc in enumerate(fetches):
            out, err = proc.communicate(timeout=900)
            ready[i] = time.monotonic() - t0
            if proc.returncode != 0:
                raise RuntimeError(f"node {i}: exit {proc.returncode}: {err[-800:]}")
            reports[i] = json.loads(out)
        # a node's ready time: when its fetch exited (collected in order: use its own report)
        ready = [started[i] + float(reports[i]["seconds"]) for i in range(n)]
        stats = emu.stats()
        return {
            "nodes": n,
            "mode": mode,
            "origin_body_bytes": int(stats["body_bytes_down"]),
            "last_ready_s": round(max(ready), 2),
            "ready_s": [round(r, 2) for r in ready],
            "bytes_from_peers": [int(r.get("bytes_from_peers", 0)) for r in reports],
            "peers_dropped": [r.get("peers_dropped", {}) for r in reports],
            "verified": sorted({k for r in reports for k in (r.get("verified") or {})}),
        }
    finally:
        for proc in servers:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=20)
        for link in links:
            link.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-mb", type=int, help="256 (--netns: 64)")
    ap.add_argument("--nodes", type=int, nargs="+", help="1 4 8 (--netns: 4 8 16)")
    ap.add_argument("--stagger-s", type=float, default=2.0)
    ap.add_argument("--origin-mbps", type=float, help="origin's cap, all nodes (100; --netns 20)")
    ap.add_argument("--nic-mbps", type=float, default=200, help="each node's downlink")
    ap.add_argument("--netns", action="store_true", help="hosts in network namespaces")
    ns.add_args(ap)
    args = ap.parse_args()
    args.nodes_given, args.model_mb_given = args.nodes is not None, args.model_mb is not None
    if args.netns:
        return ns.main(args)
    args.nodes = args.nodes or [1, 4, 8]
    args.model_mb = args.model_mb or 256
    args.origin_mbps = args.origin_mbps or 100.0
    origin = LinkConfig(
        per_conn_bytes_per_s=50e6,
        aggregate_bytes_per_s=args.origin_mbps * 1e6,
        first_byte_latency_s=0.03,
    )
    nic = LinkConfig(
        per_conn_bytes_per_s=None,
        aggregate_bytes_per_s=args.nic_mbps * 1e6,
        first_byte_latency_s=0.0005,
    )
    shard = (args.model_mb << 20) // 2
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        work = Path(tmp)
        opts = StorageEmulatorOptions(data_dir=work / "emu", link=origin, buckets=(BUCKET,))
        with StorageEmulator(opts) as emu:
            emu.seed_gcs(
                BUCKET,
                {
                    f"{PREFIX}model-00001-of-00002.safetensors": os.urandom(shard),
                    f"{PREFIX}model-00002-of-00002.safetensors": os.urandom(shard),
                    f"{PREFIX}config.json": b'{"model_type": "llama"}',
                },
            )
            model = 2 * shard + 23
            for mode in MODES:
                if mode == "manifest":  # written by the model's owner, once, next to the model
                    made = _spotstart(
                        "manifest",
                        f"gs://{BUCKET}/{PREFIX}",
                        env={**os.environ, **env_for_gcs(emu.info)},
                    )
                    _, err = made.communicate(timeout=900)
                    if made.returncode != 0:
                        raise RuntimeError(f"spotstart manifest: exit {made.returncode}: {err}")
                for n in args.nodes:
                    if n == 1 and mode != "origin":
                        continue  # one node has no peer
                    run_dir = work / f"n{n}-{mode}"
                    run_dir.mkdir()
                    row = run_fleet(emu, run_dir, n, mode, args.stagger_s, nic)
                    row["origin_x_model"] = round(row["origin_body_bytes"] / model, 2)
                    rows.append(row)
                    print(
                        f"N={n} {mode}: origin {row['origin_x_model']}x the model, "
                        f"last node ready {row['last_ready_s']} s",
                        flush=True,
                    )
    rows.sort(key=lambda r: (r["nodes"], MODES.index(r["mode"])))
    env = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "model_mb": round(model / 1e6),
        "stagger_s": args.stagger_s,
        "origin_mb_s": args.origin_mbps,
        "nic_mb_s": args.nic_mbps,
    }
    stamp = time.strftime("%Y%m%d-%H%M")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"peers-{stamp}.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    lines = [
        f"# bench/peers ({env['model_mb']} MB model, nodes {args.stagger_s:g} s apart, origin "
        f"{args.origin_mbps:g} MB/s for all, {args.nic_mbps:g} MB/s NIC per node, "
        f"{os.cpu_count()} CPUs shared by every node)",
        "",
        "| nodes | peers | origin bytes / model | last node ready s | from peers per node MB "
        "| verified by |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        per = ", ".join(f"{b / 1e6:.0f}" for b in r["bytes_from_peers"])
        lines.append(
            f"| {r['nodes']} | {MODE_NAMES[r['mode']]} | {r['origin_x_model']} | "
            f"{r['last_ready_s']} | {per} | {', '.join(r['verified'])} |"
        )
    (RESULTS / "peers-latest.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
