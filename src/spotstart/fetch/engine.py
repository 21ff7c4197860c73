"""The transfer scheduler: resolves a source URL to objects, skips what the destination
already holds, and runs every remaining chunk through one concurrency limit, one retry policy
and one byte account. Network reads and disk writes are separate roles (see writer.py)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import shutil
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from spotstart.errors import (
    DiskFull,
    EndpointUnreachable,
    IntegrityError,
    LocalIOError,
    NotFound,
    ObjectChanged,
    ProtocolError,
    RetriesExceeded,
    SpotstartError,
    StallDetected,
    TransferStalled,
    TransientError,
    UsageError,
)
from spotstart.fetch import layout
from spotstart.fetch import plan as planning
from spotstart.fetch.cache import INDEX_DIR, CacheIndex
from spotstart.fetch.config import FetchConfig, FetchReport, FileResult
from spotstart.fetch.journal import JournalHeader, local_error
from spotstart.fetch.target import DiskTarget, FileTarget
from spotstart.fetch.verify import ALGORITHMS, CRC32C, CrcAlgorithm, combine_chunk_crcs
from spotstart.fetch.writer import DiskWriter
from spotstart.store import HttpOptions, ObjectInfo, RangeSource, StorageURL, open_source, parse_url
from spotstart.units import format_bytes

T = TypeVar("T")


class ProgressListener(Protocol):
    """Explicit progress events (s3transfer's subscribers): a TTY bar, a JSON logger or a
    test recorder implement the same five methods."""

    def on_start(self, *, files_total: int, bytes_total: int, bytes_done: int) -> None: ...
    def on_bytes(self, n: int) -> None: ...
    def on_retry(self, what: str, error: str, delay_s: float) -> None: ...
    def on_file_done(self, rel: str, *, cached: bool) -> None: ...
    def on_message(self, text: str) -> None: ...


class NullProgress:
    def on_start(self, *, files_total: int, bytes_total: int, bytes_done: int) -> None:
        return None

    def on_bytes(self, n: int) -> None:
        return None

    def on_retry(self, what: str, error: str, delay_s: float) -> None:
        return None

    def on_file_done(self, rel: str, *, cached: bool) -> None:
        return None

    def on_message(self, text: str) -> None:
        return None


@dataclass
class TransferFile:
    """One object being transferred: its chunk plan, its target, per-chunk CRCs. Build with
    :meth:`Fetcher.plan_file`."""

    info: ObjectInfo
    rel: str
    display: str
    chunks: list[planning.Chunk]
    chunk_bytes: int
    make_target: Callable[[TransferFile], FileTarget]
    on_done: Callable[[TransferFile], None] | None = None
    target: FileTarget | None = None
    crcs: dict[int, int] = field(default_factory=dict)
    uncommitted: dict[int, int] = field(default_factory=dict)
    remaining: int = 0
    bytes_transferred: int = 0
    bytes_resumed: int = 0
    verified: tuple[str, ...] = ()
    finishing: bool = False
    changed: bool = False  # the object was replaced while being read
    md5: _OrderedMd5 | None = None
    # The CRC computed per chunk as bytes arrive: the store's own algorithm where it gives a
    # CRC (so the whole-object check is a combination, no reread), else CRC-32C (for the
    # refetch-to-find-the-bad-chunk pass).
    crc_algorithm: CrcAlgorithm = CRC32C
    # Serialises journal commits (commit loop) with the final commit + rename (_finish).
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class _Counters:
    bytes_transferred: int = 0
    retries: int = 0
    stalls: int = 0
    refetched_chunks: int = 0


class _OrderedMd5:
    """MD5 must see bytes in order, but chunks finish out of order: hash each finished run of
    consecutive chunks from the part file (page cache) on a thread while the rest downloads,
    so only the tail of the last file is hashed after its last byte arrives. With ``parts``
    (an S3 multipart ETag) each part is hashed on its own and the digest is the MD5 of the
    parts' digests; chunks never straddle a part (see plan.plan_chunks)."""

    def __init__(self, chunks: list[planning.Chunk], parts: tuple[int, ...] = ()) -> None:
        self.chunks = chunks
        self.next = 0
        self.hash = hashlib.md5()
        self.part_ends = set(planning.part_boundaries(parts)) if parts else set()
        self.per_part = bool(parts)
        self.part_digests: list[bytes] = []
        self.task: asyncio.Task[None] | None = None

    def kick(self, target: FileTarget, done: dict[int, int]) -> None:
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._run(target, done))

    async def _run(self, target: FileTarget, done: dict[int, int]) -> None:
        while self.next < len(self.chunks) and self.chunks[self.next].index in done:
            ch = self.chunks[self.next]
            await asyncio.to_thread(self._hash_range, target, ch.start, ch.length)
            if ch.start + ch.length in self.part_ends:
                self.part_digests.append(self.hash.digest())
                self.hash = hashlib.md5()
            self.next += 1

    def _hash_range(self, target: FileTarget, start: int, length: int) -> None:
        _hash_target(self.hash, target, start, length)

    async def digest(self, target: FileTarget, done: dict[int, int]) -> bytes:
        if self.task is not None:
            await self.task
        await self._run(target, done)
        if self.per_part:
            return hashlib.md5(b"".join([*self.part_digests, self.hash.digest()])).digest()
        return self.hash.digest()


class _ChunkWriter:
    """Receives one attempt's body pieces: CRC as they come, handed to the writer in batches
    of ``COALESCE_BYTES`` (one hand-off and one pwritev per 4 MiB, not per socket read)."""

    COALESCE_BYTES = 4 << 20

    def __init__(self, fetcher: Fetcher, f: TransferFile, target: FileTarget, start: int) -> None:
        self.fetcher = fetcher
        self.file = f
        self.target = target
        self.offset = start
        self.crc = 0
        self.written = 0
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.writes: list[asyncio.Future[None]] = []

    async def receive(self, piece: bytes) -> None:
        self.crc = self.file.crc_algorithm.update(piece, self.crc)
        self.pending.append(piece)
        self.pending_bytes += len(piece)
        n = len(piece)
        self.written += n
        self.fetcher.counters.bytes_transferred += n
        self.file.bytes_transferred += n
        self.fetcher.progress.on_bytes(n)
        if self.pending_bytes >= self.COALESCE_BYTES:
            await self.flush()

    async def flush(self) -> None:
        if not self.pending:
            return
        pieces, n = self.pending, self.pending_bytes
        self.pending, self.pending_bytes = [], 0
        self.writes.append(await self.target.write(self.offset, pieces))
        self.offset += n


class Fetcher:
    """One fetch run. Use :func:`fetch_async` / :func:`fetch` rather than this class."""

    def __init__(
        self,
        source: RangeSource,
        url: StorageURL,
        dest: Path,
        config: FetchConfig,
        progress: ProgressListener,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.source = source
        self.url = url
        self.dest = dest
        self.config = config
        self.progress = progress
        self.rng = rng or random.Random()
        self.policy = planning.RetryPolicy(
            config.max_attempts, config.backoff_base_s, config.backoff_cap_s
        )
        self.counters = _Counters()
        fixed = config.concurrency is not None
        self.controller = planning.ConcurrencyController(
            config.concurrency or config.concurrency_initial,
            config.concurrency or config.concurrency_max,
            growth_threshold=config.growth_threshold,
            interval_s=config.probe_interval_s,
            fixed=fixed,
        )
        self.writer = DiskWriter(config.write_queue_bytes)

    # -- resolving ---------------------------------------------------------------------
    async def resolve(self) -> list[tuple[ObjectInfo, str]]:
        """(object, path relative to DEST) for everything the URL names."""
        url, cfg = self.url, self.config
        if url.scheme in ("http", "https"):
            info = await self.source.stat(url.key)
            name = url.key.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] or "index.html"
            return [(info, name)]
        key = url.key.lstrip("/") if url.scheme == "file" else url.key
        if key and not key.endswith("/"):
            try:
                info = await self.source.stat(key)
                return [(info, key.rsplit("/", 1)[-1])]
            except NotFound:
                pass  # not an object: maybe a prefix
            prefix = key + "/"
        else:
            prefix = key
        objects = await self.source.list(prefix)
        by_key = {o.key: o for o in objects}
        selected = planning.select_keys(sorted(by_key), prefix, cfg.include, cfg.exclude)
        if not objects:
            raise NotFound(f"{url}: no such object or prefix")
        if not selected:
            raise NotFound(f"{url}: {len(objects)} objects, none matched --include/--exclude")
        infos = await self.complete([by_key[k] for k, _ in selected])
        return list(zip(infos, [rel for _, rel in selected], strict=True))

    async def stat(self, key: str) -> ObjectInfo:
        """``source.stat(key)`` under this run's retry policy."""
        return await self._with_retries(lambda: self.source.stat(key), key)

    async def list_objects(self, prefix: str) -> list[ObjectInfo]:
        """``source.list(prefix)`` under this run's retry policy (entries may need
        :meth:`complete`)."""
        return await self._with_retries(lambda: self.source.list(prefix), prefix)

    async def complete(self, infos: list[ObjectInfo]) -> list[ObjectInfo]:
        """Objects as ``stat`` describes them, checksums included: entries of a listing that
        carries none (``needs_stat``, S3) are asked for with HEAD, a few at a time. Fetch and
        load call this for every listed object, so both verify the same checksums."""
        sem = asyncio.Semaphore(16)

        async def one(o: ObjectInfo) -> ObjectInfo:
            if not o.needs_stat:
                return o
            async with sem:
                return await self.stat(o.key)

        return list(await asyncio.gather(*(one(o) for o in infos)))

    async def _with_retries(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        attempt = 0
        while True:
            attempt += 1
            try:
                return await call()
            except (TransientError, EndpointUnreachable) as exc:
                if attempt >= min(4, self.config.max_attempts):
                    if isinstance(exc, EndpointUnreachable):
                        raise
                    raise RetriesExceeded(f"{what}: {exc}", exc) from exc
                self.counters.retries += 1
                await asyncio.sleep(
                    self.policy.delay_s(attempt, self.rng, getattr(exc, "retry_after_s", None))
                )

    # -- building blocks for other parts (spotstart.weights) ---------------------------------
    def plan_file(
        self,
        info: ObjectInfo,
        rel: str,
        make_target: Callable[[TransferFile], FileTarget],
        on_done: Callable[[TransferFile], None] | None = None,
    ) -> TransferFile:
        """A :class:`TransferFile` for ``info`` with this run's chunk size policy."""
        chunk_bytes = self._chunk_bytes(info)
        crc = info.checksums.crc
        return TransferFile(
            info,
            rel,
            self.display_of(info),
            planning.plan_chunks(info.size, chunk_bytes, planning.part_boundaries(info.parts)),
            chunk_bytes,
            make_target=make_target,
            on_done=on_done,
            crc_algorithm=ALGORITHMS[crc[0]] if crc is not None else CRC32C,
        )

    def display_of(self, info: ObjectInfo) -> str:
        """How ``info`` is named in messages, journals and the cache: its full URL."""
        return f"{self.url.scheme}://{self.url.bucket}/{info.key}" if self.url.bucket else info.key

    def _chunk_bytes(self, info: ObjectInfo) -> int:
        if not info.ranges:
            return max(1, info.size)  # one stream: the server answers ranges with 200
        return planning.choose_chunk_bytes(
            info.size, self.controller.target, self.config.chunk_bytes
        )

    async def read_bytes(self, info: ObjectInfo, start: int, length: int) -> bytes:
        """A small ranged read (a header, an index file) with the same retry policy."""
        length = max(0, min(length, info.size - start))
        if length == 0:
            return b""

        async def once() -> bytes:
            out: list[bytes] = []

            async def sink(piece: bytes) -> None:
                out.append(piece)

            await self.source.read(info, start, length, sink)
            return b"".join(out)

        return await self._with_retries(once, info.key)

    def close(self) -> None:
        """Stop the writer threads."""
        self.writer.close()

    # -- running -----------------------------------------------------------------------
    async def run(self) -> FetchReport:
        t0 = time.monotonic()
        try:
            objects = await self._with_retries(self.resolve, str(self.url))
        except EndpointUnreachable as exc:
            raise EndpointUnreachable(f"{exc}; check the endpoint URL and network") from exc
        placed = self.place(objects, self.dest)
        self._check_dest()
        cache = CacheIndex(self.dest)
        files: list[TransferFile] = []
        results: list[FileResult] = []
        bytes_cached = 0
        for info, safe in placed:
            final = self.dest / safe
            if self.config.use_cache and cache.is_current(
                safe, self.display_of(info), info.version, info.size, final
            ):
                bytes_cached += info.size
                results.append(FileResult(info.key, str(final), info.size, 0, 0, True, ()))
                continue
            files.append(
                self.plan_file(info, safe, self._disk_target(final), self._record(cache, final))
            )
        need = sum(f.info.size for f in files)
        self._check_free_space(files)
        self.progress.on_start(files_total=len(objects), bytes_total=need, bytes_done=0)
        for r in results:
            self.progress.on_file_done(Path(r.path).name, cached=True)
        try:
            await self.transfer(files)
        finally:
            self.writer.close()
            if any(f.verified for f in files):
                with contextlib.suppress(OSError):  # never mask the error that got us here
                    cache.save()
        results.extend(
            FileResult(
                f.info.key,
                str(self.dest / f.rel),
                f.info.size,
                f.bytes_transferred,
                f.bytes_resumed,
                False,
                f.verified,
            )
            for f in files
        )
        seconds = time.monotonic() - t0
        verified = count_verified(files)
        c = self.counters
        return FetchReport(
            source=str(self.url),
            dest=str(self.dest),
            files_total=len(objects),
            files_fetched=len(files),
            files_cached=len(objects) - len(files),
            bytes_total=sum(i.size for i, _ in objects),
            bytes_transferred=c.bytes_transferred,
            bytes_resumed=sum(f.bytes_resumed for f in files),
            bytes_cached=bytes_cached,
            seconds=round(seconds, 3),
            mb_per_s=round(c.bytes_transferred / seconds / 1e6, 1) if seconds > 0 else 0.0,
            retries=c.retries,
            stalls=c.stalls,
            refetched_chunks=c.refetched_chunks,
            verified=verified,
            concurrency_final=self.controller.target,
            chunk_bytes=max((f.chunk_bytes for f in files), default=0),
            files=tuple(sorted(results, key=lambda r: r.key)),
        )

    def place(
        self, objects: list[tuple[ObjectInfo, str]], root: Path
    ) -> list[tuple[ObjectInfo, str]]:
        """(object, local path under ``root``) for each object, before any byte moves:
        :class:`UsageError` when the names cannot each have a path of their own (see
        layout.place), :class:`LocalIOError` when something already in ``root`` is in the way.
        Fetch places into DEST, load into its cache directory."""
        try:
            placements = layout.place((info.key, rel) for info, rel in objects)
        except layout.UnsafeNames as exc:
            raise UsageError(
                f"{self.url}: {exc}; nothing was fetched (leave such objects out with --exclude)"
            ) from exc
        blocked = layout.check_against_disk(root, [p.rel for p in placements])
        if blocked:
            rel, why = blocked[0]
            more = f" (and {len(blocked) - 1} more)" if len(blocked) > 1 else ""
            raise LocalIOError(
                f"{root}: cannot place {rel}: {why}{more}; move it away or choose another "
                "directory (nothing was fetched)"
            )
        return [(info, p.rel) for (info, _), p in zip(objects, placements, strict=True)]

    def _check_dest(self) -> None:
        if self.dest.exists() and not self.dest.is_dir():
            raise UsageError(f"{self.dest}: DEST must be a directory")
        try:
            self.dest.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise local_error(self.dest, exc, "creating DEST") from exc

    def _disk_target(self, final: Path) -> Callable[[TransferFile], FileTarget]:
        def make(f: TransferFile) -> FileTarget:
            header = JournalHeader(
                f.display, f.info.size, f.info.version, f.chunk_bytes, f.crc_algorithm.name
            )
            work = layout.work_paths(self.dest, f.rel)
            return DiskTarget(final, header, self.writer, fsync=self.config.fsync, work=work)

        return make

    def _record(self, cache: CacheIndex, final: Path) -> Callable[[TransferFile], None]:
        def done(f: TransferFile) -> None:
            cache.record(f.rel, f.display, f.info.version, f.info.size, final)
            # Rewriting the index after every file is quadratic for big trees: at most once
            # a second here, and once more when the run ends.
            cache.save(min_interval_s=1.0)

        return done

    def _check_free_space(self, files: list[TransferFile]) -> None:
        # Parts already on disk were preallocated: only new files need room.
        fresh = sum(
            f.info.size for f in files if not layout.work_paths(self.dest, f.rel)[0].exists()
        )
        free = shutil.disk_usage(self.dest).free
        if fresh > free:
            need_s, free_s = format_bytes(fresh), format_bytes(free)
            if need_s == free_s:  # within 0.5 %: only exact counts tell them apart
                need_s, free_s = f"{fresh:,} bytes", f"{free:,} bytes"
            raise DiskFull(
                f"{self.dest}: needs {need_s}, only {free_s} free; free space or choose "
                "another DEST"
            )

    def _open(self, f: TransferFile) -> None:
        f.target = f.make_target(f)
        try:
            done = f.target.open()
        except OSError as exc:
            raise local_error(self.dest / f.rel, exc, "preparing the destination") from exc
        f.crcs.update(done)
        sums = f.info.checksums
        streamed_md5 = self.config.verify == "auto"  # "full" hashes what landed, after
        if streamed_md5 and sums.crc is None and sums.md5 is not None:
            f.md5 = _OrderedMd5(f.chunks)
        elif streamed_md5 and sums.crc is None and sums.md5_of_parts is not None and f.info.parts:
            f.md5 = _OrderedMd5(f.chunks, f.info.parts)
        if f.md5 is not None:
            f.md5.kick(f.target, f.crcs)
        f.bytes_resumed = sum(f.chunks[i].length for i in done if i < len(f.chunks))
        f.remaining = len(f.chunks) - len([i for i in done if i < len(f.chunks)])
        if f.bytes_resumed:
            self.progress.on_bytes(f.bytes_resumed)
            self.progress.on_message(
                f"{f.rel}: resuming, {f.bytes_resumed / 1e6:.0f} MB already on disk"
            )

    def _pending(self, files: list[TransferFile]) -> Iterator[tuple[TransferFile, planning.Chunk]]:
        """Chunks to fetch, file by file; files are opened (and resumed) as reached."""
        for f in files:
            self._open(f)
            for ch in f.chunks:
                if ch.index not in f.crcs:
                    yield f, ch

    async def transfer(self, files: list[TransferFile]) -> None:
        """Fetch, verify and finish every file: one concurrency limit, one retry policy."""
        loop = asyncio.get_running_loop()
        running: dict[asyncio.Task[Any], tuple[TransferFile, planning.Chunk]] = {}
        finishing: set[asyncio.Task[Any]] = set()
        pending = self._pending(files)
        lookahead: deque[tuple[TransferFile, planning.Chunk]] = deque()
        exhausted = False
        committer = asyncio.create_task(self._commit_loop(files))
        try:
            while True:
                while not exhausted and len(running) < self.controller.target:
                    if not lookahead:
                        try:
                            lookahead.append(next(pending))
                        except StopIteration:
                            exhausted = True
                            break
                    f, ch = lookahead.popleft()
                    task = asyncio.create_task(self._fetch_chunk(f, ch))
                    running[task] = (f, ch)
                # Files fully resumed from their journal have nothing to fetch.
                for f in files:
                    if f.target is not None and f.remaining == 0 and not f.finishing:
                        f.finishing = True
                        finishing.add(asyncio.create_task(self._finish(f)))
                if not running and exhausted and not finishing:
                    break
                waitables: set[asyncio.Task[Any]] = set(running) | finishing
                done, _ = await asyncio.wait(
                    waitables,
                    timeout=self.config.probe_interval_s,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for t in done:
                    if t in finishing:
                        finishing.discard(t)
                        t.result()
                        continue
                    f, ch = running.pop(t)
                    crc = t.result()  # raises the chunk's fatal error
                    f.crcs[ch.index] = crc
                    f.uncommitted[ch.index] = crc
                    f.remaining -= 1
                    if f.md5 is not None and f.target is not None:
                        f.md5.kick(f.target, f.crcs)
                self.controller.observe(loop.time(), self.counters.bytes_transferred)
        except BaseException as exc:
            for t in list(running) + list(finishing):
                t.cancel()
            await asyncio.gather(*running, *finishing, return_exceptions=True)
            committer.cancel()
            with contextlib.suppress(asyncio.CancelledError, SpotstartError):
                await committer
            self._abandon(files, exc)
            raise
        committer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await committer

    def _abandon(self, files: list[TransferFile], exc: BaseException) -> None:
        """Leave resumable state for transient failures and interrupts; remove everything
        for failures a rerun would only repeat (integrity) or that need the space (disk)."""
        for f in files:
            if f.target is None or not f.target.is_open:
                continue
            # A full disk: give the space back. A replaced object: its bytes are worthless. A
            # server that broke the protocol: a rerun must not trust what it sent.
            if isinstance(exc, DiskFull | ProtocolError) or f.changed:
                f.target.discard()
                continue
            with contextlib.suppress(SpotstartError):
                f.target.commit(f.uncommitted)
            f.uncommitted = {}
            f.target.close()

    async def _commit_loop(self, files: list[TransferFile]) -> None:
        """Group commit: every second, journal finished chunks (made durable first if
        fsync is on)."""
        while True:
            await asyncio.sleep(1.0)
            for f in files:
                if f.target is None or not f.uncommitted:
                    continue
                async with f.lock:
                    if not f.target.is_open or f.finishing:
                        continue
                    batch, f.uncommitted = f.uncommitted, {}
                    await asyncio.to_thread(f.target.commit, batch)

    async def _fetch_chunk(self, f: TransferFile, ch: planning.Chunk) -> int:
        """Fetch one chunk with bounded retries; returns its CRC-32C."""
        target = f.target
        assert target is not None
        attempt = 0
        while True:
            attempt += 1
            chunk = _ChunkWriter(self, f, target, ch.start)
            try:
                await self.source.read(f.info, ch.start, ch.length, chunk.receive)
                await chunk.flush()
                await self._settle(chunk.writes, f)
                return chunk.crc
            except ObjectChanged:
                f.changed = True
                raise
            except (TransientError, EndpointUnreachable) as exc:
                await asyncio.gather(*chunk.writes, return_exceptions=True)
                self.progress.on_bytes(-chunk.written)
                if isinstance(exc, StallDetected):
                    self.counters.stalls += 1
                if isinstance(exc, TransientError) and exc.throttled:
                    self.controller.throttled()
                if not self.policy.should_retry(attempt):
                    raise self._exhausted(f, ch, attempt, exc) from exc
                delay = self.policy.delay_s(attempt, self.rng, getattr(exc, "retry_after_s", None))
                self.counters.retries += 1
                self.progress.on_retry(f.display, str(exc), delay)
                await asyncio.sleep(delay)

    async def _settle(self, writes: list[asyncio.Future[None]], f: TransferFile) -> None:
        try:
            await asyncio.gather(*writes)
        except OSError as exc:
            raise local_error(self.dest / f.rel, exc, "writing") from exc

    def _exhausted(
        self, f: TransferFile, ch: planning.Chunk, attempts: int, exc: BaseException
    ) -> SpotstartError:
        where = f"{f.display} bytes {ch.start}-{ch.start + ch.length - 1}"
        if isinstance(exc, StallDetected):
            return TransferStalled(f"{where}: stalled on all {attempts} attempts ({exc})", exc)
        if isinstance(exc, EndpointUnreachable):
            return EndpointUnreachable(f"{where}: {exc} (after {attempts} attempts)")
        return RetriesExceeded(
            f"{where}: gave up after {attempts} attempts; last error: {exc}", exc
        )

    async def _finish(self, f: TransferFile) -> None:
        """Verify, refetching chunks on a mismatch; then publish (rename into place)."""
        target = f.target
        assert target is not None
        if self.config.verify == "full" and not _content_checks(f):
            target.discard()
            raise IntegrityError(
                f"{f.display}: the store gives no checksum for it, and --verify full needs one "
                "(--verify auto accepts the size alone)"
            )
        for pass_no in range(self.config.verify_passes + 1):
            streamed = None
            if pass_no == 0 and f.md5 is not None:
                streamed = await f.md5.digest(target, f.crcs)
            ok, kinds, detail = await asyncio.to_thread(self._verify, f, streamed)
            if ok:
                f.verified = kinds
                break
            if pass_no == self.config.verify_passes:
                target.discard()
                raise IntegrityError(
                    f"{f.display}: {detail} after {pass_no + 1} attempts; the object may be "
                    "changing while read, or the network corrupts data"
                )
            self.progress.on_message(f"{f.rel}: {detail}; refetching to find the bad chunk")
            await self._refetch_all(f)
        async with f.lock:
            if f.uncommitted:
                batch, f.uncommitted = f.uncommitted, {}
                await asyncio.to_thread(target.commit, batch)
            await asyncio.to_thread(target.finish)
        if f.on_done is not None:
            await asyncio.to_thread(f.on_done, f)
        self.progress.on_file_done(f.rel, cached=False)

    def _verify(
        self, f: TransferFile, md5: bytes | None = None
    ) -> tuple[bool, tuple[str, ...], str]:
        assert f.target is not None
        size = f.target.stored_size()
        if size != f.info.size:
            return False, (), f"size {size} != {f.info.size}"
        sums = f.info.checksums
        if self.config.verify == "size":
            return True, ("size",), ""
        full = self.config.verify == "full"
        if sums.crc is not None:
            crcs = _crcs_of(f.target, f.chunks, f.crc_algorithm) if full else f.crcs
            return _check_crc(f, ALGORITHMS[sums.crc[0]], sums.crc[1], crcs)
        if sums.md5 is not None or (sums.md5_of_parts is not None and f.info.parts):
            want = sums.md5 if sums.md5 is not None else sums.md5_of_parts
            assert want is not None
            kind = "md5" if sums.md5 is not None else "md5-of-parts"
            if md5 is not None:
                got_md5 = md5
            elif sums.md5 is not None:
                got_md5 = _md5_of(f.target, f.info.size)
            else:
                got_md5 = _md5_of_parts(f.target, f.info.parts)
            if got_md5 != want:
                return False, (), f"{kind} mismatch (got {got_md5.hex()}, want {want.hex()})"
            return True, ("size", kind), ""
        return True, ("size",), ""

    async def _refetch_all(self, f: TransferFile) -> None:
        """Fetch every chunk again; those whose CRC changed were the bad ones."""
        sem = asyncio.Semaphore(max(1, self.controller.target))

        async def one(ch: planning.Chunk) -> None:
            async with sem:
                crc = await self._fetch_chunk(f, ch)
                if crc != f.crcs.get(ch.index):
                    self.counters.refetched_chunks += 1
                f.crcs[ch.index] = crc
                f.uncommitted[ch.index] = crc

        await asyncio.gather(*(one(ch) for ch in f.chunks))


def _hash_target(h: Any, target: FileTarget, start: int, length: int) -> None:
    """Feed bytes ``[start, start+length)`` of a target to hash ``h``, 8 MiB at a time."""
    for off in range(start, start + length, 8 << 20):
        h.update(target.read(off, min(8 << 20, start + length - off)))


def _md5_of(target: FileTarget, size: int) -> bytes:
    h = hashlib.md5()
    _hash_target(h, target, 0, size)
    return h.digest()


def _md5_of_parts(target: FileTarget, parts: tuple[int, ...]) -> bytes:
    """An S3 multipart ETag's digest: MD5 of the concatenated per-part MD5s."""
    digests, at = [], 0
    for n in parts:
        h = hashlib.md5()
        _hash_target(h, target, at, n)
        digests.append(h.digest())
        at += n
    return hashlib.md5(b"".join(digests)).digest()


def part_crcs(
    chunks: list[planning.Chunk],
    crcs: dict[int, int],
    parts: tuple[int, ...],
    algorithm: CrcAlgorithm = CRC32C,
) -> list[int]:
    """Each part's CRC, combined from the CRCs of the chunks inside it (chunks are planned so
    that none straddles a part)."""
    out: list[int] = []
    i = 0
    for n in parts:
        end = (chunks[i].start if i < len(chunks) else 0) + n
        group: list[tuple[int, int]] = []
        while i < len(chunks) and chunks[i].start < end:
            group.append((crcs[chunks[i].index], chunks[i].length))
            i += 1
        out.append(combine_chunk_crcs(group, algorithm))
    return out


def _content_checks(f: TransferFile) -> bool:
    sums = f.info.checksums
    return (
        sums.crc is not None
        or sums.md5 is not None
        or (sums.md5_of_parts is not None and bool(f.info.parts))
    )


def _crcs_of(
    target: FileTarget, chunks: list[planning.Chunk], algorithm: CrcAlgorithm
) -> dict[int, int]:
    """Each chunk's CRC computed again from the bytes where they landed (--verify full)."""
    out = {}
    for ch in chunks:
        crc = 0
        for off in range(ch.start, ch.start + ch.length, 8 << 20):
            crc = algorithm.update(target.read(off, min(8 << 20, ch.start + ch.length - off)), crc)
        out[ch.index] = crc
    return out


def _check_crc(
    f: TransferFile, algorithm: CrcAlgorithm, want: int, crcs: dict[int, int]
) -> tuple[bool, tuple[str, ...], str]:
    """Whole-object and/or composite (S3 multipart) CRC, as the store's scope says."""
    name, width = algorithm.name, algorithm.width_bytes
    scope = f.info.checksums.crc_scope
    whole = composite = None
    if scope in ("object", "either"):
        whole = combine_chunk_crcs([(crcs[c.index], c.length) for c in f.chunks], algorithm)
        if whole == want:
            return True, ("size", name), ""
    if scope in ("parts", "either") and f.info.parts:
        per_part = part_crcs(f.chunks, crcs, f.info.parts, algorithm)
        composite = algorithm.update(b"".join(c.to_bytes(width, "big") for c in per_part), 0)
        if composite == want:
            return True, ("size", f"{name}-composite"), ""
    digits = 2 * width
    got = " / ".join(f"{v:0{digits}x}" for v in (whole, composite) if v is not None) or "nothing"
    return False, (), f"{name} mismatch (got {got}, want {want:0{digits}x})"


def count_verified(files: list[TransferFile]) -> dict[str, int]:
    """How many files each kind of check (size, crc32c, crc32, crc64nvme, md5) verified."""
    verified: dict[str, int] = {}
    for f in files:
        for kind in f.verified:
            verified[kind] = verified.get(kind, 0) + 1
    return verified


async def fetch_async(
    src: str,
    dest: str | os.PathLike[str],
    config: FetchConfig | None = None,
    *,
    progress: ProgressListener | None = None,
) -> FetchReport:
    """Copy ``src`` (an object, a prefix, a URL or a local path) into directory ``dest``.

    Example::

        report = await fetch_async("gs://my-models/llama-3-8b/", "/nvme/llama",
                                   FetchConfig(include=("*.safetensors", "*.json")))
        print(report.mb_per_s)
    """
    cfg = config or FetchConfig()
    url = parse_url(src)
    options = HttpOptions(
        stall_timeout_s=cfg.stall_timeout_s, connect_timeout_s=cfg.connect_timeout_s
    )
    source = open_source(url, options, endpoint=cfg.endpoint, anonymous=cfg.anonymous)
    dest_path = Path(os.path.abspath(dest))  # noqa: ASYNC240 (no I/O: string arithmetic)
    try:
        fetcher = Fetcher(source, url, dest_path, cfg, progress or NullProgress())
        return await fetcher.run()
    finally:
        await source.close()


def fetch(
    src: str,
    dest: str | os.PathLike[str],
    config: FetchConfig | None = None,
    *,
    progress: ProgressListener | None = None,
) -> FetchReport:
    """Synchronous :func:`fetch_async`.

    >>> report = fetch("s3://models/llama/", "/nvme/llama")  # doctest: +SKIP
    """
    return asyncio.run(fetch_async(src, dest, config, progress=progress))


__all__ = [
    "INDEX_DIR",
    "Fetcher",
    "NullProgress",
    "ProgressListener",
    "TransferFile",
    "count_verified",
    "fetch",
    "fetch_async",
]
