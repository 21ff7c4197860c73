"""Serve the objects a directory holds to peers: ``spotstart serve-peers DIR``, or inside a
running ``spotstart fetch --serve-peers`` (its DEST, chunks included as they arrive).

Read-only HTTP/1.1, two routes:

- ``GET /v1/inventory``: ``{"version": 1, "objects": [{"id", "size", "ranges", "complete"}]}``
  for every complete file of DIR's cache index (size and mtime as recorded) and every file
  still arriving (the chunks its journal lists as written, nothing else).
- ``GET /v1/objects/<id>`` with one ``Range: bytes=a-b``: ``206`` with those bytes when they
  lie inside what the inventory says; ``416`` otherwise; ``404`` for an id we do not hold.

Objects are looked up by identity (:func:`spotstart.fetch.peers.object_id`) in a table built
from our own state files; a request never names a path, so nothing outside DIR (or inside
it but ours, like the journals) can be read. Files are opened with ``O_NOFOLLOW`` and must
still be the regular file of the recorded size. With a token, every request must carry
``Authorization: Bearer <token>`` (compared in constant time). At most ``max_active``
requests at once; beyond that ``503`` with ``Retry-After``."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import re
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from spotstart.errors import UsageError
from spotstart.fetch import plan as planning
from spotstart.fetch.cache import CacheIndex
from spotstart.fetch.journal import read_journal
from spotstart.fetch.layout import JOURNAL_SUFFIX, PART_SUFFIX, PARTS_DIR, STATE_DIR, normalize
from spotstart.fetch.peers import ID_RE, INVENTORY_PATH, OBJECTS_PATH, object_id
from spotstart.units import parse_host_port

PIECE = 1 << 20
_RANGE = re.compile(r"^bytes=(\d{1,19})-(\d{0,19})$")


@dataclass(frozen=True)
class Holding:
    """One object DIR holds: where (a path of ours), its size, the byte ranges on disk."""

    path: Path
    size: int
    ranges: tuple[tuple[int, int], ...]
    complete: bool
    chunk_bytes: int = 0  # the plan its chunk CRCs are of (with crc and parts)
    crc: str = ""
    parts: tuple[int, ...] = ()
    crcs: tuple[tuple[int, int], ...] = ()  # (chunk index, CRC) of chunks on disk

    def covers(self, start: int, end: int) -> bool:
        return any(lo <= start and end <= hi for lo, hi in self.ranges)


def _merge(ranges: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return tuple(out)


def _regular(path: Path, size: int, mtime_ns: int | None = None) -> bool:
    try:
        st = path.lstat()
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_size != size:
        return False
    return mtime_ns is None or st.st_mtime_ns == mtime_ns


class PeerIndex:
    """DIR's holdings by object id, rebuilt from its state files at most every ``ttl_s``."""

    def __init__(self, root: Path, ttl_s: float = 0.5) -> None:
        self.root = root
        self.ttl_s = ttl_s
        self._at = -1e9
        self._table: dict[str, Holding] = {}

    def table(self) -> dict[str, Holding]:
        now = time.monotonic()
        if now - self._at >= self.ttl_s:
            self._table = self._scan()
            self._at = now
        return self._table

    def _scan(self) -> dict[str, Holding]:
        table: dict[str, Holding] = {}
        for rel, e in CacheIndex(self.root).entries.items():
            try:
                if normalize(rel) != rel:
                    continue  # not a name we would have written
            except ValueError:
                continue
            path = self.root / rel
            if e.size > 0 and _regular(path, e.size, e.mtime_ns):
                oid = object_id(e.source, e.version, e.size)
                crcs: tuple[tuple[int, int], ...] = ()
                if e.chunk_bytes > 0:
                    plan = planning.plan_chunks(
                        e.size, e.chunk_bytes, planning.part_boundaries(e.parts)
                    )
                    with contextlib.suppress(ValueError):
                        if len(plan) == len(e.crcs):
                            crcs = tuple((i, int(c, 16)) for i, c in enumerate(e.crcs))
                table[oid] = Holding(
                    path, e.size, ((0, e.size),), True, e.chunk_bytes, e.crc, e.parts, crcs
                )
        parts = self.root / STATE_DIR / PARTS_DIR
        try:
            journals = [p for p in parts.iterdir() if p.name.endswith(JOURNAL_SUFFIX)]
        except OSError:
            journals = []
        for journal in journals:
            part = journal.with_name(journal.name[: -len(JOURNAL_SUFFIX)] + PART_SUFFIX)
            try:
                header, done, _ = read_journal(journal.read_bytes()[: 64 << 20])
            except OSError:
                continue
            if header is None or not done or not _regular(part, header.size):
                continue
            oid = object_id(header.source, header.version, header.size)
            if oid in table:
                continue
            chunks = planning.plan_chunks(
                header.size, header.chunk_bytes, planning.part_boundaries(header.parts)
            )
            got = [(c.start, c.start + c.length) for c in chunks if c.index in done]
            table[oid] = Holding(
                part,
                header.size,
                _merge(got),
                False,
                header.chunk_bytes,
                header.crc,
                header.parts,
                tuple(sorted((i, c) for i, c in done.items() if i < len(chunks))),
            )
        return table

    def inventory(self) -> dict[str, object]:
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
                for oid, h in sorted(self.table().items())
            ],
        }


class PeerServer:
    """The HTTP server over a :class:`PeerIndex`; ``start`` binds, ``close`` stops."""

    def __init__(self, root: Path, *, token: str | None = None, max_active: int = 64) -> None:
        self.index = PeerIndex(root)
        self.token = token
        self.max_active = max_active
        self.active = 0
        self.bytes_served = 0
        self.requests = 0
        self._runner: web.AppRunner | None = None
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=4096)
        app.router.add_get(INVENTORY_PATH, self._inventory)
        app.router.add_get(OBJECTS_PATH + "{oid}", self._object)
        return app

    async def start(self, host: str, port: int) -> int:
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        server = site._server  # aiohttp keeps the bound socket here: port 0 needs it
        sockets = getattr(server, "sockets", None) or []
        self.port = int(sockets[0].getsockname()[1]) if sockets else port
        return self.port

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _guard(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        self.requests += 1
        if self.token is not None:
            sent = request.headers.get("Authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Bearer {self.token}".encode()):
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

    async def _inventory(self, request: web.Request) -> web.Response:
        body = await asyncio.to_thread(lambda: json.dumps(self.index.inventory()))
        return web.Response(text=body, content_type="application/json")

    async def _object(self, request: web.Request) -> web.StreamResponse:
        oid = request.match_info["oid"]
        holding = self.index.table().get(oid) if ID_RE.match(oid) else None
        if holding is None:
            return web.Response(status=404, text="no such object here\n")
        m = _RANGE.match(request.headers.get("Range", "").strip())
        start = int(m.group(1)) if m else -1
        end = (int(m.group(2)) + 1 if m.group(2) else holding.size) if m else -1
        end = min(end, holding.size)
        if not m or start >= end or not holding.covers(start, end):
            return web.Response(
                status=416,
                text="one Range inside the bytes this peer holds is required\n",
                headers={"Content-Range": f"bytes */{holding.size}"},
            )
        try:
            fd = os.open(holding.path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return web.Response(status=404, text="gone\n")
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size != holding.size:
                return web.Response(status=404, text="gone\n")
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
                await resp.write(data)
                at += len(data)
                self.bytes_served += len(data)
            await resp.write_eof()
            return resp
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)


def split_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``; port 0 picks one) for a listening socket."""
    try:
        host, port = parse_host_port(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return host or "0.0.0.0", port
