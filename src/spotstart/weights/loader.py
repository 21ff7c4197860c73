"""Loading safetensors checkpoints into torch tensors while the bytes still arrive.

Each shard's header comes from one small ranged read; then every destination tensor is
allocated up front (one flat buffer per shard, tensors are views into it) and the fetch
engine fills it from concurrent ranged reads, through a bounded queue of copies: memory beyond
the tensors themselves stays at ``FetchConfig.write_queue_bytes`` plus the streams' socket
buffers. With ``cache_dir`` every byte is also written through to local disk (verified,
atomic), and a later load of the same object versions reads the local copy instead.
Not a model-building library: it returns tensors or fills a module you built."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote, urljoin, urlsplit

from spotstart import events, safefs
from spotstart.errors import InvalidCheckpoint, NotFound, UnsafePath, UsageError
from spotstart.fetch import FetchConfig, NullProgress, ProgressListener, layout
from spotstart.fetch.cache import CacheIndex
from spotstart.fetch.metrics import TransferMetrics
from spotstart.fetch.scheduler import (
    TransferFile,
    TransferScheduler,
    count_verified,
    record_in,
    source_for,
)
from spotstart.fetch.target import DiskTarget, FileTarget, Window, pwrite_all
from spotstart.fetch.verify import CrcAlgorithm
from spotstart.fetch.writer import DiskWriter
from spotstart.store import ObjectInfo, SinkError, parse_url
from spotstart.weights import format as fmt
from spotstart.weights import tp as tp_plan

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
INDEX_NAME = "model.safetensors.index.json"
HEADER_PROBE_BYTES = 1 << 20  # one read gets the header of nearly every real shard


@dataclass(frozen=True)
class LoadReport:
    """What one load did. ``seconds`` runs from the first request to the last tensor ready."""

    source: str
    device: str
    files: int
    tensors: int
    bytes_total: int
    bytes_transferred: int
    bytes_from_cache: int
    seconds: float
    mb_per_s: float
    retries: int
    verified: dict[str, int] = field(default_factory=dict)
    refetched_chunks: int = 0
    tp: str = ""  # "rank/world" when only a rank's slices were read
    bytes_rank: int = 0  # the bytes of this rank's tensors (== bytes_total without tp)
    bytes_from_peers: int = 0  # of bytes_transferred, those peers gave (config.peers)
    peers_dropped: dict[str, str] = field(default_factory=dict)

    def metrics(self) -> TransferMetrics:
        """This run as Prometheus samples (``.samples()``) or a registry (``.registry()``)."""
        return TransferMetrics(
            part="load",
            source=self.source,
            bytes_total=self.bytes_total,
            bytes_transferred=self.bytes_transferred,
            bytes_from_cache=self.bytes_from_cache,
            seconds=self.seconds,
            files=self.files,
            retries=self.retries,
            refetched_chunks=self.refetched_chunks,
            verified=dict(self.verified),
        )

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise UsageError("spotstart load needs PyTorch: pip install 'spotstart[torch]'") from exc
    return torch


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name; InvalidCheckpoint if torch lacks it."""
    torch = _torch()
    table = {
        "BOOL": "bool",
        "U8": "uint8",
        "I8": "int8",
        "I16": "int16",
        "U16": "uint16",
        "I32": "int32",
        "U32": "uint32",
        "I64": "int64",
        "U64": "uint64",
        "F16": "float16",
        "BF16": "bfloat16",
        "F32": "float32",
        "F64": "float64",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
        "F8_E8M0": "float8_e8m0fnu",
    }
    attr = table.get(name)
    dtype = getattr(torch, attr, None) if attr else None
    if dtype is None:
        raise InvalidCheckpoint(
            f"dtype {name} has no torch equivalent in torch {torch.__version__}"
        )
    return dtype  # type: ignore[no-any-return]


def parse_device(device: str) -> torch.device:
    torch = _torch()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UsageError(f"{device!r}: not a device (use cpu, cuda, cuda:N)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"{device}: CUDA is not available on this machine (no GPU or no "
            "CUDA build of torch); load to cpu instead"
        )
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"{device}: only cpu and cuda devices are supported")
    return dev  # type: ignore[no-any-return]


class TeeWindow(Window):
    """A tensor window whose landed bytes are also written, from the tensor memory, to the
    write-through cache's part file at the same offset (once the chunk is complete, on the
    reader's thread, before its CRC is handed back: the chunk counts as done only then)."""

    def __init__(self, fd: int, offset: int, *segments: memoryview) -> None:
        super().__init__(*segments)
        self.fd, self.offset = fd, offset

    def crc(self, algorithm: CrcAlgorithm) -> int:
        crc = super().crc(algorithm)
        at = self.offset
        try:
            for seg in self.segments:
                pwrite_all(self.fd, seg, at)
                at += seg.nbytes
        except OSError as exc:
            raise SinkError(exc) from exc
        return crc


class TensorMemoryTarget:
    """What every in-memory target of a shard shares (a FileTarget whose bytes land in
    tensor memory, with a :class:`DiskTarget` that may ride along as the write-through
    cache): the disk copy's part of each step, the landing window, and copies through the
    scheduler's writer. Subclasses say where bytes go: ``_copy`` and ``window``."""

    def __init__(
        self,
        writer: DiskWriter | None,
        header: fmt.SafetensorsHeader,
        disk: DiskTarget | None,
        prefix: bytes,
    ) -> None:
        self.writer = writer
        self.header = header
        self.prefix = prefix[: header.data_start]  # length word + JSON header, for MD5
        self.disk = disk
        self.finished = False

    def open(self) -> dict[int, int]:
        # Resuming into memory is impossible; the disk copy restarts too so both agree.
        if self.disk is not None:
            self.disk.part.discard()
            self.disk.open()
        return {}

    @property
    def is_open(self) -> bool:
        return not self.finished

    async def write(self, offset: int, pieces: list[bytes]) -> asyncio.Future[None]:
        n = sum(len(p) for p in pieces)
        futures: list[asyncio.Future[None]] = []
        if self.disk is not None:
            futures.append(await self.disk.write(offset, pieces))
        assert self.writer is not None
        futures.append(await self.writer.submit(n, self._copy, offset, pieces))
        return asyncio.ensure_future(all_of(futures))

    def _copy(self, offset: int, pieces: list[bytes]) -> None:
        raise NotImplementedError

    def landing(self, offset: int, segments: list[memoryview]) -> Window:
        """The window over ``segments`` (the chunk at ``offset``), teed to the cache copy."""
        if self.disk is not None:
            return TeeWindow(self.disk.fd, offset, *segments)
        return Window(*segments)

    def header_bytes(self, offset: int, length: int) -> bytes:
        """The part of ``[offset, offset+length)`` that is the header (for MD5)."""
        start = self.header.data_start
        return self.prefix[offset : min(offset + length, start)] if offset < start else b""

    def stored_size(self) -> int:
        return self.header.data_start + self.header.data_bytes

    def commit(self, chunks: dict[int, int]) -> None:
        if self.disk is not None:
            self.disk.commit(chunks)

    def finish(self) -> None:
        if self.disk is not None:
            self.disk.finish()
        self.finished = True

    def discard(self) -> None:
        if self.disk is not None:
            self.disk.discard()
        self.finished = True

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()


class ShardTarget(TensorMemoryTarget):
    """A shard's bytes in memory: the data region lands in one flat uint8 buffer (pinned
    host memory staged to the GPU when the device is CUDA); the header bytes are skipped. A
    :class:`DiskTarget` may ride along (write-through cache)."""

    def __init__(
        self,
        writer: DiskWriter | None,
        header: fmt.SafetensorsHeader,
        device: torch.device,
        disk: DiskTarget | None,
        prefix: bytes,
    ) -> None:
        super().__init__(writer, header, disk, prefix)
        torch = _torch()
        self.device = device
        self.flat = torch.empty(header.data_bytes, dtype=torch.uint8, device=device)
        self._host = None if device.type == "cpu" else _Staging(device)
        self._view = self.flat.numpy() if device.type == "cpu" else None

    def _copy(self, offset: int, pieces: list[bytes]) -> None:
        import numpy as np

        start = self.header.data_start
        pos = offset
        for piece in pieces:
            lo = max(pos, start)
            hi = pos + len(piece)
            if hi > lo:
                src = np.frombuffer(piece, dtype=np.uint8)[lo - pos :]
                if self._view is not None:
                    self._view[lo - start : hi - start] = src  # numpy copies without the GIL
                else:
                    assert self._host is not None
                    self._host.copy(self.flat, lo - start, src)
            pos = hi

    def window(
        self, offset: int, length: int, algorithm: CrcAlgorithm, *, reread: bool = False
    ) -> Window | None:
        """The tensor memory for ``[offset, offset+length)`` of the file, for the direct
        reader (and peers) to receive into (CPU only): header bytes land in a scratch segment;
        with a write-through cache the landed chunk is then written to the cache's part file
        from the tensor memory (:class:`TeeWindow`)."""
        start = self.header.data_start
        if self._view is None or length <= 0:
            return None
        skip = min(length, max(0, start - offset))  # header bytes: a scratch segment
        lo = max(offset, start) - start
        tensors = memoryview(self._view)[lo : offset + length - start] if length > skip else None
        segments = [memoryview(bytearray(skip))] if skip else []
        return self.landing(offset, [*segments, *([tensors] if tensors is not None else [])])

    def read(self, offset: int, length: int) -> bytes:
        if self.disk is not None:
            return self.disk.read(offset, length)
        start = self.header.data_start
        out = self.header_bytes(offset, length)
        lo, hi = max(offset, start) - start, offset + length - start
        if hi > lo:
            out += self.flat[lo:hi].cpu().numpy().tobytes()
        return out

    def fill_from_file(self, path: Path, fd: int, threads: int = 4) -> None:
        """Read the data region of a local copy (open at ``fd``, named ``path`` in errors)
        straight into the buffer (preadv into the tensor memory: no intermediate copy on
        CPU). The caller closes ``fd``."""
        from concurrent.futures import ThreadPoolExecutor

        start, size = self.header.data_start, self.header.data_bytes
        piece = 16 << 20
        host = (
            self.flat
            if self.device.type == "cpu"
            else _torch().empty(size, dtype=_torch().uint8, pin_memory=True)
        )
        view = memoryview(host.numpy())

        def one(off: int) -> None:
            n = min(piece, size - off)
            got = os.preadv(fd, [view[off : off + n]], start + off)
            if got != n:
                raise InvalidCheckpoint(f"{path}: shorter than its header says (truncated)")

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, range(0, size, piece)))
        if host is not self.flat:
            self.flat.copy_(host)
        self.finished = True

    def finish(self) -> None:
        if self._host is not None:
            self._host.drain()
        super().finish()


async def all_of(futures: list[asyncio.Future[None]]) -> None:
    """Wait for every one of ``futures`` (a target's write future over several writes)."""
    await asyncio.gather(*futures)


class _Staging:
    """Host -> GPU copies through a small pool of pinned buffers on a side stream, so the
    copy of one batch overlaps the network reads of the next. Called on the writer's threads;
    a buffer goes back to the pool once its copy's event has completed, which bounds pinned
    memory to ``buffers x buffer_bytes``."""

    def __init__(self, device: torch.device, buffers: int = 4, buffer_bytes: int = 8 << 20) -> None:
        import queue

        torch = _torch()
        self.torch = torch
        self.stream = torch.cuda.Stream(device=device)
        self.buffer_bytes = buffer_bytes
        self.pool: queue.Queue[Any] = queue.Queue()
        for _ in range(buffers):
            self.pool.put(torch.empty(buffer_bytes, dtype=torch.uint8, pin_memory=True))

    def copy(self, flat: torch.Tensor, at: int, src: Any) -> None:
        torch = self.torch
        for off in range(0, len(src), self.buffer_bytes):
            part = src[off : off + self.buffer_bytes]
            n = len(part)
            pinned = self.pool.get()
            try:
                pinned.numpy()[:n] = part
                with torch.cuda.stream(self.stream):
                    flat[at + off : at + off + n].copy_(pinned[:n], non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(self.stream)
                event.synchronize()
            finally:
                self.pool.put(pinned)

    def drain(self) -> None:
        self.stream.synchronize()


def _tensors_of(target: ShardTarget, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    th = _torch()
    out: dict[str, torch.Tensor] = {}
    for spec in target.header.tensors:
        tdt = torch_dtype(spec.dtype)
        raw = target.flat[spec.begin : spec.end]
        item = th.empty((), dtype=tdt).element_size()
        if spec.begin % item:
            raw = raw.clone()  # misaligned in the file: one copy of this tensor only
        t = raw.view(tdt).reshape(spec.shape)
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        out[spec.name] = t
    return out


@dataclass
class _Shard:
    info: ObjectInfo
    rel: str
    header: fmt.SafetensorsHeader | None = None
    prefix: bytes = b""
    target: ShardTarget | None = None


class Loader:
    """One load. Use :func:`load` / :func:`load_async` / :func:`load_into`."""

    def __init__(
        self,
        src: str,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        config: FetchConfig | None = None,
        progress: ProgressListener | None = None,
        tp: tuple[int, int] | None = None,
        split: tp_plan.SplitRule | None = None,
    ) -> None:
        self.url = parse_url(src)
        self.tp = tp
        self.split = split or tp_plan.default_split
        if tp is not None:
            tp_plan.plan([], *tp)  # a bad rank/world is refused before any request
        self.device = parse_device(device)
        self.dtype = dtype
        # Resolved once (the user's own link is fine); beneath it nothing follows a link.
        self.cache_dir = Path(os.path.realpath(cache_dir)) if cache_dir is not None else None
        self.config = config or FetchConfig()
        self.progress = progress or NullProgress()
        self._t0 = 0.0  # time.monotonic() when the load began (_with_shards)

    async def run(self) -> tuple[dict[str, torch.Tensor], LoadReport]:
        started = time.time()
        tensors, report = await self._with_shards(self._load)
        record_load(started, report, "to")
        return tensors, report

    async def _with_shards(
        self,
        body: Callable[[TransferScheduler, list[_Shard], fmt.ShardIndex | None], Awaitable[T]],
    ) -> T:
        """Run ``body(scheduler, shards, index)`` with this load's scheduler and its shards
        resolved (placed in the cache directory, held from their first use), then close the
        scheduler and the source. The load's time (``seconds``) runs from here."""
        self._t0 = time.monotonic()
        source = source_for(self.url, self.config)
        scheduler = TransferScheduler(source, self.url, self.config, self.progress)
        try:
            shards, index = await self._resolve(scheduler)
            with contextlib.ExitStack() as held:
                if self.cache_dir is not None:
                    self._place_in_cache(scheduler, shards, self.cache_dir)
                    # resolved once, then held from its first use: a name swapped for a
                    # link mid-run redirects no shard (safefs.pinned_root)
                    held.enter_context(safefs.pinned_root(self.cache_dir))
                return await body(scheduler, shards, index)
        finally:
            scheduler.close()
            await source.close()

    async def _resolve(
        self, scheduler: TransferScheduler
    ) -> tuple[list[_Shard], fmt.ShardIndex | None]:
        """The shards to load and the index that names them (if any): a ``.safetensors``
        object, an ``*.index.json`` (shards relative to it, for every store), or a prefix
        holding a ``model.safetensors.index.json`` or else top-level ``*.safetensors``. Every
        shard is described as ``stat`` does (checksums too), as fetch does."""
        url = self.url
        if url.scheme in ("http", "https"):
            path = urlsplit(url.key).path
            info = await scheduler.stat(url.key)
            if path.endswith(".index.json"):
                return await self._from_index(scheduler, info, lambda n: urljoin(url.key, quote(n)))
            return [_Shard(info, path.rstrip("/").rsplit("/", 1)[-1] or "model.safetensors")], None
        key = url.key.lstrip("/") if url.scheme == "file" else url.key
        if key.endswith(".safetensors"):
            return [_Shard(await scheduler.stat(key), key.rsplit("/", 1)[-1])], None
        if key.endswith(".index.json"):
            base = key[: key.rfind("/") + 1]
            return await self._from_index(scheduler, await scheduler.stat(key), lambda n: base + n)
        prefix = key if not key or key.endswith("/") else key + "/"
        objects = {o.key: o for o in await scheduler.list_objects(prefix)}
        if not objects:
            raise NotFound(f"{url}: no such object or prefix")
        index_obj = objects.get(prefix + INDEX_NAME)
        if index_obj is not None:
            return await self._from_index(scheduler, index_obj, lambda n: prefix + n, objects)
        listed = [
            (o, k[len(prefix) :])
            for k, o in sorted(objects.items())
            if k.endswith(".safetensors") and "/" not in k[len(prefix) :]
        ]
        if not listed:
            raise NotFound(f"{url}: no .safetensors files and no {INDEX_NAME}")
        infos = await scheduler.complete([o for o, _ in listed])
        return [_Shard(i, rel) for i, (_, rel) in zip(infos, listed, strict=True)], None

    async def _from_index(
        self,
        scheduler: TransferScheduler,
        index_obj: ObjectInfo,
        shard_key: Callable[[str], str],
        listed: dict[str, ObjectInfo] | None = None,
    ) -> tuple[list[_Shard], fmt.ShardIndex]:
        raw = await scheduler.read_bytes(index_obj, 0, index_obj.size)
        index = fmt.parse_index(raw, scheduler.display_of(index_obj))
        names = sorted(set(index.weight_map.values()))

        async def one(name: str) -> ObjectInfo:
            key = shard_key(name)
            if listed is not None:
                if key in listed:
                    return listed[key]
            else:
                with contextlib.suppress(NotFound):
                    return await scheduler.stat(key)
            raise InvalidCheckpoint(
                f"{scheduler.display_of(index_obj)}: names shard {name} which is missing "
                f"from {self.url}"
            )

        infos = await scheduler.complete(list(await asyncio.gather(*(one(n) for n in names))))
        return [_Shard(i, n) for i, n in zip(infos, names, strict=True)], index

    def _place_in_cache(
        self, scheduler: TransferScheduler, shards: list[_Shard], cache_dir: Path
    ) -> None:
        """Shard names come from a listing or an index: untrusted. Each needs a path of its
        own in ``cache_dir``, away from spotstart's working files, as fetch places into DEST."""
        placed = layout.place_objects([(s.info, s.rel) for s in shards], cache_dir, str(self.url))
        for shard, (_, rel) in zip(shards, placed, strict=True):
            shard.rel = rel

    def _name(self, shard: _Shard) -> str:
        text = str(self.url)
        return text if text.endswith(shard.rel) else f"{text.rstrip('/')}/{shard.rel}"

    async def _header(self, scheduler: TransferScheduler, shard: _Shard) -> None:
        name = self._name(shard)
        probe = await scheduler.read_bytes(shard.info, 0, HEADER_PROBE_BYTES)
        n = fmt.header_length(probe, shard.info.size, name)
        if len(probe) < 8 + n:
            probe += await scheduler.read_bytes(shard.info, len(probe), 8 + n - len(probe))
        shard.header = fmt.parse_header(probe[8 : 8 + n], shard.info.size, name)
        shard.prefix = probe[: 8 + n]

    async def _read_headers(
        self, scheduler: TransferScheduler, shards: list[_Shard], index: fmt.ShardIndex | None
    ) -> None:
        """Every shard's header, checked against the index and each other (a tensor name in
        two shards is refused)."""
        await asyncio.gather(*(self._header(scheduler, s) for s in shards))
        if index is not None:
            fmt.check_shards(index, {s.rel: s.header for s in shards if s.header is not None})
        names: set[str] = set()
        for s in shards:
            assert s.header is not None
            for spec in s.header.tensors:
                if spec.name in names:
                    raise InvalidCheckpoint(f"{s.rel}: tensor {spec.name} appears in two shards")
                names.add(spec.name)

    def _local_path(
        self, scheduler: TransferScheduler, shard: _Shard, cache: CacheIndex | None
    ) -> Path | None:
        """The local file to read instead of the network: a file:// source itself, or a
        current copy in ``cache_dir``."""
        if self.url.scheme == "file":
            return Path("/" + shard.info.key.lstrip("/"))
        if cache is None or self.cache_dir is None:
            return None
        path = self.cache_dir / shard.rel
        if cache.is_current(
            shard.rel, scheduler.display_of(shard.info), shard.info.version, shard.info.size, path
        ):
            return path
        return None

    def _open_local(self, path: Path, size: int) -> int:
        """A descriptor of the local copy :meth:`_local_path` chose. A copy in the cache
        directory is opened beneath it with no link followed and judged again on the
        descriptor (a regular file of ours, or root's, of the shard's size): between the
        index's check and this open, a user who can write a subdirectory could swap the
        name for a link to bytes of theirs or a FIFO (O_NONBLOCK: refused, not waited on).
        A file:// source is the user's own path."""
        if self.url.scheme == "file" or self.cache_dir is None:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fd = safefs.open_beneath(
                self.cache_dir, os.path.relpath(path, self.cache_dir), os.O_RDONLY | os.O_NONBLOCK
            )
        except OSError as exc:
            raise UnsafePath(
                f"{path}: the cached copy changed as it was opened ({exc.strerror}); nothing "
                "beneath the cache directory is followed through a link: check who else "
                "writes there, and rerun"
            ) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid not in (os.geteuid(), 0) or st.st_size != size:
            os.close(fd)
            raise UnsafePath(
                f"{path}: the cached copy changed as it was opened (not a regular file of "
                "ours of its size): check who else writes the cache directory, and rerun"
            )
        return fd

    async def _prepare(
        self, scheduler: TransferScheduler, shards: list[_Shard], index: fmt.ShardIndex | None
    ) -> tuple[CacheIndex | None, dict[str, Path | None], int]:
        """The cache index (with ``cache_dir``), each shard's local copy (or None: fetch
        it), every header read and checked, and the bytes of all shards."""
        cache = CacheIndex(self.cache_dir) if self.cache_dir is not None else None
        local = {s.rel: self._local_path(scheduler, s, cache) for s in shards}
        await self._read_headers(scheduler, shards, index)
        return cache, local, sum(s.info.size for s in shards)

    def _plan_files(
        self,
        scheduler: TransferScheduler,
        remote: list[_Shard],
        cache: CacheIndex | None,
        make_target: Callable[[TransferScheduler, _Shard], Callable[[TransferFile], FileTarget]],
    ) -> list[TransferFile]:
        """The transfer of each shard to fetch, recorded in ``cache`` once verified."""
        return [
            scheduler.plan_file(
                s.info,
                s.rel,
                make_target(scheduler, s),
                record_in(cache) if cache is not None else None,
                local_path=self.cache_dir / s.rel if self.cache_dir is not None else None,
            )
            for s in remote
        ]

    def _disk_target(
        self, scheduler: TransferScheduler, shard: _Shard, f: TransferFile
    ) -> DiskTarget | None:
        """The write-through copy of ``shard`` in ``cache_dir``, if there is one."""
        if self.cache_dir is None:
            return None
        return DiskTarget(
            self.cache_dir / shard.rel,
            f.journal_header(),
            scheduler.writer,
            fsync=self.config.disk.fsync,
            work=layout.work_paths(self.cache_dir, shard.rel),
        )

    def _report(
        self,
        scheduler: TransferScheduler,
        shards: list[_Shard],
        files: list[TransferFile],
        from_disk: list[_Shard],
        tensors: int,
        total: int,
    ) -> LoadReport:
        """What a whole-checkpoint load (all of every tensor) did, from its transfer."""
        seconds = time.monotonic() - self._t0
        c = scheduler.counters
        return LoadReport(
            source=str(self.url),
            device=str(self.device),
            files=len(shards),
            tensors=tensors,
            bytes_total=total,
            bytes_transferred=c.bytes_transferred,
            bytes_from_cache=sum(s.info.size for s in from_disk),
            seconds=round(seconds, 3),
            mb_per_s=round(total / seconds / 1e6, 1) if seconds > 0 else 0.0,
            retries=c.retries,
            verified=count_verified(files),
            refetched_chunks=c.refetched_chunks,
            bytes_rank=total,
            bytes_from_peers=c.bytes_from_peers,
            peers_dropped=scheduler.peers.dropped() if scheduler.peers else {},
        )

    async def _load(
        self,
        scheduler: TransferScheduler,
        shards: list[_Shard],
        index: fmt.ShardIndex | None,
    ) -> tuple[dict[str, torch.Tensor], LoadReport]:
        cache, local, total = await self._prepare(scheduler, shards, index)
        if self.tp is not None:
            return await self._load_slices(scheduler, shards, local, total)
        self.progress.on_start(files_total=len(shards), bytes_total=total, bytes_done=0)
        remote = [s for s in shards if local[s.rel] is None]
        from_disk = [s for s in shards if local[s.rel] is not None]
        files = self._plan_files(scheduler, remote, cache, self._make_target)

        async def read_local(s: _Shard) -> None:
            assert s.header is not None
            s.target = ShardTarget(None, s.header, self.device, None, s.prefix)
            path = local[s.rel]
            assert path is not None
            fd = self._open_local(path, s.info.size)
            try:
                await asyncio.to_thread(s.target.fill_from_file, path, fd)
            finally:
                os.close(fd)
            self.progress.on_bytes(s.info.size)
            self.progress.on_file_done(s.rel, cached=self.url.scheme != "file")

        await asyncio.gather(scheduler.transfer(files), *(read_local(s) for s in from_disk))
        tensors: dict[str, torch.Tensor] = {}
        for s in shards:
            assert s.target is not None
            tensors.update(_tensors_of(s.target, self.dtype))
        report = self._report(scheduler, shards, files, from_disk, len(tensors), total)
        return tensors, report

    async def _load_slices(
        self,
        scheduler: TransferScheduler,
        shards: list[_Shard],
        local: dict[str, Path | None],
        total: int,
    ) -> tuple[dict[str, torch.Tensor], LoadReport]:
        """``tp=(rank, world)``: only this rank's part of each split tensor is read (ranged
        reads pinned to the object's version, coalesced across small gaps) and held; host
        memory is the rank's share plus the reads in flight. Whole-object checksums cannot
        cover a part: these reads are checked for length and version only."""
        import numpy as np

        th = _torch()
        assert self.tp is not None
        rank, world = self.tp
        sem = asyncio.Semaphore(self.config.concurrency.start)
        plans = []
        for s in shards:
            assert s.header is not None
            slices = tp_plan.plan(s.header.tensors, rank, world, self.split)
            plans.append((s, slices, tp_plan.coalesce(slices)))
        rank_bytes = sum(sl.nbytes for _, slices, _ in plans for sl in slices)
        to_read = sum(r.length for _, _, reads in plans for r in reads)
        self.progress.on_start(files_total=len(shards), bytes_total=to_read, bytes_done=0)
        counts = {"network": 0, "disk": 0}
        tensors: dict[str, torch.Tensor] = {}

        async def one_shard(
            s: _Shard, slices: list[tp_plan.TensorSlice], reads: list[tp_plan.Read]
        ) -> None:
            dst = [th.empty(sl.shape, dtype=torch_dtype(sl.dtype)) for sl in slices]
            views = [d.reshape(-1).view(th.uint8).numpy() for d in dst]
            path = local[s.rel]
            fd = self._open_local(path, s.info.size) if path is not None else None

            async def one(r: tp_plan.Read) -> None:
                async with sem:
                    if fd is not None:
                        data = await asyncio.to_thread(os.pread, fd, r.length, r.start)
                    else:
                        data = await scheduler.read_bytes(s.info, r.start, r.length)
                if len(data) != r.length:
                    raise InvalidCheckpoint(
                        f"{self._name(s)}: {len(data)} bytes at {r.start}, wanted {r.length} "
                        "(truncated?)"
                    )
                counts["disk" if fd is not None else "network"] += r.length
                raw = np.frombuffer(data, dtype=np.uint8)
                for p in r.pieces:
                    at = p.src - r.start
                    views[p.tensor][p.dst : p.dst + p.length] = raw[at : at + p.length]
                self.progress.on_bytes(r.length)

            try:
                await asyncio.gather(*(one(r) for r in reads))
            finally:
                if fd is not None:
                    os.close(fd)
            for sl, t in zip(slices, dst, strict=True):
                if self.dtype is not None and t.is_floating_point() and t.dtype != self.dtype:
                    t = t.to(self.dtype)
                tensors[sl.name] = t.to(self.device) if self.device.type != "cpu" else t
            self.progress.on_file_done(s.rel, cached=fd is not None)

        await asyncio.gather(*(one_shard(s, sl, rd) for s, sl, rd in plans))
        seconds = time.monotonic() - self._t0
        return tensors, LoadReport(
            source=str(self.url),
            device=str(self.device),
            files=len(shards),
            tensors=len(tensors),
            bytes_total=total,
            bytes_transferred=counts["network"],
            bytes_from_cache=counts["disk"],
            seconds=round(seconds, 3),
            mb_per_s=round(to_read / seconds / 1e6, 1) if seconds > 0 else 0.0,
            retries=scheduler.counters.retries,
            tp=f"{rank}/{world}",
            bytes_rank=rank_bytes,
        )

    def _make_target(
        self, scheduler: TransferScheduler, shard: _Shard
    ) -> Callable[[TransferFile], FileTarget]:
        def make(f: TransferFile) -> FileTarget:
            assert shard.header is not None
            disk = self._disk_target(scheduler, shard, f)
            shard.target = ShardTarget(
                scheduler.writer, shard.header, self.device, disk, shard.prefix
            )
            return shard.target

        return make


def record_load(started: float, report: LoadReport, verb: str) -> None:
    """The phase event of one load (``verb``: how the tensors went to the device)."""
    events.record(
        "load",
        started,
        time.time(),
        bytes=report.bytes_transferred,
        detail=f"{report.source}: {report.tensors} tensors {verb} {report.device}, "
        f"{report.bytes_from_peers / 1e6:.0f} MB from peers",
    )


async def load_async(
    src: str,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    config: FetchConfig | None = None,
    progress: ProgressListener | None = None,
    *,
    tp: tuple[int, int] | None = None,
    split: tp_plan.SplitRule | None = None,
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Load every tensor of a safetensors checkpoint (one file, a sharded checkpoint with
    ``model.safetensors.index.json``, or a prefix holding one) from any source ``fetch``
    takes. Returns the tensors and a :class:`LoadReport`.

    ``tp=(rank, world)``: only this rank's slice of each split tensor (``split(name, shape)``
    says which dimension, None to keep it whole; default: vLLM's Llama-family layout), read
    with ranged reads from the unmodified checkpoint; see :mod:`spotstart.weights.tp`."""
    return await Loader(src, device, dtype, cache_dir, config, progress, tp, split).run()


def load(
    src: str,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    config: FetchConfig | None = None,
    *,
    tp: tuple[int, int] | None = None,
    split: tp_plan.SplitRule | None = None,
) -> dict[str, torch.Tensor]:
    """Synchronous :func:`load_async` returning only the tensors.

    Example::

        state = spotstart.load("gs://my-models/llama-3-8b/", device="cuda",
                               cache_dir="/nvme/llama")
        shard = spotstart.load("gs://my-models/llama-3-70b/", device="cuda:3", tp=(3, 8))
    """
    tensors, _ = asyncio.run(load_async(src, device, dtype, cache_dir, config, tp=tp, split=split))
    return tensors


def load_into(
    module: torch.nn.Module,
    src: str,
    strict: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    config: FetchConfig | None = None,
    device: str | None = None,
) -> LoadReport:
    """Fill ``module`` (built on the meta device, or anywhere) with the checkpoint's tensors
    without a second copy: the loaded tensors become the parameters (``assign=True``).

    Example::

        with torch.device("meta"):
            model = MyModel(config)
        spotstart.load_into(model, "s3://models/my-model/")
    """
    target_device = device
    if target_device is None:
        params = list(module.parameters())
        target_device = (
            "cpu" if not params or params[0].device.type == "meta" else str(params[0].device)
        )
    tensors, report = asyncio.run(load_async(src, target_device, None, cache_dir, config))
    try:
        module.load_state_dict(tensors, strict=strict, assign=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise InvalidCheckpoint(
            f"{src}: does not fit the module: {' '.join(x.strip() for x in first)[:500]}"
        ) from exc
    return report


__all__ = ["LoadReport", "Loader", "load", "load_async", "load_into"]
