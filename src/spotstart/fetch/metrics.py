"""Prometheus metrics of one transfer, fetch or load, named as guard's are
(``spotstart_<part>_...``): a node-exporter textfile (``--metrics-textfile``, written
atomically, as node-exporter's textfile collector wants) or plain samples for the Python API.
A failed run writes its exit code and failure time, so an alert sees it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from spotstart import safefs
from spotstart.errors import UsageError

if TYPE_CHECKING:  # imported where used: 30 ms of every fetch's start otherwise
    from prometheus_client import CollectorRegistry


@dataclass(frozen=True)
class TransferMetrics:
    """The numbers of one run. ``part``: "fetch" or "load"; ``exit_code`` 0 on success."""

    part: str
    source: str
    exit_code: int = 0
    bytes_total: int = 0
    bytes_transferred: int = 0
    bytes_from_cache: int = 0
    seconds: float = 0.0
    files: int = 0
    retries: int = 0
    stalls: int = 0
    refetched_chunks: int = 0
    verified: dict[str, int] = field(default_factory=dict)
    finished_unix: float = field(default_factory=time.time)

    def samples(self) -> dict[str, float]:
        """``{"spotstart_fetch_bytes_transferred_total": 1.0e9, ...}`` (labels left out; the
        verified counts as ``spotstart_fetch_verified_files:crc32c``)."""
        p = f"spotstart_{self.part}"
        out: dict[str, float] = {f"{p}_exit_code": self.exit_code}
        if self.exit_code:
            out[f"{p}_last_failure_timestamp_seconds"] = self.finished_unix
            return out
        out |= {
            f"{p}_bytes": self.bytes_total,
            f"{p}_bytes_transferred_total": self.bytes_transferred,
            f"{p}_bytes_from_cache_total": self.bytes_from_cache,
            f"{p}_seconds": self.seconds,
            f"{p}_throughput_bytes_per_second": (
                self.bytes_transferred / self.seconds if self.seconds > 0 else 0.0
            ),
            f"{p}_files": self.files,
            f"{p}_retries_total": self.retries,
            f"{p}_stalls_total": self.stalls,
            f"{p}_refetched_chunks_total": self.refetched_chunks,
            f"{p}_last_success_timestamp_seconds": self.finished_unix,
        }
        for kind, n in self.verified.items():
            out[f"{p}_verified_files:{kind}"] = n
        return out

    def registry(self) -> CollectorRegistry:
        from prometheus_client import CollectorRegistry, Gauge

        registry = CollectorRegistry(auto_describe=True)
        gauges: dict[str, Gauge] = {}
        for name, value in self.samples().items():
            metric, _, kind = name.partition(":")
            labels = ["source", "kind"] if kind else ["source"]
            if metric not in gauges:
                gauges[metric] = Gauge(
                    metric, _HELP.get(metric.split("_", 2)[2], metric), labels, registry=registry
                )
            values = {"source": self.source, **({"kind": kind} if kind else {})}
            gauges[metric].labels(**values).set(value)
        return registry


_HELP = {
    "exit_code": "exit code of the last run (0 success; see spotstart --help)",
    "last_failure_timestamp_seconds": "when the last run failed (unix seconds)",
    "bytes": "bytes of the objects of the last run",
    "bytes_transferred_total": "bytes received from the network in the last run",
    "bytes_from_cache_total": "bytes already on local disk (current, resumed or cached)",
    "seconds": "duration of the last run",
    "throughput_bytes_per_second": "bytes received per second in the last run",
    "files": "objects in the last run",
    "retries_total": "ranged reads retried in the last run",
    "stalls_total": "streams abandoned for stalling in the last run",
    "refetched_chunks_total": "chunks fetched again after a checksum mismatch",
    "last_success_timestamp_seconds": "when the last run succeeded (unix seconds)",
    "verified_files": "objects verified, by check",
}


def check_textfile_path(path: str) -> Path:
    """node-exporter's textfile collector reads ``*.prom`` only: refuse another name early."""
    p = Path(path)
    if p.suffix != ".prom":
        raise UsageError(f"--metrics-textfile {path}: node-exporter reads only *.prom files")
    if not p.parent.is_dir():
        raise UsageError(f"--metrics-textfile {path}: no directory {p.parent}")
    return p


def write_textfile(path: Path, metrics: TransferMetrics) -> None:
    """Write atomically (a temporary file renamed into place), as the collector requires, and
    never through a link (:func:`spotstart.safefs.write_output`: the collector's directory is
    often shared, and prometheus_client's own writer opens a guessable temporary name)."""
    from prometheus_client import generate_latest

    safefs.write_output(
        path, generate_latest(metrics.registry()), label=f"--metrics-textfile {path}"
    )
