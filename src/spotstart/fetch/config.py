"""Configuration and results of a fetch: frozen, with units in the names."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from spotstart.fetch.metrics import TransferMetrics
from spotstart.fetch.peers import PeerSpec
from spotstart.store import HttpOptions


@dataclass(frozen=True)
class Concurrency:
    """How many ranged reads run at once. ``streams``: a fixed number; ``None`` starts at
    ``initial`` and grows by half while aggregate throughput grows by more than
    ``growth_threshold`` (measured every ``probe_interval_s``), up to ``max``; it halves on
    throttling (429/503)."""

    streams: int | None = None
    initial: int = 16
    max: int = 64
    growth_threshold: float = 0.08
    probe_interval_s: float = 0.5

    @property
    def start(self) -> int:
        return self.streams or self.initial

    @property
    def limit(self) -> int:
        return self.streams or self.max


@dataclass(frozen=True)
class Retry:
    """Each ranged read is tried ``max_attempts`` times, waiting full-jitter exponential
    backoff from ``backoff_base_s`` up to ``backoff_cap_s`` (``Retry-After`` honoured)."""

    max_attempts: int = 8
    backoff_base_s: float = 0.2
    backoff_cap_s: float = 10.0


@dataclass(frozen=True)
class Disk:
    """``write_queue_bytes``: bytes received and not yet written, at most (the writer's
    bounded queue). ``fsync``: make data durable against power loss (fdatasync before
    journaling, fsync before the rename). Off by default: the journal only lists chunks whose
    writes completed, which is enough to resume after the process is killed (the page cache
    survives), and a spot node's local NVMe does not survive the node. Costs ~30% of
    throughput here. ``direct_io``: the direct reader writes whole 4 KiB blocks with
    ``O_DIRECT`` where the filesystem takes it, so the bytes skip the page cache (no copy into
    it, no memory it has to find and later write back: ~0.05 vs ~0.2-2.5 CPU-s/GB here); off,
    everything goes through the page cache (what to want when the next reader of the files
    is on this node right away and RAM holds the model twice over)."""

    write_queue_bytes: int = 256 << 20
    fsync: bool = False
    direct_io: bool = True


@dataclass(frozen=True)
class FetchConfig:
    """How a fetch (or load) runs, in sections, each with its defaults in one place:
    ``http`` (the store transport's :class:`~spotstart.store.HttpOptions`: stall and connect
    timeouts, CA bundle), ``concurrency``, ``retry``, ``disk``.

    Memory bound: the bytes held in flight are at most
    ``disk.write_queue_bytes + concurrency.limit * 2 * 2 MiB`` (the writer's bounded queue plus
    aiohttp's per-stream read buffer), independent of ``chunk_bytes`` and of file sizes.

    - ``chunk_bytes``: size of one ranged read. Auto: 16 MiB (8-64 MiB reads reach the link
      limit on object stores; 256 MiB reads collapse throughput, see BENCH-NOTES), smaller
      for small objects so one object still spreads over several streams.
    - ``verify``: ``"auto"`` (default) checks the size and the strongest checksum the store
      gives for the object: its CRC (CRC-32C, CRC-64/NVME, CRC-32; computed per chunk as the
      bytes arrive, combined at the end: no reread), else its MD5 (hashed in order beside the
      transfer), else the size alone (reported as such). ``"size"``: the size only (no MD5
      pass; the per-chunk CRC still finds a bad chunk on a mismatch). ``"full"``: a content
      checksum is required (an object without one fails with exit 6, nothing kept) and it is
      computed again from the bytes where they landed, after the last write.
      ``verify_passes``: refetches of a file whose check failed, before giving up.
    - ``endpoint``/``anonymous``: talk to another endpoint (S3-compatible store, emulator);
      send unsigned requests (public buckets) instead of looking for credentials.
    - ``max_bytes``/``max_objects``: the most the URL may name (its objects' sizes as the
      store states them when fetch resolves it, and their count); more is a UsageError before
      anything is written. Every read stops at that stated size, so this bounds what a run
      writes, whatever the server answered to a stat made before (``spotstart plan``: one
      trace of 64 MiB at most). None: no limit.
    - ``wait``: a file another fetch into the same DEST is writing (its lock,
      ``DEST/.spotstart/parts/<hash>.lock``, is held: see fetch/lock.py) is waited for, then
      taken as current when that fetch finished it; False: fail at once with
      :class:`~spotstart.errors.DestinationBusy` (exit 17), nothing written.

    Example::

        FetchConfig(chunk_bytes=32 << 20, concurrency=Concurrency(streams=8),
                    retry=Retry(max_attempts=4), disk=Disk(fsync=True))
    """

    chunk_bytes: int | None = None
    http: HttpOptions = field(default_factory=HttpOptions)
    concurrency: Concurrency = field(default_factory=Concurrency)
    retry: Retry = field(default_factory=Retry)
    disk: Disk = field(default_factory=Disk)
    verify_passes: int = 2
    verify: Literal["auto", "size", "full"] = "auto"
    endpoint: str | None = None
    anonymous: bool = False
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    use_cache: bool = True
    peers: PeerSpec | None = None
    serve_peers: str | None = None  # HOST:PORT: serve DEST to peers while this runs
    serve_max_rate: float | None = None  # bytes/s served to peers, all together (None: no pace)
    max_bytes: int | None = None
    max_objects: int | None = None
    wait: bool = True  # another fetch writing one of DEST's files: wait (False: exit 17)


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
    chunks_direct: int = 0  # received by the direct reader (HttpOptions.direct_reads)
    bytes_from_peers: int = 0  # of bytes_transferred, those peers gave
    peers_dropped: dict[str, str] = field(default_factory=dict)  # address -> why
    bytes_served_to_peers: int = 0  # --serve-peers

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
