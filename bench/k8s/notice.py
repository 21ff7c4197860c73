"""Notice-to-replacement through `spotstart k8s controller`, against kmock on 127.0.0.1: a spot
pod gets the guard's notice annotation (a merge-patch, as the guard sends it); we time from
that PATCH being answered to the on-demand scale-up PATCH arriving at the API. N notices, one
at a time, the controller running as in a cluster (informer, lease, reconciler).

    python bench/k8s/notice.py --notices 50

Writes bench/results/k8s-notice-<stamp>.json and k8s-notice-latest.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from kmock import Server  # noqa: E402

from spotstart.k8s.api import make_client  # noqa: E402
from spotstart.k8s.controller import Controller, ControllerConfig  # noqa: E402
from spotstart.k8s.lease import LeaseTiming  # noqa: E402
from tests.k8s.apiserver import ApiServer  # noqa: E402
from tests.k8s.test_controller import NS, PODS, cluster, patch, pod, stamp  # noqa: E402


def ondemand(api: Any) -> int:
    return int(api.objects["apps/v1/deployments", NS, "llm-ondemand"]["spec"]["replicas"])


async def run(notices: int, policy: str) -> list[float]:
    out: list[float] = []
    async with ApiServer() as api, Server(api):
        await cluster(api, *(pod(f"llm-spot-{i}", zone="zone-a") for i in range(notices + 2)))
        cfg = ControllerConfig(
            name="llm",
            namespace=NS,
            zones=("zone-a", "zone-b", "zone-c"),
            target=notices + 2,
            max_on_demand=notices + 2,
            policy=policy,
            calm_s=3600,
            resync_s=60,
            lease=LeaseTiming(3, 2, 0.5),
            identity="bench",
        )
        controller = Controller(cfg, make_client(str(api.url)))
        stop = asyncio.Event()
        task = asyncio.create_task(controller.run(stop))
        for _ in range(3000):  # the first reconcile (leader, synced) within 30 s
            if controller.reconciles:
                break
            await asyncio.sleep(0.01)
        for i in range(notices):
            before = ondemand(api)
            t0 = time.perf_counter()
            await patch(
                api,
                f"{PODS}/llm-spot-{i}",
                {
                    "metadata": {
                        "annotations": {
                            "spotstart.dev/notice": "preemption",
                            "spotstart.dev/notice-deadline": stamp(-15),
                        }
                    }
                },
            )
            while ondemand(api) == before:
                if time.perf_counter() - t0 > 30:
                    raise SystemExit(f"notice {i}: no on-demand scale-up within 30 s")
                await asyncio.sleep(0.0005)
            out.append(time.perf_counter() - t0)
        stop.set()
        await task
        await controller.client.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--notices", type=int, default=50)
    ap.add_argument("--policy", default="spread_fallback")
    args = ap.parse_args()
    times = asyncio.run(run(args.notices, args.policy))
    ms = sorted(t * 1000 for t in times)
    p50 = statistics.median(ms)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    stamp_ = time.strftime("%Y%m%d-%H%M")
    result = {
        "notices": args.notices,
        "policy": args.policy,
        "p50_ms": p50,
        "p99_ms": p99,
        "max_ms": ms[-1],
        "samples_ms": ms,
        "env": {"python": platform.python_version(), "cpus": os.cpu_count()},
    }
    results = HERE.parent / "results"
    results.mkdir(exist_ok=True)
    (results / f"k8s-notice-{stamp_}.json").write_text(json.dumps(result, indent=2) + "\n")
    text = (
        f"# Notice to replacement requested, through the controller against kmock\n\n"
        f"{args.notices} notices, policy {args.policy}: p50 {p50:.1f} ms, p99 {p99:.1f} ms, "
        f"max {ms[-1]:.1f} ms (annotation PATCH answered -> on-demand scale PATCH received; "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()})\n"
    )
    (results / "k8s-notice-latest.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
