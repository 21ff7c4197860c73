"""Timing one tool run: wall clock, CPU of its process tree, a hard timeout, cold page cache.

Not statistics (see report.py) and not tool knowledge (see tools.py).
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from tools import Invocation, base_env

_TAIL_CHARS = 2000


@dataclass(frozen=True)
class ProcessRun:
    wall_s: float
    cpu_s: float  # user + system of the tool and every descendant it reaped
    returncode: int | None  # None = killed by our timeout
    stdout: str
    stderr_tail: str

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def drop_caches() -> bool:
    """Flush dirty pages and drop the page cache so every run reads the servers' files cold."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_process(inv: Invocation, timeout_s: float, cwd: Path) -> ProcessRun:
    """Run ``inv`` in its own process group; kill the whole group at ``timeout_s``.

    CPU comes from RUSAGE_CHILDREN deltas: it counts the tool and every descendant that was
    waited for (gsutil/gcloud worker processes are). Only one tool runs at a time, so the delta
    is that tool's.
    """
    cpu_before = _children_cpu_s()
    start = time.perf_counter()
    proc = subprocess.Popen(
        inv.argv,
        env=inv.env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    returncode: int | None
    try:
        stdout_b, stderr_b = proc.communicate(timeout=timeout_s)
        returncode = proc.returncode
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        stdout_b, stderr_b = proc.communicate()
        returncode = None
    wall_s = time.perf_counter() - start
    # workers a killed tool left behind belong to its group: take them down too
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    cpu_s = _children_cpu_s() - cpu_before
    stdout = stdout_b.decode("utf-8", "replace")
    stderr = stderr_b.decode("utf-8", "replace")
    return ProcessRun(wall_s, cpu_s, returncode, stdout[-20000:], stderr[-_TAIL_CHARS:])


@dataclass(frozen=True)
class Ceiling:
    label: str
    streams: int
    bytes_total: int
    seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.bytes_total / self.seconds / 1e6


def measure_ceiling(
    base_url: str, bucket: str, keys: list[str], sizes: list[int], streams: int, label: str
) -> Ceiling:
    """``streams`` parallel curl range reads of the shards to /dev/null: the server (and relay)
    throughput with no tool and no disk in the way."""
    ranges: list[tuple[str, int, int]] = []
    per_key = max(1, streams // max(1, len(keys)))
    for key, size in zip(keys, sizes, strict=True):
        step = -(-size // per_key)
        ranges += [(key, lo, min(size, lo + step) - 1) for lo in range(0, size, step)]
    drop_caches()
    start = time.perf_counter()
    procs = []
    for key, lo, hi in ranges:
        # the JSON API media URL: fake-gcs answers /bucket/key only when Host is its public host
        url = (
            f"{base_url}/download/storage/v1/b/{bucket}/o/"
            f"{urllib.parse.quote(key, safe='')}?alt=media"
        )
        argv = ["curl", "-sS", "--fail", "-o", "/dev/null", "-w", "%{size_download}"]
        argv += ["-r", f"{lo}-{hi}", url]
        procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, env=base_env()))
    total = 0
    for p in procs:
        out, _ = p.communicate(timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"curl exited {p.returncode} reading {base_url}")
        total += int(out.decode().strip() or 0)
    return Ceiling(label, len(ranges), total, time.perf_counter() - start)
