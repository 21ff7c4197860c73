"""`spotstart fetch`: resolves a source URL to objects, places them in DEST (names checked,
our working files apart), skips what the cache says is current, and hands the rest to the
transfer scheduler as files on disk. One client of scheduler.py; load is the other."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from spotstart import events, safefs
from spotstart.errors import (
    DiskFull,
    EndpointUnreachable,
    NotFound,
    UsageError,
)
from spotstart.fetch import layout
from spotstart.fetch import plan as planning
from spotstart.fetch.cache import INDEX_DIR, CacheIndex
from spotstart.fetch.config import FetchConfig, FetchReport, FileResult
from spotstart.fetch.journal import local_error
from spotstart.fetch.lock import FileLock, busy
from spotstart.fetch.peers import PeerSpec
from spotstart.fetch.scheduler import (
    NullProgress,
    ProgressListener,
    TransferFile,
    TransferScheduler,
    count_verified,
    record_in,
    source_for,
)
from spotstart.fetch.target import DiskTarget, FileTarget
from spotstart.listen import ListenLimits
from spotstart.store import ObjectInfo, RangeSource, StorageURL, lookup, parse_url
from spotstart.units import format_bytes

T = TypeVar("T")


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
        self.scheduler = TransferScheduler(source, url, config, progress, rng=rng)

    async def resolve(self) -> list[tuple[ObjectInfo, str]]:
        """(object, path relative to DEST) for everything the URL names."""
        url, cfg = self.url, self.config
        found = await lookup(self.source, url.scheme, url.key)
        if found.object is not None:
            if url.scheme in ("http", "https"):
                name = url.key.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] or "index.html"
            else:
                name = found.prefix.rsplit("/", 1)[-1]
            return [(found.object, name)]
        prefix, objects = found.prefix, found.objects
        by_key = {o.key: o for o in objects}
        selected = planning.select_keys(sorted(by_key), prefix, cfg.include, cfg.exclude)
        if not objects:
            raise NotFound(f"{url}: no such object or prefix")
        if not selected:
            raise NotFound(f"{url}: {len(objects)} objects, none matched --include/--exclude")
        infos = await self.scheduler.complete([by_key[k] for k, _ in selected])
        return list(zip(infos, [rel for _, rel in selected], strict=True))

    async def run(self) -> FetchReport:
        server = None
        if self.config.serve_peers:
            # the peer server is aiohttp.web: imported only by the fetches that serve
            from spotstart.fetch.peer_server import PeerServer, split_listen

            host, port = split_listen(self.config.serve_peers)
            spec = self.config.peers or PeerSpec()
            # a quarter of the open files at most: the fetch's own streams and files come first
            limits = ListenLimits.for_process(share=4)
            server = PeerServer(
                self.dest, token=spec.token, limits=limits, max_rate=self.config.serve_max_rate
            )
            try:
                await server.start(host, port)
            except OSError as exc:
                raise UsageError(f"--serve-peers {self.config.serve_peers}: {exc}") from exc
        started = time.time()
        try:
            # DEST, resolved once, is held open from its first use: swapped for a link
            # mid-run by whoever can write its parent, it redirects no file (safefs).
            with safefs.pinned_root(self.dest):
                report = await self._run()
        finally:
            if server is not None:
                await server.close()
        events.record(
            "fetch",
            started,
            time.time(),
            bytes=report.bytes_transferred,
            detail=f"{report.source}: {report.files_fetched} files, "
            f"{report.bytes_from_peers} bytes from peers",
        )
        if server is not None:
            report = dataclasses.replace(report, bytes_served_to_peers=server.bytes_served)
        return report

    async def _run(self) -> FetchReport:
        t0 = time.monotonic()
        try:
            objects = await self.scheduler.with_retries(self.resolve, str(self.url))
        except EndpointUnreachable as exc:
            raise EndpointUnreachable(f"{exc}; check the endpoint URL and network") from exc
        self._check_limits(objects)
        placed = layout.place_objects(objects, self.dest, str(self.url))
        self._check_dest()
        cache = CacheIndex(self.dest)
        stale = [
            (info, safe)
            for info, safe in placed
            if not (self.config.use_cache and self._current(cache, info, safe))
        ]
        locks = await self._lock_files([safe for _, safe in stale])
        try:
            return await self._transfer(objects, placed, {s for _, s in stale}, cache, t0)
        finally:
            for lock in locks:  # after the index is saved: a waiter then finds the file current
                lock.release()

    def _current(self, cache: CacheIndex, info: ObjectInfo, safe: str) -> bool:
        return cache.is_current(
            safe, self.scheduler.display_of(info), info.version, info.size, self.dest / safe
        )

    async def _lock_files(self, rels: list[str]) -> list[FileLock]:
        """The lock of each file this run may write (fetch/lock.py), taken in one order
        (sorted by path) by every runner, so two runners wanting overlapping sets never hold
        one each and wait for the other's. Waits for a lock another fetch holds, unless
        ``config.wait`` is off: then :class:`DestinationBusy`, nothing taken."""
        locks = [FileLock(self.dest, rel) for rel in sorted(rels)]
        held: list[FileLock] = []
        try:
            told = False
            for lock in locks:
                if lock.try_acquire():
                    held.append(lock)
                    continue
                if not self.config.wait:
                    raise busy([x for x in locks if not x.try_acquire()], self.dest)
                if not told:
                    told = True
                    self.progress.on_message(
                        f"{lock.rel}: another fetch into {self.dest} is writing it; waiting "
                        "for it to finish (--no-wait: exit 17 instead)"
                    )
                await lock.acquire()
                held.append(lock)
        except BaseException:
            for lock in locks:
                lock.release()
            raise
        return held

    async def _transfer(
        self,
        objects: list[tuple[ObjectInfo, str]],
        placed: list[tuple[ObjectInfo, str]],
        stale: set[str],
        cache: CacheIndex,
        t0: float,
    ) -> FetchReport:
        # Every file this run may write is ours alone now; one another runner finished
        # while we waited is current in the index it saved before letting go.
        if stale:
            cache.reload()
        files: list[TransferFile] = []
        results: list[FileResult] = []
        bytes_cached = 0
        for info, safe in placed:
            final = self.dest / safe
            # Not ours to write (current when we looked, so not locked), or current now.
            if safe not in stale or (self.config.use_cache and self._current(cache, info, safe)):
                bytes_cached += info.size
                results.append(FileResult(info.key, str(final), info.size, 0, 0, True, ()))
                continue
            files.append(
                self.scheduler.plan_file(
                    info,
                    safe,
                    self._disk_target(final),
                    record_in(cache, min_interval_s=1.0),
                    local_path=final,
                )
            )
        need = sum(f.info.size for f in files)
        self._check_free_space(files)
        self.progress.on_start(files_total=len(objects), bytes_total=need, bytes_done=0)
        for r in results:
            self.progress.on_file_done(Path(r.path).name, cached=True)
        try:
            await self.scheduler.transfer(files)
        finally:
            self.scheduler.close()
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
        c = self.scheduler.counters
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
            concurrency_final=self.scheduler.controller.target,
            chunk_bytes=max((f.chunk_bytes for f in files), default=0),
            chunks_direct=c.direct_chunks,
            bytes_from_peers=c.bytes_from_peers,
            peers_dropped=self.scheduler.peers.dropped() if self.scheduler.peers else {},
            files=tuple(sorted(results, key=lambda r: r.key)),
        )

    def _check_limits(self, objects: list[tuple[ObjectInfo, str]]) -> None:
        """``max_objects``/``max_bytes``, on what this run resolved (the sizes its reads are
        held to): a server that answered a caller's earlier stat with less is refused here,
        before DEST is touched."""
        cfg, total = self.config, sum(info.size for info, _ in objects)
        if cfg.max_objects is not None and len(objects) > cfg.max_objects:
            raise UsageError(
                f"{self.url}: names {len(objects)} objects, more than the {cfg.max_objects} "
                "this fetch takes; nothing was written"
            )
        if cfg.max_bytes is not None and total > cfg.max_bytes:
            raise UsageError(
                f"{self.url}: {total:,} bytes, more than the {cfg.max_bytes:,} this fetch "
                "takes; nothing was written"
            )

    def _check_dest(self) -> None:
        if self.dest.exists() and not self.dest.is_dir():
            raise UsageError(f"{self.dest}: DEST must be a directory")
        try:
            self.dest.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise local_error(self.dest, exc, "creating DEST") from exc

    def _disk_target(self, final: Path) -> Callable[[TransferFile], FileTarget]:
        def make(f: TransferFile) -> FileTarget:
            header = f.journal_header()
            work = layout.work_paths(self.dest, f.rel)
            return DiskTarget(
                final,
                header,
                self.scheduler.writer,
                fsync=self.config.disk.fsync,
                work=work,
                direct_io=self.config.disk.direct_io,
            )

        return make

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
    source = source_for(url, cfg)
    # DEST itself may be the user's link (/nvme/models -> /mnt/disk1): resolved once here;
    # beneath it nothing follows a link (spotstart.safefs).
    dest_path = Path(os.path.realpath(dest))  # noqa: ASYNC240 (a few lstats, once)
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
