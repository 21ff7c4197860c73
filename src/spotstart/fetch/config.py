"""Configuration and results of a fetch: frozen, with units in the names."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from spotstart.fetch.metrics import TransferMetrics


@dataclass(frozen=True)
class FetchConfig:
    """How a fetch runs. ``None`` means "choose automatically".

    Memory bound: the bytes held in flight are at most
    ``write_queue_bytes + concurrency_max * 2 * 2 MiB`` (the writer's bounded queue plus
    aiohttp's per-stream read buffer), independent of ``chunk_bytes`` and of file sizes.

    - ``chunk_bytes``: size of one ranged read. Auto: 16 MiB (8-64 MiB reads reach the link
      limit on object stores; 256 MiB reads collapse throughput, see BENCH-NOTES), smaller
      for small objects so one object still spreads over several streams.
    - ``concurrency``: fixed number of concurrent streams; ``None`` starts at
      ``concurrency_initial`` and grows by half while aggregate throughput grows by more than
      ``growth_threshold``, up to ``concurrency_max``; it halves on throttling (429/503).
    - ``fsync``: make data durable against power loss (fdatasync before journaling, fsync before
      the rename). Off by default: the journal only lists chunks whose writes completed, which
      is enough to resume after the process is killed (the page cache survives), and a spot
      node's local NVMe does not survive the node. Costs ~30% of throughput here.
    - ``verify``: ``"auto"`` (default) checks the size and the strongest checksum the store
      gives for the object: its CRC (CRC-32C, CRC-64/NVME, CRC-32; computed per chunk as the
      bytes arrive, combined at the end: no reread), else its MD5 (hashed in order beside the
      transfer), else the size alone (reported as such). ``"size"``: the size only (no MD5
      pass; the per-chunk CRC still finds a bad chunk on a mismatch). ``"full"``: a content
      checksum is required (an object without one fails with exit 6, nothing kept) and it is
      computed again from the bytes where they landed, after the last write.
    - ``endpoint``/``anonymous``: talk to another endpoint (S3-compatible store, emulator);
      send unsigned requests (public buckets) instead of looking for credentials.
    """

    chunk_bytes: int | None = None
    concurrency: int | None = None
    concurrency_initial: int = 16
    concurrency_max: int = 64
    growth_threshold: float = 0.08
    probe_interval_s: float = 0.5
    write_queue_bytes: int = 256 << 20
    max_attempts: int = 8
    backoff_base_s: float = 0.2
    backoff_cap_s: float = 10.0
    stall_timeout_s: float = 20.0
    connect_timeout_s: float = 10.0
    verify_passes: int = 2
    verify: Literal["auto", "size", "full"] = "auto"
    fsync: bool = False
    endpoint: str | None = None
    anonymous: bool = False
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    use_cache: bool = True


@dataclass(frozen=True)
class FileResult:
    """What happened to one object."""

    key: str
    path: str
    bytes_total: int
    bytes_transferred: int
    bytes_resumed: int
    cached: bool
    verified: tuple[str, ...]


@dataclass(frozen=True)
class FetchReport:
    """Summary of one fetch. ``bytes_transferred`` counts bytes received from the network in
    this run (refetches included); ``bytes_resumed`` were already on disk from an interrupted
    run; ``bytes_cached`` belong to files that were already complete and current."""

    source: str
    dest: str
    files_total: int
    files_fetched: int
    files_cached: int
    bytes_total: int
    bytes_transferred: int
    bytes_resumed: int
    bytes_cached: int
    seconds: float
    mb_per_s: float
    retries: int
    stalls: int
    refetched_chunks: int
    verified: dict[str, int]
    concurrency_final: int
    chunk_bytes: int
    files: tuple[FileResult, ...] = field(default=(), repr=False)

    def metrics(self) -> TransferMetrics:
        """This run as Prometheus samples (``.samples()``) or a registry (``.registry()``)."""
        return TransferMetrics(
            part="fetch",
            source=self.source,
            bytes_total=self.bytes_total,
            bytes_transferred=self.bytes_transferred,
            bytes_from_cache=self.bytes_cached + self.bytes_resumed,
            seconds=self.seconds,
            files=self.files_total,
            retries=self.retries,
            stalls=self.stalls,
            refetched_chunks=self.refetched_chunks,
            verified=dict(self.verified),
        )

    def to_json(self) -> dict[str, object]:
        """The machine summary printed by ``spotstart fetch --json``."""
        out = {k: v for k, v in self.__dict__.items() if k != "files"}
        out["files"] = [f.__dict__ for f in self.files]
        return out
