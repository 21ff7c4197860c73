"""`spotstart doctor`: what limits this node for a cold start, on one screen.

Checks, each with a verdict and a fix: musl/Alpine (gsutil's single-process trap), a compiled
CRC-32C, where DEST lives (local NVMe, a network disk, RAM, FUSE, a loop file), free space
against the model, ``/dev/shm``, the open-file limit, CPUs against what fetch needs at the
link's rate. Short measurements: ranged reads from the source (one stream, then eight),
disk writes with fdatasync, host-to-GPU copies where a GPU is. Then the predicted fetch and
load time of the model and the bottleneck. A ``fail`` verdict is blocking (exit 16)."""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from spotstart import safefs
from spotstart.doctor import probes
from spotstart.errors import LocalIOError, NotFound
from spotstart.fetch import FetchConfig
from spotstart.fetch.journal import STATE_MODE
from spotstart.fetch.layout import STATE_DIR
from spotstart.fetch.scheduler import source_for
from spotstart.fetch.verify import crc32c
from spotstart.store import ObjectInfo, RangeSource, lookup, parse_url

Verdict = Literal["ok", "info", "warn", "fail"]
# What our fetch spends per GB moved with CRC-32C on (bench/fetch: 0.8 here), with headroom.
CPU_S_PER_GB = 1.0
SHM_MIN = 1 << 30
NOFILE_MIN = 4096


@dataclass(frozen=True)
class Check:
    name: str
    verdict: Verdict
    detail: str
    fix: str = ""


@dataclass
class DoctorReport:
    checks: list[Check] = field(default_factory=list)
    measured: dict[str, float] = field(default_factory=dict)  # MB/s, GB/s, as named
    prediction: dict[str, Any] = field(default_factory=dict)

    @property
    def blocking(self) -> list[Check]:
        return [c for c in self.checks if c.verdict == "fail"]

    def to_json(self) -> dict[str, Any]:
        return {
            "checks": [asdict(c) for c in self.checks],
            "measured": self.measured,
            "prediction": self.prediction,
            "blocking": len(self.blocking),
        }


def _libc_check(root: Path) -> Check:
    kind = probes.libc(root)
    if kind == "musl":
        return Check(
            "libc",
            "warn",
            "musl (Alpine): gsutil and gcloud storage fall back to one process here (no "
            "working multiprocessing), ~50 MB/s for a model",
            "use `spotstart fetch` (threads, unaffected), or a glibc base image (Debian slim)",
        )
    return Check("libc", "ok" if kind == "glibc" else "info", kind)


def _crc_check(measured: dict[str, float]) -> Check:
    buf = os.urandom(1 << 20) * 64
    t0 = time.perf_counter()
    crc32c(buf)
    rate = len(buf) / (time.perf_counter() - t0) / 1e9
    measured["crc32c_gb_s"] = round(rate, 2)
    if rate < 1.0:
        return Check(
            "crc32c",
            "warn",
            f"{rate:.2f} GB/s: a software CRC; verifying costs CPU at the link's rate",
            "install a wheel with the compiled CRC (awscrt) for this CPU",
        )
    return Check("crc32c", "ok", f"compiled, {rate:.1f} GB/s on one core")


def _dest_checks(dest: Path, root: Path, model_bytes: int | None) -> list[Check]:
    out: list[Check] = []
    try:
        text = (root / "proc/self/mountinfo").read_text()
    except OSError:
        text = ""
    target = dest.resolve()
    while not target.exists() and target != target.parent:
        target = target.parent  # DEST may not exist yet: judge where it would be made
    mount = probes.mount_of(target, probes.parse_mountinfo(text))
    device = probes.device_of(mount, root / "sys") if mount else None
    kind, words = probes.classify(mount, device)
    verdicts: dict[str, tuple[Verdict, str]] = {
        "local-nvme": ("ok", ""),
        "local": ("ok", ""),
        "ram": (
            "warn",
            "RAM: the model counts against the pod's memory limit; fetch onto local NVMe "
            "(an emptyDir on local SSD) unless the node has RAM for it twice",
        ),
        "fuse": (
            "warn",
            "FUSE: every read and each mmap'd page of the weights goes through a userspace "
            "daemon (gcsfuse and the like); fetch onto local NVMe instead",
        ),
        "network-fs": ("warn", "a network filesystem: fetch onto local NVMe instead"),
        "network-disk": (
            "warn",
            "a network (persistent) disk: throughput capped by its provisioned limit; use "
            "local SSD / instance storage for the weights",
        ),
        "virtual-disk": ("info", "check whether this disk is local or network-backed"),
        "loop": ("warn", "a loop file: every write lands on another filesystem"),
        "rotational": ("warn", "a rotational disk"),
        "unknown": ("info", ""),
    }
    verdict, fix = verdicts[kind]
    out.append(Check("dest filesystem", verdict, f"{target}: {words}", fix))
    try:
        free = shutil.disk_usage(target).free
    except OSError as exc:
        return [*out, Check("free space", "fail", f"{target}: {exc.strerror}")]
    if model_bytes:
        if free < model_bytes:
            out.append(
                Check(
                    "free space",
                    "fail",
                    f"{free / 1e9:.2f} GB free for a {model_bytes / 1e9:.2f} GB model",
                    "a bigger local disk, or a smaller model",
                )
            )
        else:
            verdict = "warn" if free < 1.1 * model_bytes else "ok"
            out.append(
                Check(
                    "free space",
                    verdict,
                    f"{free / 1e9:.1f} GB free, model {model_bytes / 1e9:.1f} GB",
                )
            )
    else:
        out.append(
            Check("free space", "info", f"{free / 1e9:.1f} GB free (--model-bytes to judge)")
        )
    return out


def _shm_check(root: Path) -> Check:
    try:
        st = os.statvfs(root / "dev/shm")
    except OSError:
        return Check(
            "/dev/shm", "warn", "missing", "mount an emptyDir (medium: Memory) at /dev/shm"
        )
    size = st.f_blocks * st.f_frsize
    if size < SHM_MIN:
        return Check(
            "/dev/shm",
            "warn",
            f"{size / 2**20:.0f} MiB (Docker's default is 64 MiB): NCCL and tensor-parallel "
            "servers need more",
            "an emptyDir with medium: Memory (and a sizeLimit) at /dev/shm, or --shm-size",
        )
    return Check("/dev/shm", "ok", f"{size / 2**30:.1f} GiB")


def _nofile_check() -> Check:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < NOFILE_MIN:
        return Check(
            "open files",
            "warn",
            f"soft limit {soft} (hard {hard}): servers with many shards and sockets hit it",
            f"ulimit -n {min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536}",
        )
    return Check("open files", "ok", f"soft limit {soft}")


async def _pick_object(source: RangeSource, url: str) -> ObjectInfo:
    """The object the URL names, or the largest under its prefix (what fetch would read)."""
    u = parse_url(url)
    found = await lookup(source, u.scheme, u.key)
    if found.object is not None:
        return found.object
    if not found.objects:
        raise NotFound(f"{url}: no objects to measure")
    biggest = max(found.objects, key=lambda o: o.size)
    return await source.stat(biggest.key) if biggest.needs_stat else biggest


async def _throughput(source: RangeSource, info: ObjectInfo, streams: int, seconds: float) -> float:
    """MB/s of ``streams`` readers of 8 MiB ranges for ``seconds`` (offsets wrap)."""
    piece = min(8 << 20, max(1, info.size))
    got = 0
    deadline = time.monotonic() + seconds
    offsets = iter(range(0, 1 << 62, piece))

    async def reader() -> None:
        nonlocal got

        async def sink(data: bytes) -> None:
            nonlocal got
            got += len(data)

        while time.monotonic() < deadline:
            start = next(offsets) % max(1, info.size - piece + 1)
            await source.read(info, start, min(piece, info.size - start), sink)

    t0 = time.monotonic()
    await asyncio.gather(*(reader() for _ in range(streams)))
    return got / (time.monotonic() - t0) / 1e6


def _disk_write(dest: Path) -> float:
    """MB/s writing up to 256 MiB (an eighth of the free space at most) in 8 MiB pwrites,
    then fdatasync, in our state dir (no object name can collide with it)."""
    free = shutil.disk_usage(dest if dest.exists() else dest.parent).free
    budget = max(8 << 20, min(256 << 20, free // 8) // (8 << 20) * (8 << 20))
    dest.mkdir(parents=True, exist_ok=True)  # the user's DEST: may itself be a link
    # Our state directory, refused unless only we can write it, and a name created O_EXCL
    # in it with no link followed: a link planted at DEST/.spotstart or at our scratch name
    # never receives these bytes (safefs raises UnsafePath, or EEXIST for the name).
    state = safefs.private_dir_fd(dest, STATE_DIR, STATE_MODE)
    name = f"doctor-{os.getpid()}.tmp"
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=state)  # a killed doctor's, with our pid: ours to remove
        fd = safefs.create_exclusive(state, name)
        try:
            buf = mmap.mmap(-1, 8 << 20)
            buf.write(os.urandom(8 << 20))
            t0 = time.perf_counter()
            for off in range(0, budget, 8 << 20):
                os.pwrite(fd, buf, off)
            os.fdatasync(fd)
            return budget / (time.perf_counter() - t0) / 1e6
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=state)
    finally:
        os.close(state)


def _gpu_copy() -> float | None:
    """GB/s of pinned host-to-device copies, or None without torch or a GPU."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    host = torch.empty(256 << 20, dtype=torch.uint8).pin_memory()
    dev = torch.empty_like(host, device="cuda")
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(4):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    return 4 * host.numel() / (time.perf_counter() - t0) / 1e9


async def diagnose(
    dest: Path | None = None,
    source: str | None = None,
    model_bytes: int | None = None,
    *,
    root: Path = Path("/"),
    seconds: float = 4.0,
    config: FetchConfig | None = None,
) -> DoctorReport:
    """Every check and measurement this node allows; ``root`` is where the system's files
    are read (``/``; a fake tree in tests)."""
    report = DoctorReport()
    m = report.measured
    report.checks.append(_libc_check(root))
    report.checks.append(_crc_check(m))
    if dest is not None:
        report.checks.extend(_dest_checks(dest, root, model_bytes))
    report.checks.append(_shm_check(root))
    report.checks.append(_nofile_check())
    cpus = probes.usable_cpus(root)
    m["usable_cpus"] = round(cpus, 2)
    if source is not None:
        cfg = config or FetchConfig()
        src = source_for(parse_url(source), cfg)
        try:
            info = await _pick_object(src, source)
            one = await _throughput(src, info, 1, seconds / 2)
            many = await _throughput(src, info, 8, seconds / 2)
        finally:
            await src.close()
        m["link_one_stream_mb_s"] = round(one, 1)
        m["link_eight_streams_mb_s"] = round(many, 1)
        gain = many / one if one else 0.0
        report.checks.append(
            Check(
                "link to the source",
                "ok" if gain >= 2 or many >= 1000 else "info",
                f"one stream {one:.0f} MB/s, eight {many:.0f} MB/s ({gain:.1f}x): "
                + ("parallel ranged reads pay here" if gain >= 2 else "one stream nearly fills it"),
            )
        )
        need = many / 1e3 * CPU_S_PER_GB
        report.checks.append(
            Check(
                "cpu for fetch",
                "warn" if need > cpus else "ok",
                f"{need:.1f} CPUs to take {many:.0f} MB/s with CRC-32C; {cpus:g} usable",
                "more vCPUs for the pod (requests/limits), or expect the CPU to cap fetch"
                if need > cpus
                else "",
            )
        )
    if dest is not None and not report.blocking:
        try:
            m["disk_write_mb_s"] = round(await asyncio.to_thread(_disk_write, dest), 1)
        except OSError as exc:
            report.checks.append(Check("disk write", "fail", f"{dest}: {exc.strerror}"))
        except LocalIOError as exc:  # a link or a shared directory where our state goes
            report.checks.append(Check("disk write", "fail", str(exc), "remove it, then rerun"))
    gpu = await asyncio.to_thread(_gpu_copy)
    if gpu is not None:
        m["host_to_gpu_gb_s"] = round(gpu, 2)
    report.checks.append(
        Check("gpu", "info", f"host to device {gpu:.1f} GB/s" if gpu else "no GPU (or no torch)")
    )
    report.prediction = predict(m, model_bytes)
    if "disk_write_mb_s" in m and "link_eight_streams_mb_s" in m:
        disk, link = m["disk_write_mb_s"], m["link_eight_streams_mb_s"]
        report.checks.append(
            Check(
                "disk vs link",
                "warn" if disk < link else "ok",
                f"disk {disk:.0f} MB/s (fdatasync'd), link {link:.0f} MB/s",
                "local NVMe (RAID0 of several if one is slower than the link)"
                if disk < link
                else "",
            )
        )
    return report


def predict(m: dict[str, float], model_bytes: int | None) -> dict[str, Any]:
    """Fetch and load time of ``model_bytes`` from what was measured, and what limits each."""
    if not model_bytes:
        return {}
    limits = {
        "link": m.get("link_eight_streams_mb_s"),
        "cpu": m["usable_cpus"] / CPU_S_PER_GB * 1e3,
    }
    fetch_limits = {**limits, "disk": m.get("disk_write_mb_s")}
    load_limits = {**limits}
    if "host_to_gpu_gb_s" in m:
        load_limits["host to gpu"] = m["host_to_gpu_gb_s"] * 1e3
    out: dict[str, Any] = {"model_bytes": model_bytes}
    for what, lim in (("fetch", fetch_limits), ("load", load_limits)):
        known = {k: v for k, v in lim.items() if v}
        if "link" not in known:
            continue
        bottleneck = min(known, key=lambda k: known[k])
        out[f"{what}_s"] = round(model_bytes / (known[bottleneck] * 1e6), 1)
        out[f"{what}_bottleneck"] = bottleneck
    return out
