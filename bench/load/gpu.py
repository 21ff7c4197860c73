"""GPU rows of the load benchmark: spotstart load to cuda vs to cpu vs safetensors' load_file
to cuda, every tensor checked bit for bit. Run by bench/gpu_load.sh on a machine with an NVIDIA
GPU; ``--cpu-only`` runs the CPU rows anywhere (a check of the harness, not a GPU figure).

    python bench/load/gpu.py --out-dir "$OUT"                   # 4 x 1000 MB, 2 repeats
    python bench/load/gpu.py --cpu-only --shards 2 --shard-mb 16 --repeats 1
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/fetch's helpers are imported by bare name, as bench/load/run.py does
sys.path.append(str(Path(__file__).resolve().parent.parent / "fetch"))

import argparse
import shutil
import tempfile
from datetime import datetime

from contenders import Contender
from measure import drop_caches, measure_ceiling
from run import (
    BUCKET,
    PREFIX,
    add_common_flags,
    environment,
    finish_env,
    link_from_args,
    make_checkpoint,
    run_rounds,
    select,
)
from summary import print_rich, summarize, write_results

from spotstart.emulate.storage import StorageEmulator, StorageEmulatorOptions


def gpu_contenders(cpu_only: bool) -> list[Contender]:
    dev = "cpu" if cpu_only else "cuda"
    rows = [
        Contender(f"spotstart load gs:// --device {dev}", "spotstart-load", "gs", dev, ours=True),
    ]
    if not cpu_only:
        rows.append(Contender("spotstart load gs:// --device cpu", "spotstart-load", "gs", "cpu"))
    copy = "" if dev == "cuda" else " (forced copy)"
    rows += [
        Contender(
            f"safetensors load_file(device={dev}){copy}, local disk",
            "local-safetensors",
            "local",
            dev,
        ),
        Contender(
            f"spotstart fetch gs:// + load_file(device={dev}){copy}", "fetch-safetensors", "gs", dev
        ),
        Contender("transfer: spotstart fetch gs:// (fsync off)", "fetch-only", "gs", transfer=True),
    ]
    return rows


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_common_flags(p, shards=4, shard_mb=1000)
    p.set_defaults(repeats=2, verify="full")
    p.add_argument("--per-conn-mbps", type=float, default=200, help="per-connection cap (200)")
    p.add_argument("--aggregate-mbps", type=float, default=2000, help="link cap (2000)")
    p.add_argument("--latency-ms", type=float, default=30, help="first-byte latency (30)")
    p.add_argument("--cpu-only", action="store_true", help="no cuda rows (harness check)")
    p.add_argument("--out-dir", type=Path, help="write results here instead of --results-dir")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if not args.cpu_only:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(f"torch {torch.__version__} sees no CUDA device; use --cpu-only")
    contenders = select(gpu_contenders(args.cpu_only), args.tools)
    link = link_from_args(args)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="spotstart-bench-gpu-load-"))
    work.mkdir(parents=True, exist_ok=True)
    shard_bytes = int(args.shard_mb * 1e6)
    timeout_s = args.timeout_s or 60 + 5 * args.shards * shard_bytes / (
        link.aggregate_bytes_per_s or 400e6
    )
    started = datetime.now()
    print(f"writing checkpoint in {work / 'src'} ...", flush=True)
    ckpt = make_checkpoint(work / "src", args.shards, shard_bytes, args.hidden)
    env = environment(args, link, ckpt, "cpu" if args.cpu_only else "cuda")
    if not args.cpu_only:
        import torch

        env["gpu"] = torch.cuda.get_device_name(0)
        env["versions"]["torch cuda"] = str(torch.version.cuda)
    opts = StorageEmulatorOptions(data_dir=work / "emulator", link=link, buckets=(BUCKET,))
    try:
        with StorageEmulator(opts) as emu:
            print("seeding GCS ...", flush=True)
            emu.seed_gcs(BUCKET, {PREFIX + name: ckpt.root / name for name in ckpt.files})
            env["drop_caches"] = drop_caches()
            env["ceilings"] = []
            if not args.no_ceiling:
                keys = [PREFIX + n for n in ckpt.shard_names]
                sizes = [ckpt.files[n] for n in ckpt.shard_names]
                c = measure_ceiling(
                    emu.gcs.endpoint, BUCKET, keys, sizes, 16, "capped link (as benched)"
                )
                env["ceilings"].append(
                    {"label": c.label, "streams": c.streams, "mb_per_s": c.mb_per_s}
                )
                print(f"  {c.label}: {c.mb_per_s:.0f} MB/s", flush=True)
            records, invocations = run_rounds(emu, contenders, ckpt, work, args, timeout_s)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    finish_env(env, records, started)
    rows = summarize(records, contenders, link.aggregate_bytes_per_s)
    title = f"Load to {env['device']}: time to every tensor ready"
    if env.get("gpu"):
        title += f" ({env['gpu']})"
    print_rich(rows, env, title)
    stamp = started.strftime("%Y%m%d-%H%M")
    out_dir = args.out_dir or args.results_dir
    path_json = out_dir / f"gpu-load-{stamp}.json"
    path_md = out_dir / f"gpu-load-{stamp}.md"
    write_results(path_json, path_md, records, rows, env, invocations)
    print(f"wrote {path_json} and {path_md}")
    return 0 if all(r.ok_runs for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
