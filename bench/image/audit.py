"""`spotstart image audit` beside the ceiling of plain decompression of the same layers, in one
run, on a generated multi-GB image: many small files plus a few large ones, gzip layers.

    python bench/image/audit.py --gb 2 --repeats 3

Ceiling: `zcat BLOB | tar t > /dev/null` for every layer, one after another (what reading the
layers at all costs with C tools). Ours: the whole audit (digests checked, tree, rules) as a
CLI process. Memory: the audit's peak RSS on the image and on one whose large layer is 4x
bigger (streaming: it should not grow with layer size). Writes bench/results/image-<stamp>.json
and image-latest.md.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"


def _gzip_blob(layout: Path, tar_bytes_iter, level: int = 1) -> tuple[str, int, str]:
    """Write one gzip layer blob; returns (digest, size, diff_id)."""
    tmp = layout / "blobs" / "sha256" / "incoming"
    comp = zlib.compressobj(level, zlib.DEFLATED, 31)
    blob_hash, diff_hash, size = hashlib.sha256(), hashlib.sha256(), 0
    with open(tmp, "wb") as out:
        for piece in tar_bytes_iter:
            diff_hash.update(piece)
            c = comp.compress(piece)
            blob_hash.update(c)
            out.write(c)
            size += len(c)
        c = comp.flush()
        blob_hash.update(c)
        out.write(c)
        size += len(c)
    digest = blob_hash.hexdigest()
    tmp.rename(layout / "blobs" / "sha256" / digest)
    return f"sha256:{digest}", size, f"sha256:{diff_hash.hexdigest()}"


class _Chunks(io.RawIOBase):
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[no-untyped-def, override]
        self.parts.append(bytes(b))
        return len(b)


def _tar_stream(members):  # type: ignore[no-untyped-def]
    sink = _Chunks()
    tf = tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT)  # noqa: SIM115 - a generator
    for name, size, body in members:
        info = tarfile.TarInfo(name)
        info.size = size
        tf.addfile(info, body)
        if sum(map(len, sink.parts)) > 8 << 20:
            yield from sink.parts
            sink.parts.clear()
    tf.close()
    yield from sink.parts


def _small(n: int, rnd: random.Random):  # type: ignore[no-untyped-def]
    for i in range(n):
        size = rnd.randrange(500, 12000)
        data = rnd.randbytes(size // 3) + b"\0" * (size - size // 3)
        yield f"usr/lib/python3.11/site-packages/pkg{i // 400}/mod{i}.py", size, io.BytesIO(data)


class _Body(io.RawIOBase):
    """``size`` bytes of half random, half zero 8 MiB blocks, made as read (no whole file)."""

    def __init__(self, size: int, block: bytes) -> None:
        self._left, self._block = size, block

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:  # type: ignore[override]
        n = self._left if n < 0 else min(n, self._left)
        out = (self._block * (n // len(self._block) + 1))[:n]
        self._left -= n
        return out


def _large(count: int, each: int, rnd: random.Random, prefix: str):  # type: ignore[no-untyped-def]
    block = rnd.randbytes(4 << 20) + bytes(4 << 20)
    for i in range(count):
        yield f"{prefix}/blob{i}.bin", each, _Body(each, block)


def make_image(root: Path, total_bytes: int, large_factor: int = 1) -> Path:
    layout = root / "oci"
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    rnd = random.Random(7)
    small_n = max(1000, int(total_bytes * 0.25 / 6000))
    large_each = max(1 << 20, int(total_bytes * 0.75 / 6)) * large_factor
    layers = [
        _gzip_blob(layout, _tar_stream(_small(small_n, rnd))),
        _gzip_blob(layout, _tar_stream(_large(3, large_each, rnd, "opt/lib"))),
        _gzip_blob(layout, _tar_stream(_large(3, large_each, rnd, "models"))),
    ]
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [d for _, _, d in layers]},
            "history": [{"created_by": f"bench layer {i}"} for i in range(len(layers))],
        }
    ).encode()
    cdig = hashlib.sha256(config).hexdigest()
    (layout / "blobs" / "sha256" / cdig).write_bytes(config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": f"sha256:{cdig}",
                "size": len(config),
            },
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": s}
                for d, s, _ in layers
            ],
        }
    ).encode()
    mdig = hashlib.sha256(manifest).hexdigest()
    (layout / "blobs" / "sha256" / mdig).write_bytes(manifest)
    (layout / "index.json").write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    {
                        "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": f"sha256:{mdig}",
                        "size": len(manifest),
                        "annotations": {"org.opencontainers.image.ref.name": "bench"},
                    }
                ],
            }
        )
    )
    return layout


def _timed(argv: list[str], shell: bool = False) -> tuple[float, float, int]:
    """Wall s, CPU s (user+sys of the children), peak RSS of the child in kB."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    wrapper = ["/usr/bin/time", "-f", "%M", "-o", "/tmp/bench-image-rss"] if not shell else []
    subprocess.run(
        wrapper + argv if not shell else argv[0], shell=shell, check=True, stdout=subprocess.DEVNULL
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    rss = int(Path("/tmp/bench-image-rss").read_text().split()[-1]) if not shell else 0
    return wall, cpu, rss


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    spotstart = [sys.executable, "-m", "spotstart", "image", "audit", "--json"]
    with tempfile.TemporaryDirectory(prefix="bench-image-") as tmp:
        layout = make_image(Path(tmp) / "a", int(args.gb * 1e9))
        blobs = json.loads(
            (
                layout
                / "blobs"
                / "sha256"
                / json.loads((layout / "index.json").read_text())["manifests"][0]["digest"].split(
                    ":"
                )[1]
            ).read_text()
        )["layers"]
        paths = [layout / "blobs" / "sha256" / b["digest"].split(":")[1] for b in blobs]
        compressed = sum(b["size"] for b in blobs)
        ceiling_cmd = " && ".join(f"zcat {p} | tar t > /dev/null" for p in paths)
        ceil, ours = [], []
        for _ in range(args.repeats):  # interleaved: same page cache, same machine state
            ceil.append(_timed([ceiling_cmd], shell=True))
            ours.append(_timed([*spotstart, f"oci:{layout}:bench"]))
        report = json.loads(
            subprocess.run(
                [*spotstart, f"oci:{layout}:bench"], capture_output=True, text=True, check=True
            ).stdout
        )
        big = make_image(Path(tmp) / "b", int(args.gb * 1e9), large_factor=4)
        _, _, rss_big = _timed([*spotstart, f"oci:{big}:bench"])
    med = lambda xs, i: sorted(x[i] for x in xs)[len(xs) // 2]  # noqa: E731
    gb_u = report["bytes_uncompressed"] / 1e9
    result = {
        "environment": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
        },
        "image": {
            "bytes_compressed": compressed,
            "bytes_uncompressed": report["bytes_uncompressed"],
            "files": sum(x["files"] for x in report["layers"]),
            "layers": len(paths),
        },
        "ceiling_zcat_tar_s": med(ceil, 0),
        "ceiling_cpu_s": med(ceil, 1),
        "spotstart_s": med(ours, 0),
        "spotstart_cpu_s": med(ours, 1),
        "x_ceiling": med(ceil, 0) / med(ours, 0),
        "spotstart_cpu_s_per_gb": med(ours, 1) / gb_u,
        "peak_rss_mb": med(ours, 2) / 1024,
        "peak_rss_mb_4x_large_layers": rss_big / 1024,
        "repeats": args.repeats,
    }
    stamp = time.strftime("%Y%m%d-%H%M")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"image-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    r, env = result, result["environment"]
    files = r["image"]["files"]
    md = (
        f"# bench/image (median of {args.repeats}, {env['cpus']} CPUs, Python {env['python']})\n\n"
        f"Image: {compressed / 1e9:.2f} GB gzip, {gb_u:.2f} GB uncompressed, {files} files in "
        f"{len(paths)} layers.\n\n"
        "| | wall s | CPU s | x ceiling | peak RSS |\n|---|---|---|---|---|\n"
        f"| `zcat \\| tar t` (ceiling) | {r['ceiling_zcat_tar_s']:.2f} | "
        f"{r['ceiling_cpu_s']:.2f} | 1.00 | |\n"
        f"| `spotstart image audit` | {r['spotstart_s']:.2f} | {r['spotstart_cpu_s']:.2f} | "
        f"{r['x_ceiling']:.2f} | {r['peak_rss_mb']:.0f} MB |\n\n"
        "Same image with 4x larger large layers: peak RSS "
        f"{r['peak_rss_mb_4x_large_layers']:.0f} MB.\n"
    )
    (RESULTS / "image-latest.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
