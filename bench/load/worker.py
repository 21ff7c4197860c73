"""One load-benchmark run in a fresh process, so its peak RSS is its own.

Loads every tensor of a checkpoint with one tool, then checks them against safetensors' own
read of the local source files and prints one JSON line on stdout. Not a library.

    python bench/load/worker.py --tool spotstart-load --src gs://bkt/model/ \
        --reference /tmp/src --dest /tmp/scratch
"""

from __future__ import annotations

import time

from spotstart.fetch import Disk

_PROCESS_START = time.perf_counter()

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

Tensors = dict[str, torch.Tensor]
# A tool: (args) -> (tensors, notes). Its own imports happen inside, and are timed apart.
Load = Callable[[argparse.Namespace], tuple[Tensors, dict[str, Any]]]


def _rss_now_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _shards(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.safetensors") if ".spotstart" not in p.parts)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _fetch(args: argparse.Namespace) -> dict[str, Any]:
    """spotstart fetch of the whole prefix to --dest (fsync off, the default)."""
    t = time.perf_counter()
    from spotstart import FetchConfig, fetch

    import_s = time.perf_counter() - t
    report = fetch(args.src, args.dest, FetchConfig(disk=Disk(fsync=False)))
    return {
        "fetch_import_s": import_s,
        "fetch_seconds": report.seconds,
        "fetch_bytes": report.bytes_total,
        "concurrency_final": report.concurrency_final,
    }


def load_spotstart(args: argparse.Namespace) -> tuple[Tensors, dict[str, Any]]:
    t = time.perf_counter()
    from spotstart.fetch import FetchConfig
    from spotstart.weights.loader import load_async

    import_s = time.perf_counter() - t
    tensors, report = asyncio.run(load_async(args.src, device=args.device, config=FetchConfig()))
    _sync(args.device)
    return tensors, {"import_s": import_s, "own_seconds": report.seconds, "retries": report.retries}


def load_fetch_safetensors(args: argparse.Namespace) -> tuple[Tensors, dict[str, Any]]:
    import safetensors.torch

    notes = _fetch(args)
    tensors: Tensors = {}
    for path in _shards(Path(args.dest)):
        if args.device == "cpu":
            # load_file is lazy (mmap): read the bytes so every tensor is a real copy in memory
            tensors.update(safetensors.torch.load(path.read_bytes()))
        else:
            tensors.update(safetensors.torch.load_file(path, device=args.device))
    _sync(args.device)
    return tensors, notes


def load_local_safetensors(args: argparse.Namespace) -> tuple[Tensors, dict[str, Any]]:
    """safetensors from local disk only (no network): --src is a directory."""
    import safetensors.torch

    tensors: Tensors = {}
    for path in _shards(Path(args.src)):
        if args.device == "cpu":
            tensors.update(safetensors.torch.load(path.read_bytes()))
        else:
            tensors.update(safetensors.torch.load_file(path, device=args.device))
    _sync(args.device)
    return tensors, {}


def load_fetch_only(args: argparse.Namespace) -> tuple[Tensors, dict[str, Any]]:
    """The transfer alone: the same bytes through the same link to local disk, no tensors."""
    return {}, _fetch(args)


def load_runai(args: argparse.Namespace) -> tuple[Tensors, dict[str, Any]]:
    t = time.perf_counter()
    from runai_model_streamer import SafetensorsStreamer

    import_s = time.perf_counter() - t
    tensors: Tensors = {}
    with SafetensorsStreamer() as streamer:
        streamer.stream_files(args.files, device=args.device)
        # owned=True (the default): each yielded tensor is the caller's, no clone needed; the
        # full verification after the stream would catch a reused buffer.
        for name, tensor in streamer.get_tensors():
            tensors[name] = tensor
    _sync(args.device)
    return tensors, {"import_s": import_s}


def load_fetch_fastsafetensors(args: argparse.Namespace) -> tuple[Tensors, dict[str, Any]]:
    from fastsafetensors import SafeTensorsFileLoader

    notes = _fetch(args)
    loader = SafeTensorsFileLoader(None, args.device, nogds=True)
    loader.add_filenames({0: [str(p) for p in _shards(Path(args.dest))]})
    buffers = loader.copy_files_to_device()
    tensors = {name: buffers.get_tensor(name) for name in loader.get_keys()}
    _sync(args.device)
    # the tensors share ownership of their buffers; keep the loader alive until the process ends
    args.keepalive = (loader, buffers)
    return tensors, notes


LOADS: dict[str, Load] = {
    "spotstart-load": load_spotstart,
    "fetch-safetensors": load_fetch_safetensors,
    "local-safetensors": load_local_safetensors,
    "fetch-only": load_fetch_only,
    "runai": load_runai,
    "fetch-fastsafetensors": load_fetch_fastsafetensors,
}


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    # compare bit patterns: random bf16 data holds NaNs, which torch.equal calls unequal
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)


def verify(tensors: Tensors, reference: Path, mode: str) -> tuple[bool, str]:
    """Names, dtypes, shapes and bytes against safetensors' own read of the source files."""
    expected: dict[str, Path] = {}
    for path in _shards(reference):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                expected[name] = path
    if set(tensors) != set(expected):
        missing = sorted(set(expected) - set(tensors))[:3]
        extra = sorted(set(tensors) - set(expected))[:3]
        return (
            False,
            f"{len(tensors)} tensors, expected {len(expected)}; missing {missing} extra {extra}",
        )
    if mode == "none":
        return True, "count only"
    by_file: dict[Path, list[str]] = {}
    for name, path in expected.items():
        by_file.setdefault(path, []).append(name)
    checked = 0
    for path, names in by_file.items():
        if mode == "sample":
            names = sorted(names)
            names = [names[0], names[len(names) // 2], names[-1]]
        with safe_open(str(path), "pt") as f:
            for name in names:
                ref = f.get_tensor(name)
                got = tensors[name]
                if got.dtype != ref.dtype or tuple(got.shape) != tuple(ref.shape):
                    return (
                        False,
                        f"{name}: {got.dtype}{tuple(got.shape)} != {ref.dtype}{tuple(ref.shape)}",
                    )
                if not torch.equal(_as_bytes(got), _as_bytes(ref)):
                    return False, f"{name}: bytes differ from {path.name}"
                checked += 1
    return True, f"{checked} tensors bit-identical ({mode})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tool", required=True, choices=sorted(LOADS))
    p.add_argument("--src", required=True, help="URL (or local dir for local-safetensors)")
    p.add_argument("--files", nargs="*", default=[], help="shard URLs (runai)")
    p.add_argument("--dest", default="", help="scratch dir for tools that fetch to disk")
    p.add_argument("--reference", required=True, type=Path, help="local source shards")
    p.add_argument("--device", default="cpu")
    p.add_argument("--verify", choices=("full", "sample", "none"), default="full")
    args = p.parse_args(argv)
    result: dict[str, Any] = {"tool": args.tool, "device": args.device}
    result["rss_after_imports_bytes"] = _rss_now_bytes()
    result["startup_s"] = time.perf_counter() - _PROCESS_START
    start = time.perf_counter()
    try:
        tensors, notes = LOADS[args.tool](args)
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"[-1500:]
        result["traceback"] = traceback.format_exc()[-3000:]
        print(json.dumps(result), flush=True)
        return 1
    # time to the last tensor ready: includes the tool's own imports, like a user's cold start
    result["seconds"] = time.perf_counter() - start
    # before verification: reading the reference maps the source files into this process
    result["peak_rss_bytes"] = _peak_rss_bytes()
    result["tensors"] = len(tensors)
    result["bytes"] = sum(t.numel() * t.element_size() for t in tensors.values())
    result["notes"] = notes
    if args.tool == "fetch-only":
        result["bytes"] = int(notes.get("fetch_bytes", 0))
        ok, detail = True, "no tensors (transfer only)"
    else:
        ok, detail = verify(tensors, args.reference, args.verify)
    result["verified"] = ok
    result["verify_detail"] = detail
    result["verify_s"] = time.perf_counter() - start - result["seconds"]
    print(json.dumps(result), flush=True)
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
