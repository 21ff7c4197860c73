"""Which data path moves the bytes for the least CPU, measured side by side through the same
emulated link in one run (issue 11's choice): `spotstart fetch` as shipped (recv_into a
reused buffer on threads, O_DIRECT writes), with `--page-cache`, on the aiohttp path
(`--no-direct-reads`: bodies -> bytes -> writer queue -> pwritev), and prototypes that read
with ``recv_into`` from threads into one reused buffer then pwrite, or straight into the
destination file's pages through mmap. Beside them, the ceiling: 16 curl range streams to
/dev/null.

    python bench/fetch/datapath.py --mb 1024 --repeats 3

Writes bench/results/datapath-<stamp>.json and datapath-latest.md. CPU is user+sys of each
candidate's process (interpreter start included), per GB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"
WORKER = HERE / "datapath_worker.py"
BUCKET = "models"
KEY = "datapath/blob.bin"


def _run(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--per-conn-mbps", type=float, default=50)
    ap.add_argument("--aggregate-mbps", type=float, default=400)
    ap.add_argument("--latency-ms", type=float, default=30)
    args = ap.parse_args()
    from spotstart.emulate.link import LinkConfig
    from spotstart.emulate.storage import StorageEmulator, StorageEmulatorOptions, env_for_gcs

    size = args.mb << 20
    link = LinkConfig(
        per_conn_bytes_per_s=args.per_conn_mbps * 1e6,
        aggregate_bytes_per_s=args.aggregate_mbps * 1e6,
        first_byte_latency_s=args.latency_ms / 1000,
    )
    chunk = 16 << 20
    rows: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-datapath-") as tmp:
        work = Path(tmp)
        opts = StorageEmulatorOptions(data_dir=work / "emu", link=link, buckets=(BUCKET,))
        with StorageEmulator(opts) as emu:
            emu.seed_gcs(BUCKET, {KEY: os.urandom(64 << 20) * (size // (64 << 20))})
            env = {**os.environ, **env_for_gcs(emu.info)}
            base = emu.info["gcs"]["endpoint"]
            media = f"{base}/download/storage/v1/b/{BUCKET}/o/{KEY.replace('/', '%2F')}?alt=media"

            def spotstart(*flags: str) -> list[str]:
                return [
                    sys.executable,
                    "-m",
                    "spotstart",
                    "fetch",
                    f"gs://{BUCKET}/{KEY}",
                    "DEST",
                    "--json",
                    *flags,
                    "--concurrency",
                    str(args.streams),
                ]

            candidates = {
                "curl x16 to /dev/null (ceiling)": None,
                "spotstart fetch --no-direct-reads (aiohttp -> bytes -> pwritev)": spotstart(
                    "--no-direct-reads"
                ),
                "spotstart fetch (direct reader: recv_into a reused buffer, O_DIRECT writes)": (
                    spotstart()
                ),
                "spotstart fetch --page-cache (direct reader, buffered pwrite)": spotstart(
                    "--page-cache"
                ),
                "recv_into buffer + pwrite (prototype)": [
                    sys.executable,
                    str(WORKER),
                    "recv-pwrite",
                    media,
                    str(size),
                    "DEST/f",
                    str(args.streams),
                    str(chunk),
                ],
                "recv_into mmap pages (prototype)": [
                    sys.executable,
                    str(WORKER),
                    "recv-mmap",
                    media,
                    str(size),
                    "DEST/f",
                    str(args.streams),
                    str(chunk),
                ],
            }
            for mode in ("recv-pwrite", "recv-mmap"):
                candidates[f"{mode} + MSG_WAITALL 1 MiB (prototype)"] = [
                    "env",
                    "DATAPATH_WAITALL=1048576",
                    sys.executable,
                    str(WORKER),
                    mode,
                    media,
                    str(size),
                    "DEST/f",
                    str(args.streams),
                    str(chunk),
                ]
            for repeat in range(args.repeats):
                for name, argv in candidates.items():
                    dest = work / f"d{repeat}-{len(rows.get(name, []))}-{abs(hash(name))}"
                    dest.mkdir()
                    if argv is None:
                        per = size // args.streams
                        procs = [
                            subprocess.Popen(
                                [
                                    "curl",
                                    "-sS",
                                    "-o",
                                    "/dev/null",
                                    "-r",
                                    f"{i * per}-{min(size, (i + 1) * per) - 1}",
                                    media,
                                ]
                            )
                            for i in range(args.streams)
                        ]
                        before = resource.getrusage(resource.RUSAGE_CHILDREN)
                        t0 = time.perf_counter()
                        for p in procs:
                            p.wait()
                        wall = time.perf_counter() - t0
                        after = resource.getrusage(resource.RUSAGE_CHILDREN)
                        cpu = (after.ru_utime - before.ru_utime) + (
                            after.ru_stime - before.ru_stime
                        )
                    else:
                        wall, cpu = _run([a.replace("DEST", str(dest)) for a in argv], env)
                    rows.setdefault(name, []).append((wall, cpu))
                    print(
                        f"[{repeat + 1}] {name}: {size / wall / 1e6:.0f} MB/s, "
                        f"{cpu / (size / 1e9):.2f} CPU-s/GB",
                        flush=True,
                    )
    gb = size / 1e9
    ceiling = statistics.median(size / w / 1e6 for w, _ in rows["curl x16 to /dev/null (ceiling)"])
    summary = [
        {
            "candidate": name,
            "mb_per_s": statistics.median(size / w / 1e6 for w, _ in runs),
            "cpu_s_per_gb": statistics.median(c / gb for _, c in runs),
        }
        for name, runs in rows.items()
    ]
    for row in summary:
        row["x_ceiling"] = row["mb_per_s"] / ceiling
    stamp = time.strftime("%Y%m%d-%H%M")
    RESULTS.mkdir(exist_ok=True)
    doc = {
        "environment": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "link": {
            "per_conn_mb_s": args.per_conn_mbps,
            "aggregate_mb_s": args.aggregate_mbps,
            "latency_ms": args.latency_ms,
        },
        "object_mb": args.mb,
        "streams": args.streams,
        "repeats": args.repeats,
        "rows": summary,
    }
    (RESULTS / f"datapath-{stamp}.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        f"# bench/fetch/datapath ({args.mb} MiB object, {args.streams} streams, median of "
        f"{args.repeats}, {os.cpu_count()} CPUs)",
        "",
        f"Link: {args.per_conn_mbps:g} MB/s a connection, {args.aggregate_mbps:g} MB/s in all, "
        f"{args.latency_ms:g} ms first byte; GCS media URLs through the emulator.",
        "",
        "| candidate | MB/s | x ceiling | CPU-s/GB |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['candidate']} | {r['mb_per_s']:.0f} | {r['x_ceiling']:.2f} | "
        f"{r['cpu_s_per_gb']:.2f} |"
        for r in summary
    ]
    md = "\n".join(lines) + "\n"
    (RESULTS / "datapath-latest.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
