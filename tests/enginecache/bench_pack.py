"""Pack and restore throughput of a synthetic 200 MB engine cache (not a test: run by hand,
``python tests/enginecache/bench_pack.py [DIR]``). 2,000 files of 50 KB of random bytes (like
compiled kernels: incompressible) plus one 100 MB file of repeated text with some noise (like
the precompiled header: compresses about 7x). Prints MB/s of cache bytes (not archive bytes)."""

from __future__ import annotations

import asyncio
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from spotstart.enginecache import CacheKey, EngineCacheConfig, engine_env, publish, restore
from spotstart.enginecache.dirs import tmp_inductor

MB = 1e6


def make_cache(cfg: EngineCacheConfig) -> int:
    engine_env(cfg, [])
    rnd = random.Random(1)
    total = 0
    for i in range(2000):
        p = cfg.root / "vllm" / "torch_compile_cache" / f"{i % 64:02x}" / f"k{i}.so"
        p.parent.mkdir(parents=True, exist_ok=True)
        data = rnd.randbytes(50_000)
        p.write_bytes(data)
        total += len(data)
    hdr = cfg.root / tmp_inductor() / "precompiled_headers" / "h.h.gch"
    hdr.parent.mkdir(parents=True, exist_ok=True)
    with open(hdr, "wb") as f:
        chunk = (b"struct at::Tensor { int64_t sizes[8]; } // " * 24)[:1000]
        for j in range(100_000):
            f.write(chunk if j % 8 else rnd.randbytes(1000))
    return total + 100_000_000


def main() -> None:
    base = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="ecbench-"))
    (base / "bucket").mkdir(parents=True, exist_ok=True)
    url = f"file://{base}/bucket"
    pub = EngineCacheConfig(url, base / "pub")
    size = make_cache(pub)
    key = CacheKey("b" * 64, {"bench": 1})
    t = time.monotonic()
    out = asyncio.run(publish(pub, key))
    pack_s = time.monotonic() - t
    arch = next((base / "bucket" / key.digest).glob("*.tar.zst")).stat().st_size
    print(
        f"publish {out.status}: {size / MB:.0f} MB in {pack_s:.2f} s = "
        f"{size / MB / pack_s:.0f} MB/s "
        f"(pack + create on file://), archive {arch / MB:.1f} MB"
    )
    for i in range(2):
        cfg = EngineCacheConfig(url, base / f"r{i}")
        t = time.monotonic()
        got = asyncio.run(restore(cfg, key))
        s = time.monotonic() - t
        print(
            f"restore {got.status}: {got.bytes / MB:.0f} MB in {s:.2f} s = "
            f"{got.bytes / MB / s:.0f} MB/s "
            "(fetch from file://, sha256, checked extract, swap)"
        )
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus")


if __name__ == "__main__":
    main()
