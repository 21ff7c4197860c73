"""Serve the objects a directory holds to peers: ``spotstart serve-peers DIR``, or inside a
running ``spotstart fetch --serve-peers`` (its DEST, chunks included as they arrive), or beside
the guard on a thread of its own (``guard --serve-peers``).

Read-only HTTP/1.1, two routes:

- ``GET /v1/inventory``: ``{"version": 1, "objects": [{"id", "size", "ranges", "complete"}]}``
  for every complete file of DIR's cache index (size and mtime as recorded) and every file
  still arriving (the chunks its journal lists as written, nothing else).
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
:class:`spotstart.listen.BoundedListener`."""

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
import stat
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

from aiohttp import web

from spotstart.errors import UsageError
from spotstart.fetch import plan as planning
from spotstart.fetch.cache import INDEX_NAME, CacheEntry
from spotstart.fetch.journal import read_journal
from spotstart.fetch.layout import JOURNAL_SUFFIX, PART_SUFFIX, PARTS_DIR, STATE_DIR, normalize
from spotstart.fetch.peers import ID_RE, INVENTORY_PATH, OBJECTS_PATH, object_id
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
        table, parts, unused = await asyncio.to_thread(self._scan, dict(self._parts), started)
        self._table, self._parts, self._at = table, parts, started
        self.scans += 1
        for fd in unused:
            os.close(fd)

    async def close(self) -> None:
        if self._scan_task is not None:
            await asyncio.gather(self._scan_task, return_exceptions=True)
        for part in self._parts.values():
            with contextlib.suppress(OSError):
                os.close(part.fd)
        self._parts, self._table = {}, {}
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1

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

    async def inventory(self) -> dict[str, object]:
        table = await self.table()
        return {
            "version": 1,
            "objects": [
                {
                    "id": oid,
                    "size": h.size,
                    "ranges": [list(r) for r in h.ranges],
                    "complete": h.complete,
                    "chunks": {
                        "bytes": h.chunk_bytes,
                        "crc": h.crc,
                        "parts": list(h.parts),
                        "crcs": {str(i): f"{c:x}" for i, c in h.crcs},
                    },
                }
                for oid, h in sorted(table.items())
            ],
        }

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
    ) -> None:
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
        doc = await self.index.inventory()
        body = await asyncio.to_thread(json.dumps, doc)
        return web.Response(text=body, content_type="application/json")

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
            data = await asyncio.to_thread(os.pread, fd, min(PIECE, end - at), at)
            if not data:
                break  # the file shrank under us: the client sees a short body
            # A reader that stops reading must not hold a slot for ever.
            await asyncio.wait_for(resp.write(data), self.send_stall_s)
            at += len(data)
            self.bytes_served += len(data)
        await resp.write_eof()
        return resp


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
