"""Which Kubernetes client the controller uses, measured: every candidate lists and watches the
same pods from the same kmock server (a real HTTP server on 127.0.0.1, in its own process), each
in a fresh interpreter, in one run.

    python bench/k8s/clients.py --pods 2000 --repeats 3

Per client: import time and RSS after import, list time (one LIST of every pod, parsed into the
client's objects), watch time (the same pods as ADDED events on one stream), and the packages it
pulls in beyond ours. Writes bench/results/k8s-clients-<stamp>.json and k8s-clients-latest.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"

SERVER = textwrap.dedent(
    """
    import asyncio, sys
    from kmock import KubernetesEmulator, Server
    from kmock._internal import parsing

    # kmock takes only watch=true; the API server (Go strconv.ParseBool) also takes True,
    # which is what kubernetes_asyncio sends
    _guess = parsing.guess_k8s
    def guess(k8s, method, query):
        if query.get("watch") == "True":
            query = {**query, "watch": "true"}
        return _guess(k8s, method, query)
    parsing.guess_k8s = guess

    async def main(n):
        async with KubernetesEmulator() as api, Server(api) as server:
            for i in range(n):
                name = f"llm-spot-{i:05d}"
                api.objects["v1/pods", "serving", name] = {
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": name, "namespace": "serving",
                                 "labels": {"app": "llm", "spotstart.dev/kind": "spot"},
                                 "annotations": {"spotstart.dev/notice": "none"}},
                    "spec": {"nodeName": f"node-{i}", "containers": [
                        {"name": "server", "image": "ghcr.io/x/vllm:1", "args": ["serve"] * 8}]},
                    "status": {"phase": "Running", "conditions": [
                        {"type": "Ready", "status": "True",
                         "lastTransitionTime": "2026-12-01T10:00:00Z"}]},
                }
            print(server.url, flush=True)
            await asyncio.Event().wait()

    asyncio.run(main(int(sys.argv[1])))
    """
)

CLIENTS: dict[str, str] = {
    "kubernetes_asyncio": textwrap.dedent(
        """
        t0 = time.perf_counter()
        from kubernetes_asyncio import client, watch
        import_s = time.perf_counter() - t0
        rss_import = rss()

        async def run():
            cfg = client.Configuration(host=URL)
            async with client.ApiClient(cfg) as api:
                v1 = client.CoreV1Api(api)
                t = time.perf_counter()
                pods = await v1.list_namespaced_pod("serving")
                list_s = time.perf_counter() - t
                assert len(pods.items) == N, len(pods.items)
                t = time.perf_counter()
                n = 0
                w = watch.Watch()
                async for ev in w.stream(v1.list_namespaced_pod, "serving"):
                    n += 1
                    if n == N:
                        break
                w.stop()
                return list_s, time.perf_counter() - t
        """
    ),
    "lightkube": textwrap.dedent(
        """
        t0 = time.perf_counter()
        from lightkube import AsyncClient, KubeConfig
        from lightkube.config.kubeconfig import Cluster, Context, User
        from lightkube.resources.core_v1 import Pod
        import_s = time.perf_counter() - t0
        rss_import = rss()

        async def run():
            cfg = KubeConfig(
                clusters={"c": Cluster(server=URL)}, users={"u": User()},
                contexts={"x": Context(cluster="c", user="u")}, current_context="x")
            c = AsyncClient(cfg)
            t = time.perf_counter()
            pods = [p async for p in c.list(Pod, namespace="serving")]
            list_s = time.perf_counter() - t
            assert len(pods) == N, len(pods)
            t = time.perf_counter()
            n = 0
            async for op, obj in c.watch(Pod, namespace="serving"):
                n += 1
                if n == N:
                    break
            await c.close()
            return list_s, time.perf_counter() - t
        """
    ),
    "kubernetes (sync)": textwrap.dedent(
        """
        t0 = time.perf_counter()
        from kubernetes import client, watch
        import_s = time.perf_counter() - t0
        rss_import = rss()

        async def run():
            cfg = client.Configuration(host=URL)
            v1 = client.CoreV1Api(client.ApiClient(cfg))
            t = time.perf_counter()
            pods = v1.list_namespaced_pod("serving")
            list_s = time.perf_counter() - t
            assert len(pods.items) == N, len(pods.items)
            t = time.perf_counter()
            n = 0
            w = watch.Watch()
            for ev in w.stream(v1.list_namespaced_pod, "serving"):
                n += 1
                if n == N:
                    break
            w.stop()
            return list_s, time.perf_counter() - t
        """
    ),
}

WORKER = """
import asyncio, json, resource, sys, time
URL, N = sys.argv[1], int(sys.argv[2])
def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
base = rss()
{body}
list_s, watch_s = asyncio.run(run())
print(json.dumps({{"import_s": import_s, "rss_import_mb": rss_import - base,
                  "list_s": list_s, "watch_s": watch_s, "rss_peak_mb": rss() - base}}))
"""


def measure(name: str, url: str, pods: int) -> dict[str, float] | str:
    code = WORKER.format(body=textwrap.indent(CLIENTS[name], ""))
    proc = subprocess.run(
        [sys.executable, "-c", code, url, str(pods)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if proc.returncode != 0:
        return (proc.stderr.strip().splitlines() or ["failed"])[-1][:160]
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pods", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(args.pods)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        url = server.stdout.readline().strip()
        rows: dict[str, dict[str, float] | str] = {}
        for name in CLIENTS:
            runs = [measure(name, url, args.pods) for _ in range(args.repeats)]
            good = [r for r in runs if isinstance(r, dict)]
            if not good:
                rows[name] = str(runs[0])
                continue
            rows[name] = {k: median([r[k] for r in good]) for k in good[0]}
    finally:
        server.terminate()
        server.wait()
    stamp = time.strftime("%Y%m%d-%H%M")
    out = {
        "pods": args.pods,
        "repeats": args.repeats,
        "env": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "clients": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"k8s-clients-{stamp}.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        f"# Kubernetes clients against kmock ({args.pods} pods, median of {args.repeats})",
        "",
        "| client | import s | RSS after import MB | list s | watch s | peak RSS MB |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        if isinstance(row, str):
            lines.append(f"| {name} | failed: {row} | | | | |")
        else:
            lines.append(
                f"| {name} | {row['import_s']:.2f} | {row['rss_import_mb']:.0f} | "
                f"{row['list_s']:.2f} | {row['watch_s']:.2f} | {row['rss_peak_mb']:.0f} |"
            )
    (RESULTS / "k8s-clients-latest.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
