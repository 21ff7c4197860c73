"""The transfer scheduler: runs the chunks of a set of objects through one concurrency limit,
one retry policy, stall detection, verification and one byte account, into targets its
clients make (files in a directory for fetch, tensor memory for load). Network reads and disk
writes are separate roles (see writer.py). It knows nothing of URLs' meanings, destination
directories or caches: those are its clients'."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

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
)
from spotstart.fetch import plan as planning
from spotstart.fetch.cache import CacheIndex
from spotstart.fetch.config import FetchConfig
from spotstart.fetch.journal import JournalHeader, local_error
from spotstart.fetch.manifest import (
    MAX_MANIFEST_BYTES,
    ManifestEntry,
    PieceHasher,
    manifest_candidates,
    parse_manifest,
)
from spotstart.fetch.peers import OBJECTS_PATH, PeerSet, object_id
from spotstart.fetch.swarm import ChunkPicker
from spotstart.fetch.target import FileTarget, Window
from spotstart.fetch.verify import ALGORITHMS, CRC32C, CrcAlgorithm, combine_chunk_crcs
from spotstart.fetch.writer import DiskWriter
from spotstart.store import (
    DirectRangeSource,
    DirectReader,
    DirectUnsupported,
    ObjectInfo,
    RangeRequest,
    RangeSource,
    SinkError,
    StorageURL,
    open_source,
)

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


class ChunkHooks(Protocol):
    """What a consumer that takes an object's bytes as they land (a tensor stream) may ask
    of the scheduler for one file, set as :attr:`TransferFile.hooks` by its ``make_target``.
    ``admit(chunk)`` is awaited before each fetch of a chunk (its first request, and any
    refetch): the consumer makes room for it there, or raises to fail the transfer.
    ``landed(index)`` is called once chunk ``index`` is in place and accepted (a peer's
    chunk checked against its manifest pieces), on the event loop."""

    async def admit(self, chunk: planning.Chunk) -> None: ...

    def landed(self, index: int) -> None: ...


@dataclass
class TransferFile:
    """One object being transferred: its chunk plan, its target, per-chunk CRCs. Build with
    :meth:`TransferScheduler.plan_file`."""

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
    local_path: Path | None = None  # where the bytes land on disk, for error messages
    # Chunks a peer gave: index -> (peer address, CRC). A whole-object mismatch refetches
    # these from the origin first; a peer whose chunk then differs lied or broke.
    from_peers: dict[int, tuple[str, int]] = field(default_factory=dict)
    origin_only: bool = False  # no more peers for this object (a check failed)
    peer_id: str | None = None  # its identity between peers; None: never from a peer
    # Peers may give its bytes if a manifest covers it (even when the origin has no
    # cryptographic checksum for it): set before transfer() reads the manifests.
    peer_candidate: bool = False
    # The manifest entry its peer chunks are checked against, piece by piece, on arrival;
    # its chunks are then whole pieces.
    manifest: ManifestEntry | None = None
    peer_bytes: bool = False  # some chunk came from a peer (sticky: the final check knows)
    # Peer chunks not yet proven (no manifest: the whole-object digest proves them at the
    # end). Kept out of the journal until then, so a rerun never resumes them unchecked.
    unproven: dict[int, int] = field(default_factory=dict)
    # Serialises journal commits (commit loop) with the final commit + rename (_finish).
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    hooks: ChunkHooks | None = None  # see ChunkHooks; set by make_target
    # Hash the origin's MD5 in order as chunks land even where the store also gives a CRC
    # (the scheduler then hashes what landed after the last byte, which a target that gives
    # its bytes away as they land no longer holds). Set by make_target, read when it opens.
    md5_in_order: bool = False

    def journal_header(self) -> JournalHeader:
        """What a part file of this object records about it (resume, peer serving)."""
        return JournalHeader(
            self.display,
            self.info.size,
            self.info.version,
            self.chunk_bytes,
            self.crc_algorithm.name,
            tuple(self.info.parts),
        )


@dataclass
class _Counters:
    bytes_transferred: int = 0
    retries: int = 0
    stalls: int = 0
    refetched_chunks: int = 0
    direct_chunks: int = 0  # chunks received straight into the target by the direct reader
    bytes_from_peers: int = 0
    # Swarm order (peers active): chunks this node's ring share sent to the origin first,
    # and chunks left to another node's share that came from the origin after the wait.
    origin_owned: int = 0
    origin_after_wait: int = 0


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

    def __init__(
        self, fetcher: TransferScheduler, f: TransferFile, target: FileTarget, start: int
    ) -> None:
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


def source_for(url: StorageURL, config: FetchConfig) -> RangeSource:
    """The store behind ``url`` with this config's transport, endpoint and signing: the one
    place fetch and load open a source."""
    return open_source(url, config.http, endpoint=config.endpoint, anonymous=config.anonymous)


class TransferScheduler:
    """Chunks of objects, scheduled. Build :class:`TransferFile` s with :meth:`plan_file`,
    run them with :meth:`transfer`; :meth:`stat`, :meth:`complete` and :meth:`read_bytes` are
    the store under the same retry policy."""

    def __init__(
        self,
        source: RangeSource,
        url: StorageURL,
        config: FetchConfig,
        progress: ProgressListener,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.source = source
        self.url = url
        self.config = config
        self.progress = progress
        self.rng = rng or random.Random()
        retry, streams = config.retry, config.concurrency
        self.policy = planning.RetryPolicy(
            retry.max_attempts, retry.backoff_base_s, retry.backoff_cap_s
        )
        self.counters = _Counters()
        self.controller = planning.ConcurrencyController(
            streams.start,
            streams.limit,
            growth_threshold=streams.growth_threshold,
            interval_s=streams.probe_interval_s,
            fixed=streams.streams is not None,
        )
        self.writer = DiskWriter(config.disk.write_queue_bytes)
        self._direct: DirectReader | None = None
        self._no_direct = False  # the server sent a body the direct reader cannot take
        self.peers: PeerSet | None = None  # set by the client before transfer()
        self._peer_reader: DirectReader | None = None
        self._pool: ThreadPoolExecutor | None = None

    async def stat(self, key: str) -> ObjectInfo:
        """``source.stat(key)`` under this run's retry policy."""
        return await self.with_retries(lambda: self.source.stat(key), key)

    async def list_objects(self, prefix: str) -> list[ObjectInfo]:
        """``source.list(prefix)`` under this run's retry policy (entries may need
        :meth:`complete`)."""
        return await self.with_retries(lambda: self.source.list(prefix), prefix)

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

    async def with_retries(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        """A metadata call (stat, list, small read) under the retry policy, at most four
        attempts: a listing that keeps failing should fail fast."""

        def exhausted(attempts: int, exc: BaseException) -> BaseException:
            if isinstance(exc, EndpointUnreachable):
                return exc
            return RetriesExceeded(f"{what}: {exc} (after {attempts} attempts)", exc)

        return await self._retrying(
            call, what, min(4, self.config.retry.max_attempts), exhausted=exhausted
        )

    async def _retrying(
        self,
        call: Callable[[], Awaitable[T]],
        what: str,
        attempts: int,
        *,
        exhausted: Callable[[int, BaseException], BaseException],
        undo: Callable[[], Awaitable[None]] | None = None,
    ) -> T:
        """The one retry loop: ``call`` again on a transient error or an unreachable
        endpoint, waiting full-jitter backoff (or the server's Retry-After), up to
        ``attempts``; then ``exhausted(attempts, last error)`` is raised. ``undo`` rolls back
        what a failed attempt left (progress, pending writes). Throttling answers slow the
        concurrency controller; stalls are counted."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return await call()
            except (TransientError, EndpointUnreachable) as exc:
                if undo is not None:
                    await undo()
                if isinstance(exc, StallDetected):
                    self.counters.stalls += 1
                if isinstance(exc, TransientError) and exc.throttled:
                    self.controller.throttled()
                if attempt >= attempts:
                    raise exhausted(attempt, exc) from exc
                delay = self.policy.delay_s(attempt, self.rng, getattr(exc, "retry_after_s", None))
                self.counters.retries += 1
                self.progress.on_retry(what, str(exc), delay)
                await asyncio.sleep(delay)

    def plan_file(
        self,
        info: ObjectInfo,
        rel: str,
        make_target: Callable[[TransferFile], FileTarget],
        on_done: Callable[[TransferFile], None] | None = None,
        *,
        local_path: Path | None = None,
    ) -> TransferFile:
        """A :class:`TransferFile` for ``info`` with this run's chunk size policy;
        ``local_path`` names it in local I/O errors (where its bytes land on disk)."""
        chunk_bytes = self._chunk_bytes(info)
        crc = info.checksums.crc
        # Peer bytes are taken only where a digest a peer cannot forge proves them: the
        # origin's MD5 (recomputed over the whole object when a peer gave any of it), or a
        # manifest's SHA-256 pieces (transfer() reads it). A CRC is linear: never proof.
        # An object with no version has no identity between peers or manifests: any version
        # of it (one a peer holds, one a stale manifest describes) would pass for this one.
        candidate = self.config.verify != "size" and info.ranges and bool(info.version)
        peer_id = (
            object_id(self.display_of(info), info.version, info.size)
            if candidate and _crypto_digest(info) is not None
            else None
        )
        return TransferFile(
            info,
            rel,
            self.display_of(info),
            planning.plan_chunks(info.size, chunk_bytes, planning.part_boundaries(info.parts)),
            chunk_bytes,
            make_target=make_target,
            on_done=on_done,
            crc_algorithm=ALGORITHMS[crc[0]] if crc is not None else CRC32C,
            local_path=local_path,
            peer_id=peer_id,
            peer_candidate=candidate,
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

        return await self.with_retries(once, info.key)

    def close(self) -> None:
        """Stop the writer and reader threads; close kept-alive sockets."""
        self.writer.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._direct is not None:
            self._direct.close()  # cuts sockets in use: the threads end at once
        if self._peer_reader is not None:
            self._peer_reader.close()

    def _open(self, f: TransferFile) -> None:
        f.target = f.make_target(f)
        try:
            done = f.target.open()
        except OSError as exc:
            raise local_error(
                f.local_path or Path(f.rel), exc, "preparing the destination"
            ) from exc
        f.crcs.update(done)
        sums = f.info.checksums
        # In order as chunks land, or else from what landed after the last byte: "full"
        # always does the latter, "auto" where a CRC checks the object (unless asked).
        streamed_md5 = self.config.verify == "auto" and (sums.crc is None or f.md5_in_order)
        if streamed_md5 and sums.md5 is not None:
            f.md5 = _OrderedMd5(f.chunks)
        elif streamed_md5 and sums.md5_of_parts is not None and f.info.parts:
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
        """Fetch, verify and finish every file: one concurrency limit, one retry policy;
        with ``config.peers``, chunks from peers that hold them first."""
        spec = self.config.peers
        if spec is not None and spec.entries and any(f.peer_candidate for f in files):
            await self._apply_manifests([f for f in files if f.peer_candidate])
        wanted = any(f.peer_id is not None for f in files)
        if self.peers is None and spec is not None and spec.entries and wanted:
            ids = {f.peer_id for f in files if f.peer_id is not None}
            self.peers = PeerSet(spec, self.progress.on_message, wanted=ids)
            await self.peers.refresh()
            self.peers.start()
        try:
            await self._transfer(files)
        finally:
            if self.peers is not None:
                await self.peers.close()

    async def _apply_manifests(self, files: list[TransferFile]) -> None:
        """Read the manifests that may cover ``files`` from the origin and plan each covered
        file's chunks on its piece grid (whole pieces per chunk), so every peer chunk is
        checked on arrival. Before any target is opened (the journal records the plan)."""
        entries = await self._read_manifests([f.info.key for f in files])
        for f in files:
            found = entries.get(f.display, [])
            e = next((e for e in found if e.matches(f.display, f.info.version, f.info.size)), None)
            if e is None:
                if found:
                    old = found[0]
                    self.progress.on_message(
                        f"{f.rel}: the manifest describes version {old.version} ({old.size} "
                        f"bytes), not {f.info.version} ({f.info.size} bytes): stale, ignored"
                    )
                continue
            if e.parts != f.info.parts:
                self.progress.on_message(
                    f"{f.rel}: the manifest's multipart layout differs from the store's: ignored"
                )
                continue
            chunk_bytes = e.chunk_bytes_for(f.chunk_bytes)
            chunks = planning.plan_chunks(
                f.info.size, chunk_bytes, planning.part_boundaries(f.info.parts)
            )
            try:
                for ch in chunks:
                    e.pieces_in(ch.start, ch.length)
            except ValueError as exc:  # cannot happen with the same parts; never trust it
                self.progress.on_message(f"{f.rel}: manifest ignored ({exc})")
                continue
            f.chunks, f.chunk_bytes, f.manifest = chunks, chunk_bytes, e
            f.peer_id = object_id(f.display, f.info.version, f.info.size)
        covered = sum(f.manifest is not None for f in files)
        if covered:
            self.progress.on_message(
                f"manifest: {covered} of {len(files)} files covered; each chunk a peer gives is "
                "checked against its SHA-256 pieces on arrival"
            )

    async def _read_manifests(self, keys: list[str]) -> dict[str, list[ManifestEntry]]:
        """Entries of the manifests beside ``keys`` on the origin, by URL. One
        that is absent is no manifest; one that cannot be read, is too large or malformed is
        ignored with a message: without it peers give only what the origin's own MD5 proves,
        so ignoring it never widens what a peer can do."""

        async def one(key: str) -> list[ManifestEntry]:
            try:
                info = await self.stat(key)
                if info.size > MAX_MANIFEST_BYTES:
                    raise ValueError(f"{info.size} bytes, more than {MAX_MANIFEST_BYTES >> 20} MiB")
                raw = await self.read_bytes(info, 0, info.size)
                return list((await asyncio.to_thread(parse_manifest, raw)).entries.values())
            except NotFound:
                return []
            except (SpotstartError, ValueError) as exc:
                self.progress.on_message(f"manifest {self._display_key(key)}: ignored ({exc})")
                return []

        # All candidates at once (at most 32 small requests), nearest first in the result.
        candidates = manifest_candidates(self.url.scheme, self.url.key, keys)
        out: dict[str, list[ManifestEntry]] = {}
        for found in await asyncio.gather(*(one(k) for k in candidates)):
            for e in found:
                out.setdefault(e.url, []).append(e)
        return out

    def _display_key(self, key: str) -> str:
        return f"{self.url.scheme}://{self.url.bucket}/{key}" if self.url.bucket else key

    async def _transfer(self, files: list[TransferFile]) -> None:
        loop = asyncio.get_running_loop()
        running: dict[asyncio.Task[Any], tuple[TransferFile, planning.Chunk]] = {}
        finishing: set[asyncio.Task[Any]] = set()
        pending = self._pending(files)
        lookahead: deque[tuple[TransferFile, planning.Chunk]] = deque()
        # With peers and files they may give, chunks go out in the swarm's order (rarest
        # first from peers, this node's ring share from the origin, the rest waited for);
        # else in file order, each file opened as reached.
        swarm = (
            _Swarm(self, files, self.peers)
            if self.peers is not None and any(f.peer_id is not None for f in files)
            else None
        )
        exhausted = False
        committer = asyncio.create_task(self._commit_loop(files))
        try:
            while True:
                wake: float | None = None
                if swarm is not None:
                    swarm.tick(loop.time())
                while not exhausted and len(running) < self.controller.target:
                    origin_first = False
                    if swarm is not None:
                        got = swarm.take(loop.time(), len(running))
                        if got is None:
                            exhausted = True
                            break
                        if isinstance(got, float):
                            wake = got  # nothing to hand out before then
                            break
                        f, ch, origin_first = got
                    else:
                        if not lookahead:
                            try:
                                lookahead.append(next(pending))
                            except StopIteration:
                                exhausted = True
                                break
                        f, ch = lookahead.popleft()
                    task = asyncio.create_task(self._fetch_chunk(f, ch, origin_first=origin_first))
                    running[task] = (f, ch)
                # Files fully resumed from their journal have nothing to fetch.
                for f in files:
                    if f.target is not None and f.remaining == 0 and not f.finishing:
                        f.finishing = True
                        finishing.add(asyncio.create_task(self._finish(f)))
                if not running and exhausted and not finishing:
                    break
                waitables: set[asyncio.Task[Any]] = set(running) | finishing
                timeout = self.config.concurrency.probe_interval_s
                if wake is not None:  # or sooner: a chunk left to its owner falls to us
                    timeout = max(0.01, min(timeout, wake - loop.time()))
                if not waitables:  # waiting for other nodes only: ask the picker again
                    await asyncio.sleep(timeout)
                    done: set[asyncio.Task[Any]] = set()
                else:
                    done, _ = await asyncio.wait(
                        waitables, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                    )
                for t in done:
                    if t in finishing:
                        finishing.discard(t)
                        t.result()
                        continue
                    f, ch = running.pop(t)
                    _landed(f, ch.index, t.result())  # raises the chunk's fatal error
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

    def _direct_window(self, f: TransferFile, ch: planning.Chunk) -> Window | None:
        """Where the direct reader may receive this chunk from the origin: the target's
        window, when the store signs requests for it."""
        if self._no_direct or not self.config.http.direct_reads:
            return None
        if not hasattr(self.source, "range_request"):
            return None
        return self._target_window(f, ch)

    def _target_window(self, f: TransferFile, ch: planning.Chunk) -> Window | None:
        """The target's landing for this chunk (None: the target takes only streams)."""
        window = getattr(f.target, "window", None)
        if window is None:
            return None
        # An in-order MD5 rereads what lands: keep those bytes in the page cache.
        return cast(
            "Window | None",
            window(ch.start, ch.length, f.crc_algorithm, reread=f.md5 is not None),
        )

    async def _read_direct(self, f: TransferFile, ch: planning.Chunk, window: Window) -> int:
        """One chunk from the origin by the direct reader; returns its CRC."""
        source = cast(DirectRangeSource, self.source)
        req = await source.range_request(f.info, ch.start, ch.length)
        t0 = asyncio.get_running_loop().time()
        crc = await self._land(self._reader(), req, f, ch, window)
        self.counters.direct_chunks += 1
        if self.peers is not None and ch.length >= (1 << 20):
            rate = ch.length / max(1e-6, asyncio.get_running_loop().time() - t0)
            old = self.peers.origin_rate
            self.peers.origin_rate = rate if not old else 0.8 * old + 0.2 * rate
        return crc

    async def _land(
        self,
        reader: DirectReader,
        req: RangeRequest,
        f: TransferFile,
        ch: planning.Chunk,
        window: Window | _CheckedWindow,
    ) -> int:
        """``req`` read by ``reader`` on the scheduler's threads into ``window``; its CRC.
        Progress counted as bytes arrive is rolled back on any failure; a local write
        failure comes out as our LocalIOError, anything else as the reader raised it."""
        loop = asyncio.get_running_loop()
        threads = self._threads()  # made here, on the loop: once
        counted = [0]

        def arrived(n: int) -> None:  # a worker thread: hand the count to the loop
            loop.call_soon_threadsafe(self._count, f, n, counted)

        def work() -> int:
            reader.read_into(req, ch.start, ch.length, f.info.size, window, arrived)
            return window.crc(f.crc_algorithm)

        try:
            return await loop.run_in_executor(threads, work)
        except SinkError as exc:
            self.progress.on_bytes(-counted[0])
            raise local_error(f.local_path or Path(f.rel), exc.cause, "writing") from exc
        except BaseException:
            # The thread's counts were queued before its result: they have all run here.
            self.progress.on_bytes(-counted[0])
            raise

    def _count(self, f: TransferFile, n: int, counted: list[int]) -> None:
        """Bytes the direct reader received (called on the loop)."""
        counted[0] += n
        self.counters.bytes_transferred += n
        f.bytes_transferred += n
        self.progress.on_bytes(n)

    def _reader(self) -> DirectReader:
        if self._direct is None:
            self._direct = DirectReader(self.config.http)
        return self._direct

    def _threads(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                self.config.concurrency.limit, thread_name_prefix="spotstart-read"
            )
        return self._pool

    async def _fetch_chunk(
        self, f: TransferFile, ch: planning.Chunk, *, origin_first: bool = False
    ) -> int:
        """Fetch one chunk with bounded retries; returns its CRC. ``origin_first``: its
        first attempt goes to the origin without asking a peer (this node's single-flight
        share); a retry asks peers as any other (one may hold it by then)."""
        target = f.target
        assert target is not None
        if f.hooks is not None:
            await f.hooks.admit(ch)
        chunk = _ChunkWriter(self, f, target, ch.start)
        skip_peer = origin_first

        async def attempt() -> int:
            nonlocal chunk, skip_peer
            chunk = _ChunkWriter(self, f, target, ch.start)
            skip, skip_peer = skip_peer, False
            if self.peers is not None and f.peer_id is not None and not f.origin_only and not skip:
                crc = await self._from_peer(f, ch)
                if crc is not None:
                    return crc
            try:
                window = self._direct_window(f, ch)
                if window is not None:
                    try:
                        return await self._read_direct(f, ch, window)
                    except DirectUnsupported:
                        self._no_direct = True  # this server's bodies go through the stream
                    finally:
                        window.close()
                await self.source.read(f.info, ch.start, ch.length, chunk.receive)
                await chunk.flush()
                await self._settle(chunk.writes, f)
                return chunk.crc
            except ObjectChanged:
                f.changed = True
                raise

        async def undo() -> None:  # the stream path's writes and counts (direct: its own)
            await asyncio.gather(*chunk.writes, return_exceptions=True)
            self.progress.on_bytes(-chunk.written)

        return await self._retrying(
            attempt,
            f.display,
            self.config.retry.max_attempts,
            exhausted=lambda n, exc: self._exhausted(f, ch, n, exc),
            undo=undo,
        )

    async def _from_peer(self, f: TransferFile, ch: planning.Chunk) -> int | None:
        """The chunk from a peer that holds it, or None (no such peer, or it failed: the
        caller takes the origin, at no retry's cost). A peer that errs or stalls is dropped;
        a busy one (503) is skipped for a second."""
        peers = self.peers
        assert peers is not None
        oid = f.peer_id
        assert oid is not None
        peer = peers.pick(oid, ch.start, ch.start + ch.length)
        if peer is None:
            return None
        window = self._target_window(f, ch)
        if window is None:
            return None
        check = PieceHasher(f.manifest.pieces_in(ch.start, ch.length)) if f.manifest else None
        if self._peer_reader is None:
            http = self.config.http
            self._peer_reader = DirectReader(
                replace(
                    http,
                    stall_timeout_s=peers.spec.stall_timeout_s,
                    connect_timeout_s=peers.spec.connect_timeout_s,
                )
            )
        req = RangeRequest(
            peer.base + OBJECTS_PATH + oid,
            peers.headers(),
            what=f"peer {peer.address}",
            exact=True,
            deadline_s=peers.spec.chunk_deadline_s(ch.length, peers.origin_rate),
        )
        loop = asyncio.get_running_loop()
        peer.in_flight += 1
        t0 = loop.time()
        try:
            landing = _CheckedWindow(window, check) if check is not None else window
            crc = await self._land(self._peer_reader, req, f, ch, landing)
        except LocalIOError:
            raise  # our disk, not the peer: the origin's bytes would not land either
        except Exception as exc:  # whatever a peer sends, it never fails a fetch
            peers.failed(peer, oid, exc)
            return None
        finally:
            peer.in_flight -= 1
            window.close()
        obj = peer.holdings.get(oid)
        published = (
            obj.crc_of(f.chunk_bytes, f.crc_algorithm.name, tuple(f.info.parts), ch.index)
            if obj is not None
            else None
        )
        # The published CRC is a hint (it finds a broken peer early), never proof: the
        # manifest's SHA-256 pieces are, or else the origin's MD5 at the end.
        reason = None
        if check is not None and (bad := check.mismatch()) is not None:
            reason = f"chunk {ch.index} of {f.rel}: {bad}"
        elif published is not None and published != crc:
            reason = f"chunk {ch.index} of {f.rel} does not match the CRC it published"
        if reason is not None:
            self.progress.on_bytes(-ch.length)  # all of it arrived, and counted: roll it back
            peers.drop(peer, reason)
            self.progress.on_message(f"peer {peer.address} dropped: {reason}")
            return None
        peers.served(peer, oid, ch.length, loop.time() - t0)
        self.counters.bytes_from_peers += ch.length
        self.counters.direct_chunks += 1
        f.from_peers[ch.index] = (peer.address, crc)
        f.peer_bytes = True
        return crc

    async def _settle(self, writes: list[asyncio.Future[None]], f: TransferFile) -> None:
        try:
            await asyncio.gather(*writes)
        except OSError as exc:
            raise local_error(f.local_path or Path(f.rel), exc, "writing") from exc

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
            if not ok and f.from_peers:
                await self._recheck_peer_chunks(f, detail)
                ok, kinds, detail = await asyncio.to_thread(self._verify, f, None)
            if ok:
                f.verified = kinds
                f.uncommitted.update(f.unproven)  # proven by the whole-object check
                f.unproven = {}
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
        """Size, then the store's strongest checksum; when peers gave bytes, also what
        proves theirs: the manifest (pieces checked on arrival; with --verify full the whole
        object's SHA-256 from disk), else the origin's MD5 recomputed from disk (a CRC
        alone never: it is forgeable). Returns (ok, kinds that proved it, what failed)."""
        assert f.target is not None
        size = f.target.stored_size()
        if size != f.info.size:
            return False, (), f"size {size} != {f.info.size}"
        sums = f.info.checksums
        if self.config.verify == "size":
            return True, ("size",), ""
        full = self.config.verify == "full"
        kinds: list[str] = ["size"]
        if sums.crc is not None:
            crcs = _crcs_of(f.target, f.chunks, f.crc_algorithm) if full else f.crcs
            ok, crc_kinds, detail = _check_crc(f, ALGORITHMS[sums.crc[0]], sums.crc[1], crcs)
            if not ok:
                return ok, crc_kinds, detail
            kinds = list(crc_kinds)
        peer_proof = f.peer_bytes and f.manifest is None
        digest = _crypto_digest(f.info)
        if digest is not None and (sums.crc is None or peer_proof):
            want = {"md5": sums.md5, "md5-of-parts": sums.md5_of_parts}.get(digest, sums.sha256)
            assert want is not None
            if md5 is not None and digest != "sha256":
                got = md5
            elif digest == "md5":
                got = _md5_of(f.target, f.info.size)
            elif digest == "md5-of-parts":
                got = _md5_of_parts(f.target, f.info.parts)
            else:
                got = _sha256_of(f.target, f.info.size)
            if got != want:
                return False, (), f"{digest} mismatch (got {got.hex()}, want {want.hex()})"
            kinds.append(digest)
        elif peer_proof:  # cannot happen: plan_file gives such objects no peer id
            return False, (), "peer bytes with nothing to prove them"
        if f.manifest is not None and (f.peer_bytes or full):
            if full:
                got = _sha256_of(f.target, f.info.size)
                if got != f.manifest.sha256:
                    wanted = f.manifest.sha256.hex()
                    return False, (), f"sha256 mismatch (got {got.hex()}, manifest {wanted})"
            kinds.append("sha256-manifest")
        return True, tuple(kinds), ""

    async def _recheck_peer_chunks(self, f: TransferFile, detail: str) -> None:
        """The object failed its check and peers gave some of it: fetch those chunks again
        from the origin; a peer whose chunk differs is dropped and reported."""
        f.origin_only = True
        given, f.from_peers = f.from_peers, {}
        self.progress.on_message(
            f"{f.rel}: {detail}; {len(given)} chunks came from peers, fetching them from the origin"
        )

        def lied(index: int) -> None:
            peer = self.peers.peers.get(given[index][0]) if self.peers is not None else None
            if self.peers is not None and peer is not None and peer.dropped is None:
                self.peers.drop(peer, "served bytes that fail the origin's checksum")
                self.progress.on_message(
                    f"peer {peer.address} dropped: its bytes of {f.rel} fail the origin's checksum"
                )

        chunks = [ch for ch in f.chunks if ch.index in given]
        # A CRC cannot tell which chunk lied (a forged chunk keeps its CRC): compare what
        # the peers gave with what the origin gives now, by SHA-256 of the landed bytes.
        target = f.target
        assert target is not None

        def digests() -> dict[int, bytes]:
            out = {}
            for ch in chunks:
                h = hashlib.sha256()
                _hash_target(h, target, ch.start, ch.length)
                out[ch.index] = h.digest()
            return out

        before = await asyncio.to_thread(digests)
        await self._refetch(f, chunks)
        after = await asyncio.to_thread(digests)
        for index, digest in before.items():
            if after[index] != digest:
                lied(index)

    async def _refetch_all(self, f: TransferFile) -> None:
        """Fetch every chunk again; those whose CRC changed were the bad ones."""
        await self._refetch(f, f.chunks)

    async def _refetch(
        self,
        f: TransferFile,
        chunks: list[planning.Chunk],
        changed: Callable[[int], None] | None = None,
    ) -> None:
        """Fetch ``chunks`` again; one whose CRC differs from the one recorded was bad: it is
        counted, ``changed(index)`` told, and the new CRC recorded."""
        sem = asyncio.Semaphore(max(1, self.controller.target))

        async def one(ch: planning.Chunk) -> None:
            async with sem:
                crc = await self._fetch_chunk(f, ch)
            if crc != f.crcs.get(ch.index):
                self.counters.refetched_chunks += 1
                if changed is not None:
                    changed(ch.index)
            _landed(f, ch.index, crc)

        await asyncio.gather(*(one(ch) for ch in chunks))


_Key = tuple[int, int]  # (index of the file in the run, index of the chunk in the file)


class _Picker(ChunkPicker[_Key]):
    """The swarm's :class:`ChunkPicker`, its chunks added as their files are opened.
    ``plain(key)``: a chunk the swarm does not order (its file has no peer identity, a
    consumer takes its bytes in order, or a check sent it to the origin only): counted as
    ours on the ring, so it goes out in file order, never waited for, with no holders.
    ``no_wait(owner, key)``: the chunk's owner on the ring is not worth waiting for (see
    :meth:`_Swarm._no_wait`): ours too."""

    def __init__(
        self,
        me: str,
        ring_key: Callable[[_Key], str],
        plain: Callable[[_Key], bool],
        no_wait: Callable[[str, _Key], bool],
        *,
        wait_s: float,
        rng: random.Random,
    ) -> None:
        super().__init__(me, (), ring_key, wait_s=wait_s, rng=rng)
        self.plain = plain
        self.no_wait = no_wait

    def owns(self, key: _Key) -> bool:
        if self.plain(key) or super().owns(key):
            return True
        owner = self.owner(key)
        return owner is not None and self.no_wait(owner, key)


class _Swarm:
    """Which chunk a free stream of a run with peers takes next, and from where (see
    :class:`spotstart.fetch.swarm.ChunkPicker`): chunks some peer holds first, the rarest
    first; then this node's share of the hash ring over the fleet from the origin (one node
    per chunk asks the origin: single-flight); another node's share is waited for, at most
    ``single_flight_wait_s``, then taken from the origin. Files are opened (resumed from
    their journals) when the picker's window reaches them, no more than the streams + 1 at
    a time with chunks left, as in file order."""

    def __init__(self, sched: TransferScheduler, files: list[TransferFile], peers: PeerSet):
        self.sched = sched
        self.files = files
        self.peers = peers
        spec = peers.spec
        # Our node on the ring: the address peers know us by (--serve-peers, $POD_IP); a
        # fetch that serves nothing is no peer's owner, but still takes a share of its own.
        me = peers.me or "self"
        self.picker = _Picker(
            me,
            self._ring_key,
            self._plain,
            self._no_wait,
            wait_s=spec.single_flight_wait_s,
            rng=sched.rng,
        )
        self.opened = 0  # files[:opened] are open (or finished)
        self.open: list[TransferFile] = []  # opened with chunks left (pruned as they land)
        self._holders: dict[_Key, int] = {}
        self.late: set[str] = set()  # nodes that let a chunk's wait run out
        self.seen: set[str] = set()  # polled nodes whose inventory was read this run
        self._fresh_until = float("-inf")
        self._inventories: int | None = None

    def _plain(self, key: _Key) -> bool:
        f = self.files[key[0]]
        return f.peer_id is None or f.hooks is not None or f.origin_only

    def _no_wait(self, owner: str, key: _Key) -> bool:
        """Whether a chunk of ``owner``'s share is taken from the origin at once: the owner
        let one chunk's wait run out already this run (dead, cut off, slow, or not fetching
        this model: one wait per such node, not one per window of chunks); its inventory was
        read before and now it cannot be reached (its fetch ended, and its server with it;
        waited for again once it answers); or it holds the chunk but is busy (it answered
        503: it is not fetching it, and the origin serves while a holder is busy, as before
        the swarm). An owner never reached yet (a node still starting) is waited for."""
        if owner in self.late:
            return True
        peer = self.peers.peers.get(owner)
        if peer is None or peer.dropped is not None:
            return False
        if owner in self.seen and peer.unreachable is not None:
            return True  # it answered before and refuses now: gone (a fetch that ended)
        if peer.busy_until <= self._now():
            return False
        f = self.files[key[0]]
        ch = f.chunks[key[1]]
        assert f.peer_id is not None
        return peer.has(f.peer_id, ch.start, ch.start + ch.length)

    def _hurry(self) -> None:
        """Waiting on other nodes' shares: poll the sampled peers at the base interval (see
        :meth:`PeerSet.hurry`: a share read meanwhile would otherwise be seen only after the
        wait ran out)."""
        self.peers.hurry()

    def _now(self) -> float:
        return self.peers.clock()  # the PeerSet's clock (busy_until)

    def _ring_key(self, key: _Key) -> str:
        return f"{self.files[key[0]].peer_id}:{key[1]}"

    # How long holder counts and the fleet are kept while no inventory changes: a round of
    # the scheduler comes with every chunk that lands, and asking each chunk of the window
    # its holders (window x polled peers) every round would cost the loop seconds of CPU
    # over a large model. A peer gone busy or dropped meanwhile costs nothing: its "peer"
    # pick finds no peer and the origin serves.
    FRESH_S = 0.5

    def tick(self, now: float) -> None:
        """Once per round of the scheduler: the fleet as discovery last saw it and holders
        asked anew, when an inventory changed or ``FRESH_S`` passed."""
        inventories = self.peers.inventories
        if now < self._fresh_until and inventories == self._inventories:
            return
        self._fresh_until, self._inventories = now + self.FRESH_S, inventories
        self.picker.set_fleet(self.peers.fleet())
        self._holders = {}
        for a in self.peers.polled:
            p = self.peers.peers.get(a)
            if p is not None and p.unreachable is None and p.epoch is not None:
                self.seen.add(a)

    def holders(self, key: _Key) -> int:
        n = self._holders.get(key)
        if n is None:
            f = self.files[key[0]]
            if self._plain(key):
                n = 0
            else:
                assert f.peer_id is not None
                ch = f.chunks[key[1]]
                n = self.peers.holders(f.peer_id, ch.start, ch.start + ch.length)
            self._holders[key] = n
        return n

    def _fill(self, running: int) -> None:
        """Open files until the picker's window is full, within the bound on open files."""
        bound = self.sched.controller.target + 1
        while self.opened < len(self.files) and len(self.picker) < self.picker.window:
            self.open = [f for f in self.open if f.remaining > 0]
            if len(self.open) >= bound and (len(self.picker) or running):
                return
            i = self.opened
            f = self.files[i]
            self.sched._open(f)
            self.opened += 1
            keys = [(i, ch.index) for ch in f.chunks if ch.index not in f.crcs]
            if keys:
                self.open.append(f)
                self.picker.add(keys)

    def take(
        self, now: float, running: int
    ) -> tuple[TransferFile, planning.Chunk, bool] | float | None:
        """The next chunk and whether it goes to the origin first; else the time a chunk
        left to its owner falls to us; None when every chunk has been handed out."""
        self._fill(running)
        got = self.picker.next(now, self.holders)
        if isinstance(got, float):
            self._hurry()
        if got is None:
            if self.opened == len(self.files):
                return None
            # the open files' chunks are all in flight: more open as those land
            return now + self.sched.config.concurrency.probe_interval_s
        if isinstance(got, float):
            return got
        f = self.files[got.key[0]]
        ch = f.chunks[got.key[1]]
        if got.source == "peer" or self._plain(got.key):
            return f, ch, False
        if self.picker.owns(got.key):
            self.sched.counters.origin_owned += 1
            return f, ch, True
        self.sched.counters.origin_after_wait += 1
        owner = self.picker.owner(got.key)
        if owner is not None and owner not in self.late:
            self.late.add(owner)
            if len(self.late) == 1:  # once: the peer's own troubles are told by PeerSet
                self.sched.progress.on_message(
                    f"{f.rel}: chunk {ch.index} was left to another node's single-flight share "
                    f"for {self.picker.wait_s:g} s and no peer holds it yet: fetching it from "
                    "the origin, and that node's share from now on (so for any other such node)"
                )
        return f, ch, True


class _CheckedWindow:
    """A peer chunk's landing, every byte shown to the manifest's piece hasher as it lands
    (on the reader's thread, after ``recv_into`` and before the window writes it out)."""

    def __init__(self, window: Window, check: PieceHasher) -> None:
        self.window, self.check = window, check
        self._last: memoryview | None = None

    def space(self) -> memoryview:
        self._last = self.window.space()
        return self._last

    def took(self, n: int) -> None:
        assert self._last is not None
        self.check.update(self._last[:n])
        self.window.took(n)

    def crc(self, algorithm: CrcAlgorithm) -> int:
        return self.window.crc(algorithm)


def _crypto_digest(info: ObjectInfo) -> str | None:
    """The cryptographic digest the origin gives for the whole object (what proves peer
    bytes when no manifest covers it), or None: a CRC or a size is no proof."""
    sums = info.checksums
    if sums.md5 is not None:
        return "md5"  # first: streamed beside the transfer when there is no CRC
    if sums.md5_of_parts is not None and info.parts:
        return "md5-of-parts"
    if sums.sha256 is not None:
        return "sha256"
    return None


def _landed(f: TransferFile, index: int, crc: int) -> None:
    """Chunk ``index`` is in place: journal it, unless a peer gave it and nothing has proven
    it yet (no manifest: the whole-object digest in _finish does)."""
    f.crcs[index] = crc
    if index in f.from_peers and f.manifest is None:
        f.unproven[index] = crc
        f.uncommitted.pop(index, None)
    else:
        f.uncommitted[index] = crc
        f.unproven.pop(index, None)
    if f.hooks is not None:
        f.hooks.landed(index)


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
    return sums.crc is not None or _crypto_digest(f.info) is not None or f.manifest is not None


def _sha256_of(target: FileTarget, size: int) -> bytes:
    h = hashlib.sha256()
    _hash_target(h, target, 0, size)
    return h.digest()


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


def record_in(cache: CacheIndex, min_interval_s: float = 0.0) -> Callable[[TransferFile], None]:
    """The ``on_done`` of a file that lands on disk: its object version goes into ``cache``
    (fetch's DEST index, load's cache_dir index), saved at most every ``min_interval_s``
    (rewriting the index after every file is quadratic for big trees; the caller saves once
    more at the end)."""

    def done(f: TransferFile) -> None:
        assert f.local_path is not None, "only files on disk are cached"
        crcs = tuple(f.crcs.get(ch.index, 0) for ch in f.chunks)
        plan = (f.chunk_bytes, f.crc_algorithm.name, tuple(f.info.parts), crcs)
        cache.record(f.rel, f.display, f.info.version, f.info.size, f.local_path, plan)
        cache.save(min_interval_s=min_interval_s)

    return done


def count_verified(files: list[TransferFile]) -> dict[str, int]:
    """How many files each kind of check (size, crc32c, crc32, crc64nvme, md5) verified."""
    verified: dict[str, int] = {}
    for f in files:
        for kind in f.verified:
            verified[kind] = verified.get(kind, 0) + 1
    return verified
