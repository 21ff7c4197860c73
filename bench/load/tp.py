"""Tensor-parallel loads, measured: each rank of `spotstart load --tp R/W` in its own process
beside a whole load of the same checkpoint, from the emulated GCS behind one link, in one run.

    python bench/load/tp.py --world 8 --layers 8 --hidden 2048

Per row: seconds, bytes read over the network, the rank's tensor bytes, peak RSS (ru_maxrss of
the process, interpreter and torch included) and both as a share of the model. Writes
bench/results/load-tp-<stamp>.json and load-tp-latest.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"
BUCKET = "models"


def make_checkpoint(path: Path, layers: int, hidden: int, inter: int, vocab: int) -> int:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    t: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g).bfloat16()
    }
    for i in range(layers):
        p = f"model.layers.{i}"
        for name, shape in (
            ("self_attn.q_proj.weight", (hidden, hidden)),
            ("self_attn.k_proj.weight", (hidden // 4, hidden)),
            ("self_attn.v_proj.weight", (hidden // 4, hidden)),
            ("self_attn.o_proj.weight", (hidden, hidden)),
            ("mlp.gate_proj.weight", (inter, hidden)),
            ("mlp.up_proj.weight", (inter, hidden)),
            ("mlp.down_proj.weight", (hidden, inter)),
            ("input_layernorm.weight", (hidden,)),
            ("post_attention_layernorm.weight", (hidden,)),
        ):
            t[f"{p}.{name}"] = torch.randn(*shape, generator=g).bfloat16()
    t["model.norm.weight"] = torch.randn(hidden, generator=g).bfloat16()
    t["lm_head.weight"] = torch.randn(vocab, hidden, generator=g).bfloat16()
    save_file(t, str(path))
    return sum(x.nbytes for x in t.values())


def run_load(src: str, env: dict[str, str], tp: str | None) -> dict[str, float]:
    rss = Path(tempfile.mktemp(suffix=".rss"))
    argv = [
        "/usr/bin/time",
        "-f",
        "%M",
        "-o",
        str(rss),
        sys.executable,
        "-m",
        "spotstart",
        "load",
        src,
        "--json",
    ]
    if tp:
        argv += ["--tp", tp]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    report["peak_rss_mb"] = int(rss.read_text().split()[-1]) / 1024
    rss.unlink()
    return report


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=8)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--per-conn-mbps", type=float, default=50)
    ap.add_argument("--aggregate-mbps", type=float, default=400)
    ap.add_argument("--latency-ms", type=float, default=30)
    args = ap.parse_args()
    from spotstart.emulate.link import LinkConfig
    from spotstart.emulate.storage import StorageEmulator, StorageEmulatorOptions

    with tempfile.TemporaryDirectory(prefix="bench-tp-") as tmp:
        work = Path(tmp)
        ckpt = work / "model.safetensors"
        tensor_bytes = make_checkpoint(ckpt, args.layers, args.hidden, args.inter, args.vocab)
        link = LinkConfig(
            per_conn_bytes_per_s=args.per_conn_mbps * 1e6,
            aggregate_bytes_per_s=args.aggregate_mbps * 1e6,
            first_byte_latency_s=args.latency_ms / 1000,
        )
        opts = StorageEmulatorOptions(data_dir=work / "emu", link=link, buckets=(BUCKET,))
        with StorageEmulator(opts) as emu:
            emu.seed_gcs(BUCKET, {"tp/model.safetensors": ckpt.read_bytes()})
            env = {**os.environ, **emu.env_for_gcs()}
            src = f"gs://{BUCKET}/tp/model.safetensors"
            whole = run_load(src, env, None)
            ranks = [run_load(src, env, f"{r}/{args.world}") for r in range(args.world)]
    rows = [("whole", whole)] + [(f"rank {r['tp']}", r) for r in ranks]
    result = {
        "environment": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "checkpoint": {
            "tensor_bytes": tensor_bytes,
            "layers": args.layers,
            "hidden": args.hidden,
            "intermediate": args.inter,
            "vocab": args.vocab,
        },
        "link": {
            "per_conn_mb_s": args.per_conn_mbps,
            "aggregate_mb_s": args.aggregate_mbps,
            "latency_ms": args.latency_ms,
        },
        "rows": [
            {
                "row": name,
                "seconds": r["seconds"],
                "bytes_read": r["bytes_transferred"],
                "bytes_rank": r.get("bytes_rank") or r["bytes_total"],
                "peak_rss_mb": r["peak_rss_mb"],
            }
            for name, r in rows
        ],
    }
    stamp = time.strftime("%Y%m%d-%H%M")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"load-tp-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    env_info, ck = result["environment"], f"{tensor_bytes / 1e6:.0f} MB"
    lines = [
        f"# bench/load/tp ({args.world} ranks, {env_info['cpus']} CPUs, one process a row)",
        "",
        f"Checkpoint: Llama-shaped, {args.layers} layers, hidden {args.hidden}, intermediate "
        f"{args.inter}, vocab {args.vocab}: {ck} of BF16 tensors; gs:// through "
        f"{args.per_conn_mbps:g} MB/s a connection, {args.aggregate_mbps:g} MB/s in all, "
        f"{args.latency_ms:g} ms.",
        "",
        "| row | s | read MB | read / model | rank tensors MB | tensors / model | peak RSS MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        read, held = row["bytes_read"], row["bytes_rank"]
        lines.append(
            f"| {row['row']} | {row['seconds']:.2f} | {read / 1e6:.0f} | "
            f"{read / tensor_bytes:.3f} | {held / 1e6:.0f} | {held / tensor_bytes:.3f} | "
            f"{row['peak_rss_mb']:.0f} |"
        )
    md = "\n".join(lines) + "\n"
    (RESULTS / "load-tp-latest.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
