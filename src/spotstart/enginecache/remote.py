"""Restore and publish: the engine cache's I/O with the bucket (and peers), around the pure
parts (key, manifest checks) and the archive code.

Who can reach what, and what they can make us do:

- Whoever can WRITE the bucket prefix can publish a manifest and an archive for any key. Without
  a secret, they choose the code our engine will run (a compiled cache is code): the bucket's
  writers must be trusted. With ``secret``, a manifest must carry a valid HMAC-SHA256 (compared
  in constant time) and the archive must hash to the SHA-256 it names, so they can only deny
  service (a restore fails, the engine starts cold). Either way their archive is extracted
  only after the checks in :mod:`spotstart.enginecache.archive` (no path outside the cache
  directories, no link, no device, no setuid, bounded sizes).
- A PEER (``peers``) can answer with any bytes: the archive is fetched with
  ``spotstart.fetch`` and used only when its SHA-256 equals the manifest's, which is read from
  the origin alone, never from a peer.
- Another replica publishing the same key at once: the archive's name is its content hash,
  and the manifest is created only if none exists (the store's create-only write), so the
  first manifest wins and stays whole; nobody ever sees a manifest whose archive is not
  already in place (the archive is written first).
- Local: every directory beneath ``root`` is ours, 0700, and opened with no link followed
  (spotstart.safefs); a restore extracts into a fresh staging directory and swaps it in.

A restore that fails anywhere leaves every cache directory empty (a half restore is never
used) and says why; ``restore``/``publish`` never raise for remote trouble.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from spotstart import events, safefs
from spotstart.enginecache.archive import ArchiveRefused, FileEntry, extract, file_sha256, pack
from spotstart.enginecache.config import CacheKey, EngineCacheConfig, Outcome
from spotstart.enginecache.dirs import (
    PACKED_DIR,
    archives_dir,
    empty_cache_dirs,
    packed_dirs,
    prepare,
    remove_beneath,
)
from spotstart.enginecache.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, build, check
from spotstart.errors import NotFound, SpotstartError, UsageError
from spotstart.store import (
    HttpOptions,
    ObjectCreator,
    ObjectInfo,
    ObjectWriter,
    RangeSource,
    open_source,
    parse_url,
)

RESTORE_EVENT = "engine-cache-restore"
PUBLISH_EVENT = "engine-cache-publish"


def _base(config: EngineCacheConfig) -> str:
    return config.url.rstrip("/")


def _key_of(url: str) -> tuple[str, str]:
    """(scheme, the key a source opened for ``url`` takes)."""
    parsed = parse_url(url)
    if parsed.scheme == "file":
        return "file", parsed.key.lstrip("/")
    if parsed.scheme in ("http", "https"):
        return parsed.scheme, parsed.key
    return parsed.scheme, parsed.key


def _open(url: str) -> RangeSource:
    return open_source(parse_url(url), HttpOptions())


async def _read_manifest(url: str) -> bytes | None:
    """The manifest's bytes from the origin (bounded), or None when there is none."""
    _, key = _key_of(url)
    source = _open(url)
    try:
        try:
            info = await source.stat(key)
        except NotFound:
            return None
        if info.size > MAX_MANIFEST_BYTES:
            raise ArchiveRefused(f"{url}: {info.size:,} bytes, larger than a manifest may be")
        buf = bytearray()

        async def sink(data: bytes) -> None:
            if len(buf) + len(data) > MAX_MANIFEST_BYTES:
                raise ArchiveRefused(f"{url}: longer than a manifest may be")
            buf.extend(data)

        if info.size:
            await source.read(info, 0, info.size, sink)
        if len(buf) != info.size:
            raise ArchiveRefused(f"{url}: {len(buf):,} bytes read, {info.size:,} stated")
        return bytes(buf)
    finally:
        await source.close()


def _record(event: str, start: float, outcome: Outcome, key: CacheKey) -> Outcome:
    events.record(
        event,
        start,
        time.time(),
        bytes=outcome.bytes,
        detail=outcome.reason[:500],
        fields={"outcome": outcome.status, "key": key.digest},
    )
    return outcome


async def restore(config: EngineCacheConfig, key: CacheKey) -> Outcome:
    """Restore the cache for ``key`` into ``config.root``'s cache directories.

    ``hit``: restored, every file checked; ``miss``: no manifest for the key; ``failed``: the
    reason, with the cache directories left empty. Never raises for remote trouble::

        outcome = await restore(cfg, key)
        if outcome.status != "hit": log.info("engine starts cold: %s", outcome.reason)
    """
    wall0, t0 = time.time(), time.monotonic()
    try:
        root = await asyncio.to_thread(prepare, config)
        # root held open for the whole restore: its parent swapped for a link meanwhile
        # redirects nothing that safefs opens beneath it
        with safefs.pinned_root(root):
            done = False
            try:
                await asyncio.to_thread(empty_cache_dirs, root)
                outcome = await _restore(config, key, root, t0)
                done = outcome.status == "hit"
            finally:
                if not done:
                    with contextlib.suppress(Exception):
                        await asyncio.to_thread(empty_cache_dirs, root)
    except Exception as exc:  # never raises for remote (or local) trouble: the outcome says
        outcome = Outcome("failed", _reason(exc), seconds=time.monotonic() - t0)
    return _record(RESTORE_EVENT, wall0, outcome, key)


def _reason(exc: BaseException) -> str:
    text = (str(exc).strip() or type(exc).__name__).splitlines()[0]
    if not isinstance(exc, SpotstartError):
        text = f"{type(exc).__name__}: {text}"  # not one of ours: say what it was
    return text[:500]


def _plain_http_refused(config: EngineCacheConfig) -> str | None:
    """Why a plain http:// origin from another host is not read without a secret: anyone on
    the network path answers as the bucket, and a cache is code our engine runs."""
    parsed = urlsplit(config.url)
    if parsed.scheme != "http" or config.secret is not None:
        return None
    host = (parsed.hostname or "").strip("[]")
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        if host == "localhost":
            return None
    return (
        f"{_base(config)}: plain http from another host, and no secret: anyone on the path "
        "could serve code to the engine; use https or an engine cache secret"
    )


async def _restore(config: EngineCacheConfig, key: CacheKey, root: Path, t0: float) -> Outcome:
    if (why := _plain_http_refused(config)) is not None:
        return Outcome("failed", why, seconds=time.monotonic() - t0)
    base = f"{_base(config)}/{key.digest}"
    raw = await _read_manifest(f"{base}/{MANIFEST_NAME}")
    if raw is None:
        return Outcome("miss", f"no cache for key {key.digest[:16]} at {_base(config)}")
    archive, files = check(raw, key, config)
    name = str(archive["name"])
    dest = archives_dir(config)
    await _fetch_archive(config, f"{base}/{name}", dest, int(archive["size"]))
    staging = f".staging-{secrets.token_hex(8)}"
    try:
        written, count = await asyncio.to_thread(
            _verify_and_extract, dest, name, str(archive["sha256"]), files, root, staging
        )
        await asyncio.to_thread(_swap_in, root, staging)
    finally:
        await asyncio.to_thread(remove_beneath, root, staging)
    return Outcome(
        "hit",
        f"restored {count} files for key {key.digest[:16]}",
        bytes=written,
        files=count,
        seconds=time.monotonic() - t0,
    )


async def _fetch_archive(config: EngineCacheConfig, url: str, dest: Path, size: int) -> None:
    from spotstart.fetch import FetchConfig, fetch_async
    from spotstart.fetch.peers import PeerSpec

    peers = PeerSpec.parse(list(config.peers), config.peer_token) if config.peers else None
    fcfg = FetchConfig(max_bytes=size, max_objects=1, peers=peers)
    report = await fetch_async(url, dest, fcfg)
    if report.files_total != 1:
        raise ArchiveRefused(f"{url}: names {report.files_total} objects, not one archive")


def _verify_and_extract(
    dest: Path,
    name: str,
    sha256: str,
    files: Mapping[str, FileEntry],
    root: Path,
    staging: str,
) -> tuple[int, int]:
    fd = safefs.open_beneath(dest, name, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        got = file_sha256(dest / name, f.fileno())
        if got != sha256:
            # not kept: fetch would take it as fetched next time (every later restore failing
            # without a download) and this node's PeerServer would serve it to its peers
            with contextlib.suppress(OSError):
                dfd = safefs.open_root_dir(dest)
                try:
                    os.unlink(name, dir_fd=dfd)
                finally:
                    os.close(dfd)
            raise ArchiveRefused(
                f"{dest / name}: sha256 {got[:16]}... differs from the manifest's "
                f"{sha256[:16]}...; not extracted (a bad peer or a changed object)"
            )
        f.seek(0)
        return extract(f, files, root, staging)


def _swap_in(root: Path, staging: str) -> None:
    """Rename each staged cache directory over its (empty) place beneath root."""
    root_fd = safefs.open_root_dir(root)
    try:
        stage_fd = safefs.open_beneath(root_fd, staging, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for local, _ in packed_dirs():
                parent, _, leaf = local.rpartition("/")
                if safefs.stat_beneath(stage_fd, local) is None:
                    continue
                src = (
                    safefs.open_beneath(stage_fd, parent, os.O_RDONLY | os.O_DIRECTORY)
                    if parent
                    else os.dup(stage_fd)
                )
                dst = safefs.private_dir_fd(root_fd, parent) if parent else os.dup(root_fd)
                try:
                    safefs.rename_beneath(src, leaf, dst, leaf)  # over an empty directory
                finally:
                    os.close(src)
                    os.close(dst)
        finally:
            os.close(stage_fd)
    finally:
        os.close(root_fd)


async def publish(config: EngineCacheConfig, key: CacheKey) -> Outcome:
    """Pack what the engine wrote beneath ``config.root`` and publish it for ``key``, once:
    ``published``; ``exists`` when a manifest for the key is there already (ours is not
    written); ``skipped`` (publish off, an http(s) URL, nothing to publish); ``failed``."""
    wall0, t0 = time.time(), time.monotonic()
    try:
        outcome = await _publish(config, key, t0)
    except Exception as exc:  # never raises: the outcome says
        outcome = Outcome("failed", _reason(exc), seconds=time.monotonic() - t0)
    return _record(PUBLISH_EVENT, wall0, outcome, key)


async def _publish(config: EngineCacheConfig, key: CacheKey, t0: float) -> Outcome:
    if not config.publish:
        return Outcome("skipped", "publishing is off")
    base = f"{_base(config)}/{key.digest}"
    scheme, manifest_key = _key_of(f"{base}/{MANIFEST_NAME}")
    if scheme in ("http", "https"):
        return Outcome("skipped", f"{_base(config)}: an http(s) URL is read-only; restore only")
    source = _open(f"{base}/{MANIFEST_NAME}")
    try:
        if not isinstance(source, ObjectCreator | ObjectWriter):
            raise UsageError(f"{_base(config)}: this store takes no writes")
        if await _exists(source, manifest_key):
            return Outcome("exists", f"a cache for key {key.digest[:16]} is published already")
        root = await asyncio.to_thread(prepare, config)
        with safefs.pinned_root(root):
            packed = await asyncio.to_thread(
                pack, root, max_bytes=config.max_bytes, max_files=config.max_files
            )
        try:
            if not packed.files:
                return Outcome("skipped", "the engine wrote nothing to its caches")
            _, archive_key = _key_of(f"{base}/{packed.sha256}.tar.zst")
            body = build(key, packed, config.secret)
            man_name = f".manifest-{secrets.token_hex(8)}.json"
            man_path = root / PACKED_DIR / man_name
            fd = safefs.create_exclusive(root, f"{PACKED_DIR}/{man_name}", 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(body)
            try:
                created = await _create(source, archive_key, packed.path, "application/zstd", True)
                created = await _create(source, manifest_key, man_path, "application/json", False)
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(man_path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(packed.path)
        if not created:
            return Outcome("exists", "another replica published this key first; theirs is kept")
        return Outcome(
            "published",
            f"{len(packed.files)} files, archive {packed.size:,} bytes"
            + (f"; skipped {packed.skipped}" if packed.skipped else ""),
            bytes=packed.bytes_total,
            files=len(packed.files),
            seconds=time.monotonic() - t0,
        )
    finally:
        await source.close()


async def _exists(source: RangeSource, key: str) -> bool:
    try:
        info: ObjectInfo = await source.stat(key)
    except NotFound:
        return False
    return info is not None


async def _create(
    source: RangeSource, key: str, path: Path, content_type: str, content_addressed: bool
) -> bool:
    """Create ``key`` from ``path`` only if absent. A store without create-only writes gets a
    check-then-put (a race two replicas may both win: the content-addressed archive is the
    same bytes either way; for the manifest, the later put replaces the earlier)."""
    if isinstance(source, ObjectCreator):
        return await source.create(key, path, content_type)
    assert isinstance(source, ObjectWriter)
    if await _exists(source, key):
        return False
    data = await asyncio.to_thread(path.read_bytes)
    await source.put(key, data, content_type)
    return True
