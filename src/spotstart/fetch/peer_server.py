"""Serve the objects a directory holds to peers: ``spotstart serve-peers DIR``, or inside a
running ``spotstart fetch --serve-peers`` (its DEST, chunks included as they arrive), or beside
the guard on a thread of its own (``guard --serve-peers``).

Read-only HTTP/1.1, two routes:

- ``GET /v1/inventory[?since=<epoch>.<seq>]``: ``{"version": 1, "epoch", "seq", "full",
  "objects": [{"id", "size", "ranges", "complete", "chunks"}], "removed": [id...]}`` for every
  complete file of DIR's cache index (size and mtime as recorded) and every file still
  arriving (the chunks its journal lists as written, nothing else); header ``ETag:
  "<epoch>.<seq>"``. ``seq`` counts the rescans that changed anything (``epoch``: random per
  start). With a ``since`` of this epoch no older than :data:`MAX_HISTORY` changes, a delta
  (``full`` false): the objects changed after it (whole ranges, only the chunk CRCs added
  after it) and the ids gone since; any other ``since`` (absent, malformed, foreign, too old)
  gets everything. ``If-None-Match`` equal to the ETag: ``304``, no body.
- ``GET /v1/objects/<id>`` with one ``Range: bytes=a-b``: ``206`` with those bytes when they
  lie inside what the inventory says; ``416`` otherwise; ``404`` for an id we do not hold.

Who can reach it: whoever can reach the address it listens on (the CLI refuses a non-loopback
address without a token unless told ``--no-token``). What they can get: byte ranges of the
objects DIR's own state files list, nothing else. Objects are looked up by identity
(:func:`spotstart.fetch.peers.object_id`) in a table built from our own state files; a request
never names a path. Every file (state files included) is opened beneath a descriptor of DIR
with no symlink followed in any component (:func:`spotstart.safefs.open_beneath`), and must
still be the regular file of the recorded size and mtime. A part file is held open from the
scan that found it, so a file renamed into place mid-serving keeps being served from the same
inode until the cache index lists it. With a token, every request must carry ``Authorization:
Bearer <token>`` (compared in constant time). At most ``max_active`` requests at once (beyond
that ``503`` with ``Retry-After``); connections, head deadlines and accept errors are bounded by
:class:`spotstart.listen.BoundedListener`. With ``max_rate``, every object body served shares one
:class:`spotstart.fetch.swarm.TokenBucket` (the uplink is shared with this node's own fetch
and every peer asking it)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import hmac
import json
import logging
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from aiohttp import web

from spotstart.errors import UsageError
from spotstart.fetch import plan as planning
from spotstart.fetch.cache import INDEX_NAME, CacheEntry
from spotstart.fetch.journal import read_journal
from spotstart.fetch.layout import JOURNAL_SUFFIX, PART_SUFFIX, PARTS_DIR, STATE_DIR, normalize
from spotstart.fetch.peers import ID_RE, INVENTORY_PATH, OBJECTS_PATH, object_id
from spotstart.fetch.swarm import TokenBucket
from spotstart.listen import BoundedListener, ListenLimits, request_error_log
from spotstart.safefs import open_beneath, stat_beneath
from spotstart.units import parse_host_port

PIECE = 1 << 20
MAX_STATE_BYTES = 64 << 20  # a cache index or journal larger than this is not one we wrote
# How long a part file whose journal vanished (renamed into place) is still served from the
# descriptor held on it, while the fetch has not yet saved the cache index that lists it.
RETAIN_S = 300.0
# ASCII digits only: \d alone takes any Unicode digit, which int() reads ("٣" is 3).
_RANGE = re.compile(r"bytes=([0-9]{1,19})-([0-9]{0,19})")
_FILE_FLAGS = os.O_RDONLY | os.O_NONBLOCK  # NONBLOCK: a FIFO planted under DIR cannot hang us
# Inventory versions. A ``since`` more than MAX_HISTORY changes old gets the full document; at
# most MAX_REMOVED removed ids are remembered (forgetting one makes every ``since`` before its
# removal get the full document). Neither grows with what peers send.
MAX_HISTORY = 1024
MAX_REMOVED = 4096
MAX_QUERY = 256  # a longer query string is not one of ours: the full document
MAX_CACHED_DOCUMENTS = 8  # inventory bodies kept for the current seq (full, and deltas)
# ``<16 lowercase hex>.<seq>``, ASCII only, at most 18 digits (no int() of a huge number)
_SINCE = re.compile(r"([0-9a-f]{16})\.(0|[1-9][0-9]{0,17})")
# A paced server writes pieces of about an eighth of a second of its rate (a peer reading a
# slow server sees bytes often, not a second-long silence), at least this many bytes.
MIN_PACED_PIECE = 64 << 10


@dataclass(frozen=True)
class Holding:
    """One object DIR holds: where (``rel``, beneath DIR; or ``fd``, a part file held open),
    its size, the byte ranges on disk."""

    rel: str
    size: int
    ranges: tuple[tuple[int, int], ...]
    complete: bool
    chunk_bytes: int = 0  # the plan its chunk CRCs are of (with crc and parts)
    crc: str = ""
    parts: tuple[int, ...] = ()
    crcs: tuple[tuple[int, int], ...] = ()  # (chunk index, CRC) of chunks on disk
    mtime_ns: int | None = None  # complete files: as the cache index recorded it
    fd: int | None = None  # part files: held by the index (dup it to use it)

    def covers(self, start: int, end: int) -> bool:
        return any(lo <= start and end <= hi for lo, hi in self.ranges)


@dataclass(frozen=True)
class _Part:
    """A part file the index holds open: its inode, what it holds, and since when its journal
    is gone (None while it is there)."""

    oid: str
    fd: int
    inode: tuple[int, int]
    holding: Holding
    gone_at: float | None = None


def parse_since(query: str) -> tuple[str, int] | None:
    """``(epoch, seq)`` from an inventory request's raw query string, or None (the full
    document) for anything but exactly one well-formed ``since``: what a stranger sends here
    is read with one bounded regex, never int() of an unbounded or non-ASCII number.

    >>> parse_since("since=0123456789abcdef.42"), parse_since("since=0123456789abcdef.٤٢")
    (('0123456789abcdef', 42), None)
    """
    if not query or len(query) > MAX_QUERY:
        return None
    values = [p[6:] for p in query.split("&") if p.startswith("since=")]
    if len(values) != 1:
        return None
    m = _SINCE.fullmatch(values[0])
    return (m.group(1), int(m.group(2))) if m else None


def _plan_of(h: Holding) -> tuple[int, str, tuple[int, ...]]:
    return h.chunk_bytes, h.crc, h.parts


def _same(a: Holding, b: Holding) -> bool:
    """Whether a peer's view of ``a`` and ``b`` (what the inventory says of them) is equal."""
    return (a.size, a.ranges, a.complete, _plan_of(a), a.crcs) == (
        b.size,
        b.ranges,
        b.complete,
        _plan_of(b),
        b.crcs,
    )


@dataclass(frozen=True)
class Versions:
    """The versions of one index's holdings: ``seq`` counts the rescans that changed anything;
    per holding, the seq of its last change (``changed``) and of each chunk CRC's arrival
    (``chunks``); the ids removed and when (at most :data:`MAX_REMOVED`). Never mutated: a
    rescan makes the next one (:meth:`advance`), sharing what did not change.

    Memory: one int per holding and per chunk CRC held (about 8,750 for a 140 GB model in
    16 MiB chunks), plus at most MAX_REMOVED ids; nothing a request sends adds to it."""

    epoch: str
    seq: int = 0
    floor: int = 0  # a since below this (its removals forgotten) gets the full document
    changed: Mapping[str, int] = field(default_factory=dict)
    chunks: Mapping[str, Mapping[int, int]] = field(default_factory=dict)
    removed: Mapping[str, int] = field(default_factory=dict)

    @property
    def etag(self) -> str:
        return f'"{self.epoch}.{self.seq}"'

    def base(self, since: tuple[str, int] | None) -> int | None:
        """The seq a delta is computed from, or None: the full document (no since, another
        epoch, a seq this server never had, or older than what it remembers)."""
        if since is None or since[0] != self.epoch:
            return None
        seq = since[1]
        if seq > self.seq or seq < self.floor or seq < self.seq - MAX_HISTORY:
            return None
        return seq

    def advance(self, old: Mapping[str, Holding], new: Mapping[str, Holding]) -> Versions:
        """The versions after a rescan turned table ``old`` into ``new`` (``self`` when
        nothing a peer sees changed). O(holdings + chunk CRCs of the holdings that changed)."""
        seq = self.seq + 1
        changed = dict(self.changed)
        chunks = dict(self.chunks)
        removed = dict(self.removed)
        moved = False
        for oid, h in new.items():
            was = old.get(oid)
            if was is not None and (was is h or _same(was, h)):
                continue
            moved = True
            changed[oid] = seq
            removed.pop(oid, None)
            prev = chunks.get(oid) if was is not None and _plan_of(was) == _plan_of(h) else None
            if prev is None:  # new, or another plan: every CRC is new (the client replaces)
                chunks[oid] = {i: seq for i, _ in h.crcs}
            else:
                had = dict(was.crcs) if was is not None else {}
                chunks[oid] = {i: prev.get(i, seq) if had.get(i) == c else seq for i, c in h.crcs}
        for oid in old.keys() - new.keys():
            moved = True
            changed.pop(oid, None)
            chunks.pop(oid, None)
            removed.pop(oid, None)
            removed[oid] = seq  # insertion order is seq order
        if not moved:
            return self
        floor = self.floor
        for oid, at in list(removed.items()):
            if len(removed) <= MAX_REMOVED and at >= seq - MAX_HISTORY:
                break
            del removed[oid]
            floor = max(floor, at)
        return Versions(self.epoch, seq, floor, changed, chunks, removed)


def _entry(oid: str, h: Holding, crcs: Iterable[tuple[int, int]]) -> dict[str, object]:
    return {
        "id": oid,
        "size": h.size,
        "ranges": [list(r) for r in h.ranges],
        "complete": h.complete,
        "chunks": {
            "bytes": h.chunk_bytes,
            "crc": h.crc,
            "parts": list(h.parts),
            "crcs": {str(i): f"{c:x}" for i, c in crcs},
        },
    }


def inventory_document(
    table: Mapping[str, Holding], v: Versions, base: int | None
) -> dict[str, object]:
    """The inventory: every holding when ``base`` is None, else the delta after seq
    ``base`` (see the module docstring)."""
    objects: list[dict[str, object]] = []
    for oid, h in sorted(table.items()):
        if base is None:
            objects.append(_entry(oid, h, h.crcs))
            continue
        if v.changed.get(oid, v.seq + 1) <= base:
            continue
        added = v.chunks.get(oid, {})
        objects.append(
            _entry(oid, h, ((i, c) for i, c in h.crcs if added.get(i, v.seq + 1) > base))
        )
    removed = (
        []
        if base is None
        else sorted(o for o, at in v.removed.items() if at > base and o not in table)
    )
    return {
        "version": 1,
        "epoch": v.epoch,
        "seq": v.seq,
        "full": base is None,
        "objects": objects,
        "removed": removed,
    }


def _dumps(table: Mapping[str, Holding], v: Versions, base: int | None) -> bytes:
    return json.dumps(inventory_document(table, v, base)).encode()


def _merge(ranges: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return tuple(out)


def _read_beneath(root_fd: int, rel: str, limit: int = MAX_STATE_BYTES) -> bytes:
    """A state file of ours, no symlink followed, at most ``limit`` bytes (OSError else)."""
    fd = open_beneath(root_fd, rel, _FILE_FLAGS)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", rel)
        chunks, size = [], 0
        while size <= limit and (data := os.read(fd, min(1 << 20, limit + 1 - size))):
            chunks.append(data)
            size += len(data)
        if size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", rel)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _index_entries(root_fd: int) -> dict[str, CacheEntry]:
    try:
        raw = json.loads(_read_beneath(root_fd, f"{STATE_DIR}/{INDEX_NAME}"))
        files = raw.get("files", {})
        return {
            str(k): CacheEntry(
                **{**v, "parts": tuple(v.get("parts", ())), "crcs": tuple(v.get("crcs", ()))}
            )
            for k, v in files.items()
        }
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


class PeerIndex:
    """DIR's holdings by object id, rebuilt from its state files (on a worker thread, one scan
    at a time) at most every ``ttl_s``. Descriptors of part files are opened by scans and closed
    only on the event loop (after a table swap, or by :meth:`close`)."""

    def __init__(self, root: Path, ttl_s: float = 0.5, clock: Callable[[], float] = time.monotonic):
        self.root = root
        self.ttl_s = ttl_s
        self.clock = clock
        self.root_fd = -1  # opened by the first scan that finds DIR (a fetch creates it)
        self._at = -1e18
        self._table: dict[str, Holding] = {}
        self._parts: dict[str, _Part] = {}
        self._scan_task: asyncio.Task[None] | None = None
        self.scans = 0
        self.versions = Versions(secrets.token_hex(8))
        # inventory bodies of the current seq by delta base (None: full), built once each
        self._documents: dict[tuple[int, int | None], asyncio.Future[bytes]] = {}

    async def table(self, max_age_s: float | None = None) -> dict[str, Holding]:
        """The holdings, rescanned first when older than ``max_age_s`` (default ``ttl_s``)."""
        age = self.ttl_s if max_age_s is None else max_age_s
        if self.clock() - self._at >= age:
            if self._scan_task is None or self._scan_task.done():
                self._scan_task = asyncio.ensure_future(self._refresh())
            await asyncio.shield(self._scan_task)
        return self._table

    async def _refresh(self) -> None:
        started = self.clock()
        old, versions = self._table, self.versions
        table, parts, unused, versions = await asyncio.to_thread(
            self._scan_versions, dict(self._parts), started, old, versions
        )
        self._table, self._parts, self._at = table, parts, started
        if versions is not self.versions:
            self.versions = versions
            self._documents = {}
        self.scans += 1
        for fd in unused:
            os.close(fd)

    async def close(self) -> None:
        if self._scan_task is not None:
            await asyncio.gather(self._scan_task, return_exceptions=True)
        await asyncio.gather(*self._documents.values(), return_exceptions=True)
        self._documents = {}
        for part in self._parts.values():
            with contextlib.suppress(OSError):
                os.close(part.fd)
        self._parts, self._table = {}, {}
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1

    def _scan_versions(
        self, held: dict[str, _Part], now: float, old: dict[str, Holding], versions: Versions
    ) -> tuple[dict[str, Holding], dict[str, _Part], list[int], Versions]:
        table, parts, unused = self._scan(held, now)
        return table, parts, unused, versions.advance(old, table)

    def _scan(
        self, held: dict[str, _Part], now: float
    ) -> tuple[dict[str, Holding], dict[str, _Part], list[int]]:
        """(table, part files held, descriptors to close). Reads ``held``; never closes."""
        if self.root_fd < 0:
            try:
                self.root_fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                return {}, {}, [p.fd for p in held.values()]
        table = self._complete_files()
        parts: dict[str, _Part] = {}
        unused: list[int] = []
        for name, part in self._arriving(held, now):
            parts[name] = part
            table.setdefault(part.oid, part.holding)
        for name, old in held.items():
            new = parts.get(name)
            if new is not None:
                if new.fd != old.fd:
                    unused.append(old.fd)  # a new file under the old name
                continue
            # Its journal is gone: renamed into place (serve on from the same inode until the
            # index lists it) or discarded (the link count says so).
            gone_at = old.gone_at if old.gone_at is not None else now
            try:
                linked = os.fstat(old.fd).st_nlink > 0
            except OSError:
                linked = False
            if linked and old.oid not in table and now - gone_at < RETAIN_S:
                parts[name] = replace(old, gone_at=gone_at)
                table[old.oid] = old.holding
            else:
                unused.append(old.fd)
        return table, parts, unused

    def _complete_files(self) -> dict[str, Holding]:
        table: dict[str, Holding] = {}
        for rel, e in _index_entries(self.root_fd).items():
            try:
                if normalize(rel) != rel or e.size <= 0:
                    continue  # not a name we would have written
            except ValueError:
                continue
            st = stat_beneath(self.root_fd, rel)
            if st is None or not stat.S_ISREG(st.st_mode) or st.st_size != e.size:
                continue
            if st.st_mtime_ns != e.mtime_ns:
                continue
            oid = object_id(e.source, e.version, e.size)
            crcs: tuple[tuple[int, int], ...] = ()
            if e.chunk_bytes > 0:
                with contextlib.suppress(ValueError):
                    plan = planning.plan_chunks(
                        e.size, e.chunk_bytes, planning.part_boundaries(e.parts)
                    )
                    if len(plan) == len(e.crcs):
                        crcs = tuple((i, int(c, 16)) for i, c in enumerate(e.crcs))
            table[oid] = Holding(
                rel, e.size, ((0, e.size),), True, e.chunk_bytes, e.crc, e.parts, crcs, e.mtime_ns
            )
        return table

    def _arriving(self, held: dict[str, _Part], now: float) -> list[tuple[str, _Part]]:
        """The part files whose journal lists finished chunks, opened (or reused from
        ``held`` when the same inode)."""
        parts_rel = f"{STATE_DIR}/{PARTS_DIR}"
        try:
            dfd = open_beneath(self.root_fd, parts_rel, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return []
        out: list[tuple[str, _Part]] = []
        try:
            names = [n for n in os.listdir(dfd) if n.endswith(JOURNAL_SUFFIX)]
            for journal in names:
                name = journal[: -len(JOURNAL_SUFFIX)] + PART_SUFFIX
                try:
                    header, done, _ = read_journal(_read_beneath(dfd, journal))
                except OSError:
                    continue
                if header is None or not done:
                    continue
                part = self._open_part(dfd, name, header.size, held.get(name))
                if part is None:
                    continue
                fd, inode = part
                chunks = planning.plan_chunks(
                    header.size, header.chunk_bytes, planning.part_boundaries(header.parts)
                )
                got = [(c.start, c.start + c.length) for c in chunks if c.index in done]
                oid = object_id(header.source, header.version, header.size)
                holding = Holding(
                    f"{parts_rel}/{name}",
                    header.size,
                    _merge(got),
                    False,
                    header.chunk_bytes,
                    header.crc,
                    header.parts,
                    tuple(sorted((i, c) for i, c in done.items() if i < len(chunks))),
                    fd=fd,
                )
                out.append((name, _Part(oid, fd, inode, holding)))
        except (OSError, ValueError):
            pass
        finally:
            os.close(dfd)
        return out

    @staticmethod
    def _open_part(
        dfd: int, name: str, size: int, old: _Part | None
    ) -> tuple[int, tuple[int, int]] | None:
        try:
            fd = open_beneath(dfd, name, _FILE_FLAGS)
        except OSError:
            return None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            os.close(fd)
            return None
        inode = (st.st_dev, st.st_ino)
        if old is not None and old.inode == inode:
            os.close(fd)
            return old.fd, inode
        return fd, inode

    async def inventory(self, since: tuple[str, int] | None = None) -> dict[str, object]:
        """The inventory document (the delta after ``since`` when it is one we can answer)."""
        table = await self.table()
        versions = self.versions
        return inventory_document(table, versions, versions.base(since))

    async def document(self, since: tuple[str, int] | None = None) -> tuple[str, bytes]:
        """(ETag, JSON body) of the inventory as :meth:`inventory`, from the current table
        without a rescan; each body is built once per seq (off the loop) and kept, at most
        :data:`MAX_CACHED_DOCUMENTS` of them: many peers asking for the same thing cost one
        build."""
        table, versions = self._table, self.versions
        base = versions.base(since)
        key = (versions.seq, base)
        built = self._documents.get(key)
        if built is None:
            while len(self._documents) >= MAX_CACHED_DOCUMENTS:
                del self._documents[next(iter(self._documents))]
            built = self._documents[key] = asyncio.ensure_future(
                asyncio.to_thread(_dumps, table, versions, base)
            )
        try:
            return versions.etag, await asyncio.shield(built)
        except Exception:
            if self._documents.get(key) is built:
                del self._documents[key]  # not kept: the next request builds it again
            raise

    async def open(self, oid: str) -> tuple[Holding, int] | None:
        """(holding, a descriptor of its bytes for the caller to close), or None when we do not
        hold ``oid``. A miss rescans once (a file may have just moved into place)."""
        for max_age in (None, 0.1):  # a miss rescans, at most ten times a second
            holding = (await self.table(max_age)).get(oid)
            if holding is None:
                continue
            if holding.fd is not None:
                return holding, os.dup(holding.fd)  # now: a later swap may close the original
            if self.root_fd < 0:
                continue
            try:
                fd = open_beneath(self.root_fd, holding.rel, _FILE_FLAGS)
            except OSError:
                continue
            st = os.fstat(fd)
            if (
                stat.S_ISREG(st.st_mode)
                and st.st_size == holding.size
                and st.st_mtime_ns == holding.mtime_ns
            ):
                return holding, fd
            os.close(fd)
        return None


class PeerServer:
    """The HTTP server over a :class:`PeerIndex`; ``start`` binds, ``close`` stops."""

    def __init__(
        self,
        root: Path,
        *,
        token: str | None = None,
        max_active: int = 64,
        limits: ListenLimits | None = None,
        send_stall_s: float = 30.0,
        log: logging.Logger | None = None,
        max_rate: float | None = None,
    ) -> None:
        """``max_rate``: bytes per second of object bodies, every request together (None:
        as fast as the peers read)."""
        if max_rate is not None and not max_rate > 0:
            raise ValueError("max_rate must be > 0")
        self.root = root
        self.token = token
        self.max_active = max_active
        self.limits = limits or ListenLimits()
        self.send_stall_s = send_stall_s
        self.log = log or logging.getLogger("spotstart.peers")
        # aiohttp's own errors (malformed requests...) through a limiter, to this log; an
        # unregistered logger, so each server has its own count.
        self.http_log = request_error_log(self.log)
        self.index: PeerIndex | None = None
        self.active = 0
        self.bytes_served = 0
        self.requests = 0
        self.refused_token = 0
        self.not_modified = 0  # inventory requests answered 304
        self.max_rate = max_rate
        # pieces of an eighth of a second of the rate (at most PIECE): the wait before each is
        # short, and a peer reading us sees bytes often
        self.piece = (
            PIECE if max_rate is None else int(min(PIECE, max(MIN_PACED_PIECE, max_rate / 8)))
        )
        self.bucket: TokenBucket | None = None  # made by start, on the loop's clock
        self.listener: BoundedListener | None = None
        self._runner: web.AppRunner | None = None
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=4096)
        app.router.add_get(INVENTORY_PATH, self._inventory)
        app.router.add_get(OBJECTS_PATH + "{oid}", self._object)
        return app

    async def start(self, host: str, port: int) -> int:
        """Bind ``host:port`` (port 0: any free) and serve; returns the port."""
        self.index = PeerIndex(self.root)
        if self.max_rate is not None:
            now = asyncio.get_running_loop().time()
            self.bucket = TokenBucket(self.max_rate, burst=self.piece, now=now)
        self._runner = web.AppRunner(
            self.app(),
            access_log=None,
            handle_signals=False,
            handler_cancellation=True,  # a client that leaves frees its slot at once
            shutdown_timeout=1.0,
            keepalive_timeout=self.limits.idle_timeout_s,
            max_line_size=4096,
            max_field_size=4096,
            max_headers=32,
            lingering_time=1.0,
            logger=self.http_log,
        )
        await self._runner.setup()
        assert self._runner.server is not None
        self.listener = BoundedListener(self._runner.server, self.limits, self.log, "peer server")
        try:
            self.port = await self.listener.start(host, port)
        except OSError:
            await self.close()
            raise
        return self.port

    async def close(self) -> None:
        if self.listener is not None:
            await self.listener.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.index is not None:
            await self.index.close()
            self.index = None

    @web.middleware
    async def _guard(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        self.requests += 1
        conn = self.listener.connection_of(request.transport) if self.listener else None
        if conn is not None:
            conn.request_started()
        try:
            if self.token is not None:
                sent = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
                if not hmac.compare_digest(sent, f"Bearer {self.token}".encode()):
                    self.refused_token += 1
                    return web.Response(
                        status=401,
                        text="a peer token is required\n",
                        headers={"WWW-Authenticate": 'Bearer realm="spotstart-peers"'},
                    )
            if self.active >= self.max_active:
                return web.Response(status=503, text="busy\n", headers={"Retry-After": "1"})
            self.active += 1
            try:
                return await handler(request)
            finally:
                self.active -= 1
        finally:
            if conn is not None:
                conn.request_done()

    async def _inventory(self, request: web.Request) -> web.Response:
        assert self.index is not None
        # A stranger's query string: one bounded parse; anything else is the full document.
        since = parse_since(request.rel_url.raw_query_string)
        await self.index.table()
        etag = self.index.versions.etag
        # compared as sent (a head field is at most 4 kB: max_field_size)
        if request.headers.get("If-None-Match", "").strip() == etag:
            self.not_modified += 1
            return web.Response(status=304, headers={"ETag": etag})
        etag, body = await self.index.document(since)
        return web.Response(body=body, content_type="application/json", headers={"ETag": etag})

    async def _object(self, request: web.Request) -> web.StreamResponse:
        assert self.index is not None
        oid = request.match_info["oid"]
        opened = await self.index.open(oid) if ID_RE.match(oid) else None
        if opened is None:
            return web.Response(status=404, text="no such object here\n")
        holding, fd = opened
        try:
            return await self._send(request, holding, fd)
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)

    async def _send(self, request: web.Request, holding: Holding, fd: int) -> web.StreamResponse:
        m = _RANGE.fullmatch(request.headers.get("Range", "").strip())
        start = int(m.group(1)) if m else -1
        end = (int(m.group(2)) + 1 if m.group(2) else holding.size) if m else -1
        end = min(end, holding.size)
        if not m or start >= end or not holding.covers(start, end):
            return web.Response(
                status=416,
                text="one Range inside the bytes this peer holds is required\n",
                headers={"Content-Range": f"bytes */{holding.size}"},
            )
        resp = web.StreamResponse(
            status=206,
            headers={
                "Content-Range": f"bytes {start}-{end - 1}/{holding.size}",
                "Content-Type": "application/octet-stream",
                "Accept-Ranges": "bytes",
            },
        )
        resp.content_length = end - start
        await resp.prepare(request)
        at = start
        while at < end:
            n = min(self.piece, end - at)
            await self._pace(n)
            data = await asyncio.to_thread(os.pread, fd, n, at)
            if not data:
                break  # the file shrank under us: the client sees a short body
            # A reader that stops reading must not hold a slot for ever.
            await asyncio.wait_for(resp.write(data), self.send_stall_s)
            at += len(data)
            self.bytes_served += len(data)
        await resp.write_eof()
        return resp

    async def _pace(self, n: int) -> None:
        """Wait for ``n`` bytes' worth of the shared bucket (nothing without max_rate). A
        request that leaves while it waits gives its share back: opening requests and
        leaving cannot run the bucket into a debt that starves the others."""
        bucket = self.bucket
        if bucket is None:
            return
        loop = asyncio.get_running_loop()
        until = loop.time() + bucket.take(n, loop.time())
        try:
            # The wait was computed behind every share taken before ours; shares given back
            # meanwhile (their requests left) are no longer owed: we go as soon as the bucket
            # has paid off everything taken (ours included), not later than computed. Else
            # a peer opening requests and abandoning them would make a reader queued behind
            # them sleep for their shares while the uplink stands idle.
            while (now := loop.time()) < until:
                if bucket.tokens + (now - bucket.at) * bucket.rate >= 0:
                    return
                await asyncio.sleep(min(until - now, bucket.burst / bucket.rate))
        except asyncio.CancelledError:
            bucket.tokens = min(bucket.burst, bucket.tokens + n)
            raise


class PeerServerThread:
    """A :class:`PeerServer` on a thread and event loop of its own, so that whatever a peer
    does to it (a flood, a slowloris, a slow reader) costs the host process's own loop (the
    guard's proxy and probes) nothing but a share of the CPU.

    Example::

        thread = PeerServerThread(PeerServer(root, token=token))
        port = thread.start("0.0.0.0", 8471)  # raises OSError when it cannot bind
        ...
        thread.close()
    """

    def __init__(self, server: PeerServer) -> None:
        self.server = server
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    def start(self, host: str, port: int, timeout_s: float = 30.0) -> int:
        bound: concurrent.futures.Future[int] = concurrent.futures.Future()

        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            try:
                got = await self.server.start(host, port)
            except BaseException as exc:
                bound.set_exception(exc)
                return
            bound.set_result(got)
            try:
                await self._stop.wait()
            finally:
                await self.server.close()

        self._thread = threading.Thread(
            target=asyncio.run, args=(serve(),), name="spotstart-peers", daemon=True
        )
        self._thread.start()
        return bound.result(timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # its loop already ended
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None


def split_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``; port 0 picks one) for a listening socket."""
    try:
        host, port = parse_host_port(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return host or "0.0.0.0", port
