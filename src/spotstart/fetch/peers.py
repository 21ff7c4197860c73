"""Peers: other spotstart nodes holding (some of) the objects a fetch needs, on local disk.

A peer is found by a static ``host:port``, by the A/AAAA records of a name (a Kubernetes
headless Service with ``publishNotReadyAddresses: true``, so pods still starting serve what
they have): ``dns:NAME:PORT``, or from ``SPOTSTART_PEERS`` (the same forms, comma
separated). Each peer answers ``GET /v1/inventory`` (the objects it holds and which byte
ranges of each are on its disk) and ``GET /v1/objects/<id>`` with a ``Range`` (see
:mod:`spotstart.fetch.peer_server`). An object is named between peers by its identity, never
by a path: ``sha256(source URL, version, size)``.

Nothing a peer says is trusted: its bytes are checked against the origin's checksum like any
other (a peer that fails it is dropped and reported, its chunks fetched again from the
origin), a peer that errs, stalls or is slower than the origin is left for the origin."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import aiohttp

from spotstart.errors import UsageError
from spotstart.units import parse_host_port

ID_RE = re.compile(r"^[0-9a-f]{64}$")
ENV = "SPOTSTART_PEERS"
INVENTORY_PATH = "/v1/inventory"
OBJECTS_PATH = "/v1/objects/"
TOKEN_ENV = "SPOTSTART_PEER_TOKEN"
MAX_INVENTORY_BYTES = 16 << 20


def object_id(source: str, version: str, size: int) -> str:
    """How peers name an object: its URL, the store's version of it and its size."""
    return hashlib.sha256(f"{source}\n{version}\n{size}".encode()).hexdigest()


@dataclass(frozen=True)
class PeerSpec:
    """Where to look for peers. ``entries``: ``host:port`` or ``dns:NAME:PORT``; ``token``:
    the shared secret peers ask for (``Authorization: Bearer``); ``exclude``: our own
    ``host:port`` (a headless Service lists this pod too)."""

    entries: tuple[str, ...] = ()
    token: str | None = None
    exclude: tuple[str, ...] = ()
    stall_timeout_s: float = 2.0
    connect_timeout_s: float = 1.0
    refresh_s: float = 1.0

    @classmethod
    def parse(
        cls, text: str | Iterable[str] | None, token: str | None = None, **kw: object
    ) -> PeerSpec:
        """From ``--peers`` (or ``SPOTSTART_PEERS`` when ``text`` is None); raises
        UsageError for an entry that is neither form."""
        if text is None:
            text = os.environ.get(ENV, "")
        items = text.split(",") if isinstance(text, str) else list(text)
        entries = tuple(e.strip() for e in items if e.strip())
        for e in entries:
            _split_entry(e)
        return cls(entries, token or os.environ.get(TOKEN_ENV) or None, **kw)  # type: ignore[arg-type]


def _split_entry(entry: str) -> tuple[str, str, int]:
    """``(kind, host, port)`` of a peer entry; kind "dns" or "addr"."""
    kind, rest = ("dns", entry[4:]) if entry.startswith("dns:") else ("addr", entry)
    try:
        host, port = parse_host_port(rest)
    except ValueError:
        host, port = "", 0
    if not host or port == 0:
        raise UsageError(f"peer {entry!r}: expected HOST:PORT or dns:NAME:PORT")
    return kind, host, port


def _addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class PeerObject:
    """What a peer says it holds of one object: byte ranges on its disk, and the CRCs of
    its chunks under the plan ``(chunk_bytes, crc, parts)`` (from its journal or cache
    index), for a reader with the same plan to check each chunk on arrival."""

    ranges: tuple[tuple[int, int], ...]
    chunk_bytes: int = 0
    crc: str = ""
    parts: tuple[int, ...] = ()
    crcs: dict[int, int] = field(default_factory=dict)

    def crc_of(self, chunk_bytes: int, crc: str, parts: tuple[int, ...], index: int) -> int | None:
        """The published CRC of chunk ``index`` when the plans agree, else None."""
        if (chunk_bytes, crc, parts) != (self.chunk_bytes, self.crc, self.parts):
            return None
        return self.crcs.get(index)


@dataclass
class Peer:
    """One peer as this fetch sees it: what it holds, how it has done."""

    address: str
    holdings: dict[str, PeerObject] = field(default_factory=dict)
    dropped: str | None = None  # why we stopped asking it
    busy_until: float = 0.0  # it answered 503: not before then
    in_flight: int = 0
    bytes: int = 0
    seconds: float = 0.0

    @property
    def base(self) -> str:
        return f"http://{self.address}"

    def rate(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0

    def has(self, oid: str, start: int, end: int) -> bool:
        obj = self.holdings.get(oid)
        return obj is not None and any(lo <= start and end <= hi for lo, hi in obj.ranges)


def parse_inventory(raw: bytes) -> dict[str, PeerObject]:
    """``{id: PeerObject}`` from an inventory document; entries that break the format (bad
    id, ranges out of order or past the size) are left out, not trusted; chunk CRCs that do
    not parse are dropped (the whole-object check still stands)."""
    doc = json.loads(raw)
    out: dict[str, PeerObject] = {}
    if not isinstance(doc, dict) or not isinstance(doc.get("objects"), list):
        raise ValueError("no objects list")
    for o in doc["objects"]:
        try:
            oid, size = o["id"], int(o["size"])
            ranges = tuple((int(a), int(b)) for a, b in o["ranges"])
        except (KeyError, TypeError, ValueError):
            continue
        if not isinstance(oid, str) or not ID_RE.match(oid):
            continue
        if not all(0 <= a < b <= size for a, b in ranges):
            continue
        try:
            ch = o.get("chunks") or {}
            obj = PeerObject(
                ranges,
                int(ch.get("bytes", 0)),
                str(ch.get("crc", "")),
                tuple(int(p) for p in ch.get("parts", ())),
                {int(i): int(c, 16) for i, c in (ch.get("crcs") or {}).items()},
            )
        except (AttributeError, TypeError, ValueError):
            obj = PeerObject(ranges)
        out[oid] = obj
    return out


class PeerSet:
    """The peers of one run: discovery, inventories (refreshed while the run lasts: peers
    still fetching hold more each second), choice of a peer for a byte range, and the
    record of what each gave or why it was dropped."""

    def __init__(self, spec: PeerSpec) -> None:
        self.spec = spec
        self.peers: dict[str, Peer] = {}
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self.origin_rate = 0.0  # bytes/s of one origin stream (EWMA), set by the scheduler

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.spec.token}"} if self.spec.token else {}

    async def discover(self) -> list[str]:
        """Addresses of the peers the spec names now (DNS names resolved, ourselves left
        out)."""
        loop = asyncio.get_running_loop()
        found: list[str] = []
        for entry in self.spec.entries:
            kind, host, port = _split_entry(entry)
            if kind == "addr":
                found.append(_addr(host, port))
                continue
            try:
                infos = await asyncio.wait_for(
                    loop.getaddrinfo(host, port, type=0, proto=6), self.spec.connect_timeout_s
                )
            except (OSError, TimeoutError):
                continue  # no such name yet (the Service may have no endpoints): no peers
            found.extend(_addr(str(i[4][0]), port) for i in infos)
        excluded = set(self.spec.exclude)
        return [a for a in dict.fromkeys(found) if a not in excluded]

    async def refresh(self) -> None:
        """Discover again and ask every live peer for its inventory, all at once."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(
                    total=4 * self.spec.connect_timeout_s, connect=self.spec.connect_timeout_s
                )
            )
        for address in await self.discover():
            self.peers.setdefault(address, Peer(address))
        live = [p for p in self.peers.values() if p.dropped is None]
        await asyncio.gather(*(self._inventory(p) for p in live))

    async def _inventory(self, peer: Peer) -> None:
        assert self._session is not None
        try:
            async with self._session.get(
                peer.base + INVENTORY_PATH, headers=self.headers(), allow_redirects=False
            ) as resp:
                if resp.status == 401:
                    self.drop(peer, "refused our token (401)")
                    return
                if resp.status != 200:
                    return  # busy or starting: ask again next round
                raw = await resp.content.read(MAX_INVENTORY_BYTES + 1)
            if len(raw) > MAX_INVENTORY_BYTES:
                raise ValueError("inventory too large")
            peer.holdings = parse_inventory(raw)
        except (aiohttp.ClientError, OSError, TimeoutError):
            peer.holdings = {}  # unreachable now: nothing from it until it answers again
        except ValueError as exc:
            self.drop(peer, f"sent an invalid inventory ({exc})")

    def start(self) -> None:
        """Refresh inventories every ``refresh_s`` until :meth:`close`."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(self.spec.refresh_s)
                await self.refresh()

        if self._task is None:
            self._task = asyncio.create_task(loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def pick(self, oid: str, start: int, end: int) -> Peer | None:
        """The peer to ask for ``[start, end)`` of ``oid``: one that holds it, is not
        dropped or busy, and (once measured) is not slower than an origin stream; the
        least loaded first, then the fastest."""
        now = time.monotonic()
        best: Peer | None = None
        for p in self.peers.values():
            if p.dropped is not None or p.busy_until > now or not p.has(oid, start, end):
                continue
            if p.seconds > 1.0 and self.origin_rate and p.rate() < 0.5 * self.origin_rate:
                continue  # measured slower than the origin: the origin serves it
            if best is None or (p.in_flight, -p.rate()) < (best.in_flight, -best.rate()):
                best = p
        return best

    def drop(self, peer: Peer, reason: str) -> None:
        if peer.dropped is None:
            peer.dropped = reason
            peer.holdings = {}

    def busy(self, peer: Peer, seconds: float) -> None:
        peer.busy_until = time.monotonic() + seconds

    def dropped(self) -> dict[str, str]:
        return {p.address: p.dropped for p in self.peers.values() if p.dropped is not None}

    def bytes_by_peer(self) -> dict[str, int]:
        return {p.address: p.bytes for p in self.peers.values() if p.bytes}
