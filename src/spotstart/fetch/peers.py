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
origin), a peer that errs, stalls or is slower than the origin is left for the origin. Any
answer but a 206 of exactly the range asked, within a deadline set by the origin's measured
rate, sends the chunk to the origin at once (:meth:`PeerSet.failed` says what it costs the
peer); a peer never fails a fetch.

The peer token's rules live here too (:func:`read_token_file`, :func:`visible_token`), for
every caller that takes one: the CLI's ``--peer-token-file`` and vLLM's ``peer_token_file``."""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import ipaddress
import json
import os
import random
import re
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from spotstart import safefs
from spotstart.errors import NotFound, ObjectChanged, StallDetected, TransientError, UsageError
from spotstart.fetch.swarm import PollBackoff, sample_peers
from spotstart.store import DirectUnsupported
from spotstart.units import parse_host_port

ID_RE = re.compile(r"^[0-9a-f]{64}$")
ENV = "SPOTSTART_PEERS"
INVENTORY_PATH = "/v1/inventory"
OBJECTS_PATH = "/v1/objects/"
TOKEN_ENV = "SPOTSTART_PEER_TOKEN"
POD_IP_ENV = "POD_IP"  # the Kubernetes downward API's status.podIP, as `k8s render` sets it
MIN_TOKEN_BYTES = 16  # 128 bits of a random token; shorter is a password, not a key
MAX_TOKEN_BYTES = 4096
MAKE_TOKEN = "(umask 077; openssl rand -hex 32 > peer.token)"
MAX_INVENTORY_BYTES = 16 << 20
# A DNS name (RFC 1123 labels; '_' as Kubernetes names allow) or an IPv4 address.
_HOST_RE = re.compile(
    r"(?=.{1,253}\.?$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?"
)
MAX_BUSY_S = 30.0  # the longest a peer's Retry-After keeps us away
# A proven peer (it gave checked bytes) that misses a chunk's deadline is paused this long;
# MAX_SLOW misses in a row drop it for the run.
SLOW_PAUSE_S = 5.0
MAX_SLOW = 3
# Peers one run asks (a name may resolve to hundreds of addresses, some hostile: each costs
# an inventory a second and, at worst, one chunk deadline before it is dropped).
MAX_PEERS = 64
# Peers that gave nothing and failed (dropped for the run) before the untried ones are tried
# one chunk at a time: honest peers rarely fail, and then take every stream at once.
PROBATION_AFTER = 2
INVENTORY_CPU_SHARE = 10  # parsing inventories: at most 1/10 of a CPU, all peers together
MAX_FLEET = 4096  # addresses remembered from discovery (the hash ring's nodes)
# Object ids remembered from one peer when the run wants any (``wanted=None``): deltas add ids
# one document at a time, so a peer inventing new ones would otherwise grow it for ever.
MAX_HOLDINGS = 1 << 16
# Deltas in a row that do not follow what we hold of a peer (another epoch, a seq going back,
# a document that does not parse) before it is dropped; each one costs a full inventory.
MAX_BAD_DELTAS = 3
# Chunk CRCs remembered from one peer, all objects together, as deltas add them: about what one
# inventory of MAX_INVENTORY_BYTES can carry. Each delta is bounded by that size, but merging
# them is not: a peer listing new indexes under a plan of tiny chunks would grow it each poll.
MAX_CRCS = MAX_INVENTORY_BYTES // 16
EPOCH_RE = re.compile(r"^[0-9a-f]{16}$")
MAX_SEQ = 1 << 62


def visible_token(token: str, where: str) -> str:
    """The token, when it is visible ASCII only (what an HTTP header can carry as is): a
    space, CR/LF or a control character would split or end the Authorization line our
    requests send, and a non-ASCII one never matches what the server decodes. ``where``
    names it in the error (a flag, a setting, an environment variable)."""
    if not all("!" <= c <= "~" for c in token):
        raise UsageError(
            f"{where}: the token has spaces, control or non-ASCII characters; a peer token is "
            f"visible ASCII (make one with: openssl rand -hex 32)"
        )
    return token


def read_token_file(path: Path, where: str) -> str:
    """The peer token in ``path``: a regular file that only its owner may read, at most
    ``MAX_TOKEN_BYTES``, UTF-8, at least ``MIN_TOKEN_BYTES`` once stripped, visible ASCII.
    ``where`` names the file in errors (``--peer-token-file PATH``); each is a UsageError
    that says the fix."""
    raw = safefs.read_owner_only(
        path,
        where,
        MAX_TOKEN_BYTES,
        MAKE_TOKEN,
        "read the token (anyone who has it can read every object served): chmod 600 it (a "
        "Kubernetes Secret volume: defaultMode: 0400)",
    )
    if len(raw) > MAX_TOKEN_BYTES:
        raise UsageError(f"{where}: longer than {MAX_TOKEN_BYTES} bytes; not a token file")
    try:
        token = raw.decode().strip()
    except UnicodeDecodeError:
        raise UsageError(f"{where}: not UTF-8 text; make one with: {MAKE_TOKEN}") from None
    if len(token.encode()) < MIN_TOKEN_BYTES:
        what = "empty" if not token else f"{len(token.encode())} bytes"
        raise UsageError(
            f"{where}: {what}; a peer token needs at least {MIN_TOKEN_BYTES} "
            f"(make one with: {MAKE_TOKEN})"
        )
    return visible_token(token, where)


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
    # A chunk from a peer must be in within ``deadline_factor`` times what one origin
    # stream would need for it (its measured rate, or ``unmeasured_bytes_per_s`` before a
    # measure), and never less than ``deadline_floor_s``: the stall timeout restarts with
    # each byte, so alone it never stops a peer trickling 1 B/s. A peer is worth asking only
    # when it beats the origin; one that needs 4x as long has lost the race already.
    deadline_factor: float = 4.0
    deadline_floor_s: float = 5.0
    unmeasured_bytes_per_s: float = 10e6
    # At fleet scale: ``sample`` peers' inventories are polled at once, whatever the fleet's
    # size (control traffic per node bounded); every ``resample_s`` the least useful of them
    # is swapped for another drawn at random. A peer whose inventory did not change is asked
    # again after ``refresh_s``, doubled each time up to ``poll_max_s``.
    sample: int = 8
    resample_s: float = 15.0
    poll_max_s: float = 8.0
    # How long a chunk another node owns on the hash ring is left to it (single-flight).
    single_flight_wait_s: float = 10.0
    # Our own host:port as peers see it (our place on the ring); default ``exclude[0]``.
    me: str | None = None

    def chunk_deadline_s(self, length: int, origin_bytes_per_s: float) -> float:
        """Seconds a peer gets for a chunk of ``length`` bytes.

        >>> PeerSpec().chunk_deadline_s(16 << 20, 0.0), PeerSpec().chunk_deadline_s(1, 50e6)
        (6.7108864, 5.0)
        """
        rate = origin_bytes_per_s if origin_bytes_per_s > 0 else self.unmeasured_bytes_per_s
        return max(self.deadline_floor_s, self.deadline_factor * length / rate)

    @classmethod
    def parse(
        cls, text: str | Iterable[str] | None, token: str | None = None, **kw: object
    ) -> PeerSpec:
        """From ``--peers`` (or ``SPOTSTART_PEERS`` when ``text`` is None); raises
        UsageError for an entry that is neither form. Without ``me`` (and no ``exclude`` to
        take it from), ``$POD_IP`` at the first entry's port is our place on the ring and left
        out of the peers asked: in Kubernetes the pod's serve-peers sidecar listens there
        (``k8s render``), and every other node knows us by that address."""
        if text is None:
            text = os.environ.get(ENV, "")
        items = text.split(",") if isinstance(text, str) else list(text)
        entries = tuple(e.strip() for e in items if e.strip())
        for e in entries:
            _split_entry(e)
        pod_ip = os.environ.get(POD_IP_ENV, "")
        if entries and pod_ip and not kw.get("me") and not kw.get("exclude"):
            me = _addr(pod_ip, _split_entry(entries[0])[2])
            _split_entry(me)  # $POD_IP is an address, or this is a UsageError like any entry
            kw = {**kw, "me": me, "exclude": (me,)}
        return cls(entries, token or os.environ.get(TOKEN_ENV) or None, **kw)  # type: ignore[arg-type]


def _split_entry(entry: str) -> tuple[str, str, int]:
    """``(kind, host, port)`` of a peer entry; kind "dns" or "addr". The host is a DNS name,
    an IPv4 address or a bracketed IPv6 one, the port 1-65535; anything else (a URL, a path,
    user info, an empty host) is a UsageError, so a typo fails at once instead of reaching
    no peer."""
    kind, rest = ("dns", entry[4:]) if entry.startswith("dns:") else ("addr", entry)
    try:
        host, port = parse_host_port(rest)
    except ValueError:
        host, port = "", 0
    if not (rest.isascii() and 0 < port <= 65535 and _valid_host(host, rest)):
        raise UsageError(
            f"peer {entry!r}: expected HOST:PORT or dns:NAME:PORT (a name or an address, "
            "[v6] in brackets, no scheme or path; a port 1-65535)"
        )
    return kind, host, port


def _valid_host(host: str, written: str) -> bool:
    if written.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return False
        return written.startswith(f"[{host}]:")
    return _HOST_RE.fullmatch(host) is not None


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

    def covers(self, start: int, end: int) -> bool:
        """Whether one range holds ``[start, end)``: a binary search (the ranges are sorted
        and disjoint, :func:`parse_inventory` keeps no others), so a peer listing a million
        ranges costs each chunk's pick microseconds, not a scan."""
        i = bisect.bisect_right(self.ranges, start, key=lambda r: r[0]) - 1
        return i >= 0 and end <= self.ranges[i][1]

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
    # Objects it did not give (404, 416, 412: evicted, moving into place, inventory out of
    # date): id -> why; asked again once its inventory lists them anew.
    misses: dict[str, str] = field(default_factory=dict)
    unreachable: str | None = None  # why its inventory could not be read, while it can't
    told: set[str] = field(default_factory=set)  # what was reported once: miss, unreachable
    busy_until: float = 0.0  # it answered 503: not before then
    slow: int = 0  # chunk deadlines missed in a row since its last checked chunk
    ask_at: float = 0.0  # its inventory is asked for again no sooner (monotonic)
    in_flight: int = 0
    bytes: int = 0
    seconds: float = 0.0
    # Where its inventory stands: the epoch and seq of the last one applied (None: ask for a
    # full one), how soon to ask again, deltas in a row that did not follow.
    epoch: str | None = None
    seq: int = 0
    backoff: PollBackoff = field(default_factory=PollBackoff)
    bad_deltas: int = 0

    @property
    def base(self) -> str:
        return f"http://{self.address}"

    def rate(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0

    def has(self, oid: str, start: int, end: int) -> bool:
        obj = self.holdings.get(oid)
        return obj is not None and obj.covers(start, end)


def _not_json(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _disjoint(ranges: tuple[tuple[int, int], ...], size: int) -> bool:
    """Sorted, non-empty, non-overlapping ranges inside ``[0, size]`` (what a peer server
    sends: its ranges merged)."""
    at = 0
    for lo, hi in ranges:
        if not at <= lo < hi <= size:
            return False
        at = hi
    return True


@dataclass(frozen=True)
class Inventory:
    """One inventory document as :func:`parse_inventory_doc` read it. ``objects``: the valid
    entries of the ids asked for; ``touched``: every id asked for that the document has an
    entry for, valid or not (a delta's invalid entry makes what we held of it stale);
    ``epoch``/``seq``: its version (None: a server of before deltas, whose every document is
    full); ``full``: replaces what we hold (else: a delta on top of it); ``removed``: ids it
    held at the ``since`` we sent and no longer holds (a delta's only)."""

    objects: dict[str, PeerObject]
    touched: frozenset[str] = frozenset()
    epoch: str | None = None
    seq: int | None = None
    full: bool = True
    removed: tuple[str, ...] = ()


def _crc_bound(size: int, chunk_bytes: int, parts: tuple[int, ...]) -> int:
    """At least the number of chunks any plan of ``size`` has (each part boundary adds one at
    most): chunk indexes at or past it are not chunks, and not kept."""
    return -(-size // chunk_bytes) + len(parts) if chunk_bytes > 0 else 0


def parse_inventory_doc(raw: bytes, wanted: Collection[str] | None = None) -> Inventory:
    """An inventory document, full or delta, validated: entries that break the format (bad
    id, ranges out of order, overlapping or past the size, numbers that are not integers) are
    left out, not trusted; chunk CRCs that do not parse, or whose index no chunk of the object
    can have, are dropped (the whole-object check still stands). Only the ids in ``wanted``
    (all when None) are walked. ValueError for a document that is not one (not JSON, NaN or
    Infinity, nested past the parser's depth, a version that is not ``epoch`` 16 hex digits
    and ``seq`` an integer >= 0, a delta without one): a peer's inventory may be anything,
    and nothing in it may raise anything else."""
    try:
        doc = json.loads(raw, parse_constant=_not_json)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    out: dict[str, PeerObject] = {}
    touched: set[str] = set()
    if not isinstance(doc, dict) or not isinstance(doc.get("objects"), list):
        raise ValueError("no objects list")
    epoch, seq, full = doc.get("epoch"), doc.get("seq"), doc.get("full", True)
    if epoch is None and seq is None:
        if full is not True:
            raise ValueError("a delta without a version")
    elif not (
        isinstance(epoch, str)
        and EPOCH_RE.fullmatch(epoch)
        and type(seq) is int
        and 0 <= seq < MAX_SEQ
    ):
        raise ValueError("a version that is not epoch (16 hex digits) and seq (an integer)")
    if not isinstance(full, bool):
        raise ValueError("full is not true or false")
    removed: tuple[str, ...] = ()
    if not full:
        gone = doc.get("removed", [])
        if not isinstance(gone, list):
            raise ValueError("removed is not a list")
        removed = tuple(
            i
            for i in gone
            if isinstance(i, str) and ID_RE.fullmatch(i) and (wanted is None or i in wanted)
        )
    for o in doc["objects"]:
        try:
            oid = o["id"]
            if not isinstance(oid, str) or not ID_RE.fullmatch(oid):
                continue
            if wanted is not None and oid not in wanted:
                continue  # not ours to fetch: never walked
            touched.add(oid)
            size = int(o["size"])
            ranges = tuple((int(a), int(b)) for a, b in o["ranges"])
        except (KeyError, TypeError, ValueError, ArithmeticError):
            continue
        if not _disjoint(ranges, size):
            continue
        try:
            ch = o.get("chunks") or {}
            chunk_bytes = int(ch.get("bytes", 0))
            parts = tuple(int(p) for p in ch.get("parts", ()))
            bound = _crc_bound(size, chunk_bytes, parts)
            crcs = {int(i): int(c, 16) for i, c in (ch.get("crcs") or {}).items()}
            obj = PeerObject(
                ranges,
                chunk_bytes,
                str(ch.get("crc", "")),
                parts,
                {i: c for i, c in crcs.items() if 0 <= i < bound and 0 <= c < 1 << 64},
            )
        except (AttributeError, TypeError, ValueError, ArithmeticError):
            obj = PeerObject(ranges)
        out[oid] = obj
    return Inventory(
        out,
        frozenset(touched),
        epoch if isinstance(epoch, str) else None,
        seq if type(seq) is int else None,
        full,
        removed,
    )


def parse_inventory(raw: bytes, wanted: Collection[str] | None = None) -> dict[str, PeerObject]:
    """``{id: PeerObject}`` from an inventory document, only the ids in ``wanted`` (all when
    None); see :func:`parse_inventory_doc` for what is left out and what raises."""
    return parse_inventory_doc(raw, wanted).objects


def apply_delta(
    held: dict[str, PeerObject], delta: Inventory, limit: int = MAX_HOLDINGS
) -> dict[str, PeerObject]:
    """What a peer holds after ``delta``: its objects replace ours (ranges as sent; chunk
    CRCs added to those we had when the plan is unchanged, else replaced), ids it lists but
    that did not validate and ids it removed are forgotten; at most ``limit`` ids, and an
    object whose CRCs would take those kept past :data:`MAX_CRCS` keeps none.

    >>> a = "a" * 64
    >>> old = {a: PeerObject(((0, 4),), 2, "crc32c", (), {0: 7})}
    >>> new = Inventory({a: PeerObject(((0, 8),), 2, "crc32c", (), {2: 9})}, frozenset([a]))
    >>> apply_delta(old, new)[a].crcs
    {0: 7, 2: 9}
    """
    out = dict(held)
    for oid in delta.removed:
        out.pop(oid, None)
    for oid in delta.touched - delta.objects.keys():
        out.pop(oid, None)
    crc_limit = MAX_CRCS
    total = sum(len(o.crcs) for o in out.values())
    for oid, obj in delta.objects.items():
        before = out.get(oid)
        if before is None and len(out) >= limit:
            continue
        crcs = obj.crcs
        if before is not None and (before.chunk_bytes, before.crc, before.parts) == (
            obj.chunk_bytes,
            obj.crc,
            obj.parts,
        ):
            crcs = {**before.crcs, **obj.crcs}
        had = len(before.crcs) if before is not None else 0
        if total - had + len(crcs) > crc_limit:
            # More CRCs than one inventory may carry, piled up by deltas: none kept for it
            # (a CRC is a hint; the manifest or the origin's MD5 still checks its bytes).
            crcs = {}
        total += len(crcs) - had
        out[oid] = PeerObject(obj.ranges, obj.chunk_bytes, obj.crc, obj.parts, crcs)
    return out


async def _read_bounded(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, to its end, or ValueError past ``limit`` bytes (a declared length
    over it is refused before a byte is read). One ``read(n)`` returns only what has arrived
    (64-128 kB): a larger inventory would be cut and fail to parse."""
    if resp.content_length is not None and resp.content_length > limit:
        raise ValueError("inventory too large")
    got: list[bytes] = []
    size = 0
    while data := await resp.content.read(min(1 << 20, limit + 1 - size)):
        got.append(data)
        size += len(data)
        if size > limit:
            raise ValueError("inventory too large")
    return b"".join(got)


def _retrieve(lookup: asyncio.Future[Any]) -> None:
    """A lookup that ended after its waiter gave up: its error is read (and dropped)."""
    if not lookup.cancelled():
        lookup.exception()


class PeerSet:
    """The peers of one run: discovery, inventories (refreshed while the run lasts: peers
    still fetching hold more each second), choice of a peer for a byte range, and the
    record of what each gave or why it was dropped.

    At fleet scale: :meth:`fleet` is every address discovery found (at most ``MAX_FLEET``);
    at most ``MAX_PEERS`` of them (drawn at random when there are more) are peers this run
    may ask, and of those ``spec.sample`` at a time are polled (:func:`swarm.sample_peers
    <spotstart.fetch.swarm.sample_peers>`): the useful ones kept, the least useful swapped
    every ``spec.resample_s``. Each polled peer is asked for what changed since the last
    inventory it sent (``?since=epoch.seq``), no sooner than its :class:`PollBackoff
    <spotstart.fetch.swarm.PollBackoff>` and its parse cost allow. ``clock`` and ``rng``
    are injected for tests."""

    def __init__(
        self,
        spec: PeerSpec,
        on_message: Callable[[str], None] | None = None,
        wanted: Collection[str] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.spec = spec
        self.on_message = on_message or (lambda text: None)
        # The ids this run may ask for: an inventory's other entries are never walked.
        self.wanted = frozenset(wanted) if wanted is not None else None
        self.peers: dict[str, Peer] = {}
        self.told: set[str] = set()
        self._lookups: dict[str, asyncio.Future[Any]] = {}  # dns: entry -> its lookup
        self.unresolved: dict[str, str] = {}  # dns: entries that gave no address, and why
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self.origin_rate = 0.0  # bytes/s of one origin stream (EWMA), set by the scheduler
        self.unproven_failures = 0  # peers dropped for a failed read before giving a byte
        self.clock = clock
        self.rng = rng or random.Random()
        self._fleet: list[str] = []
        self.polled: list[str] = []  # the addresses whose inventories are asked for now
        self._resample_at: float | None = None
        self.control_bytes = 0  # inventory answers received: bodies, and heads roughly
        self.inventories = 0  # inventory documents applied (full or delta)
        self.not_modified = 0  # inventory answers 304: nothing changed

    @property
    def me(self) -> str:
        """Our own ``host:port`` as peers see it (our node on the hash ring)."""
        if self.spec.me:
            return self.spec.me
        return self.spec.exclude[0] if self.spec.exclude else ""

    def hurry(self) -> None:
        """Poll the sampled peers at the base interval again: a caller waits on what they
        will hold (each peer's poll backs off to ``poll_max_s`` while its inventory does not
        change, or while it cannot be reached, as a node not yet started cannot). Bounded as
        polling is: ``sample`` peers, once per ``refresh_s`` at most, each answer a delta or
        a 304."""
        due = self.clock() + self.spec.refresh_s
        for a in self.polled:
            p = self.peers.get(a)
            if p is not None and p.dropped is None and p.ask_at > due:
                p.ask_at = due
                p.backoff.current_s = 0.0  # the next unchanged answer backs off from the base

    def fleet(self) -> list[str]:
        """Every address discovery found (ourselves left out; at most ``MAX_FLEET``), less
        the peers dropped for the run: the nodes that share the origin's work with us on the
        hash ring (a dropped peer's share falls to the others, not to a wait for it)."""
        return [a for a in self._fleet if (p := self.peers.get(a)) is None or p.dropped is None]

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
            # One lookup per name at a time: a resolver that hangs (a slow or hostile DNS)
            # holds one thread of the loop's default executor, which the fetch also needs
            # (verification, journal commits), not one more every refresh.
            lookup = self._lookups.get(entry)
            if lookup is None:
                lookup = asyncio.ensure_future(loop.getaddrinfo(host, port, type=0, proto=6))
                lookup.add_done_callback(_retrieve)
                self._lookups[entry] = lookup
            try:
                infos = await asyncio.wait_for(asyncio.shield(lookup), self.spec.connect_timeout_s)
            except (OSError, TimeoutError) as exc:
                if lookup.done():  # it failed: the next refresh asks anew
                    self._lookups.pop(entry, None)
                # No such name yet (the Service may have no endpoints): no peers for now.
                reason = f"{type(exc).__name__}: {exc}".rstrip(": ")
                if entry not in self.unresolved:
                    self.on_message(f"peer {entry}: no address ({reason}); asking again")
                self.unresolved[entry] = reason
                continue
            self._lookups.pop(entry, None)
            self.unresolved.pop(entry, None)
            found.extend(_addr(str(i[4][0]), port) for i in infos)
        excluded = set(self.spec.exclude)
        return [a for a in dict.fromkeys(found) if a not in excluded]

    async def refresh(self) -> None:
        """Discover again, choose the peers to poll, and ask each of them whose time has
        come for its inventory (what changed since its last one), all at once."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(
                    total=4 * self.spec.connect_timeout_s, connect=self.spec.connect_timeout_s
                )
            )
        found = await self.discover()
        self._fleet = found[:MAX_FLEET]
        new = [a for a in self._fleet if a not in self.peers]
        room = MAX_PEERS - len(self.peers)
        if len(new) > room:
            if "too many" not in self.told:
                self.told.add("too many")
                self.on_message(
                    f"peers: {len(found)} addresses; asking the first {MAX_PEERS} drawn at "
                    f"random only, {self.spec.sample} at a time"
                )
            # At random, not the first ones: each node of a fleet then meets other peers.
            new = self.rng.sample(new, max(0, room))
        for address in new:
            self.peers[address] = Peer(
                address, backoff=PollBackoff(self.spec.refresh_s, self.spec.poll_max_s)
            )
        now = self.clock()
        self._choose_polled(now)
        live = [self.peers[a] for a in self.polled]
        await asyncio.gather(*(self._inventory(p) for p in live if p.ask_at <= now))

    def _usefulness(self, peer: Peer) -> tuple[int, int, int, int]:
        return (
            peer.bytes > 0,
            peer.bytes,
            len(peer.holdings) > 0,
            peer.unreachable is None,
        )

    def _choose_polled(self, now: float) -> None:
        """Who is polled: those polled before (not dropped), topped up at random to
        ``spec.sample``; every ``spec.resample_s`` the least useful one (gave nothing, holds
        nothing we want, unreachable) is left out first, so that a node meets new peers."""
        k = max(1, self.spec.sample)
        dropped = {a for a, p in self.peers.items() if p.dropped is not None}
        keep = [a for a in self.polled if a not in dropped]
        if self._resample_at is None:
            self._resample_at = now + self.spec.resample_s
        elif now >= self._resample_at:
            self._resample_at = now + self.spec.resample_s
            others = len(self.peers) - len(dropped) - len(keep)
            if keep and len(keep) >= k and others > 0:
                keep.remove(min(keep, key=lambda a: self._usefulness(self.peers[a])))
        chosen = sample_peers(list(self.peers), keep, k, self.rng, exclude=dropped)
        for a in set(self.polled) - set(chosen):
            left = self.peers[a]
            # Not polled, so not current: nothing asked of it until it is polled again, and
            # then its whole inventory.
            left.holdings = {}
            left.epoch, left.seq, left.ask_at = None, 0, 0.0
        self.polled = chosen

    async def _inventory(self, peer: Peer) -> None:
        assert self._session is not None
        since = f"{peer.epoch}.{peer.seq}" if peer.epoch is not None else None
        headers = self.headers()
        url = peer.base + INVENTORY_PATH
        if since is not None:
            headers["If-None-Match"] = f'"{since}"'
            url += f"?since={since}"
        try:
            async with self._session.get(url, headers=headers, allow_redirects=False) as resp:
                self.control_bytes += 16 + sum(len(k) + len(v) + 4 for k, v in resp.raw_headers)
                if resp.status in (401, 403):
                    self._drop_and_say(peer, f"refused our token (HTTP {resp.status})")
                    return
                if resp.status in (408, 429) or resp.status >= 500:
                    # busy or starting: ask again next round
                    self._unreachable(peer, f"inventory answered HTTP {resp.status}")
                    return
                if resp.status == 304 and since is not None:
                    self.not_modified += 1
                    peer.unreachable = None
                    peer.ask_at = self.clock() + peer.backoff.next(False)
                    return
                if resp.status != 200:  # a redirect, 404: not a peer server
                    self._drop_and_say(peer, f"answered its inventory with HTTP {resp.status}")
                    return
                raw = await _read_bounded(resp, MAX_INVENTORY_BYTES)
            self.control_bytes += len(raw)
            # Parsed off the loop; what it cost spaces the next ask, so that inventories take
            # at most ~1/INVENTORY_CPU_SHARE of a CPU whatever size and however many peers.
            t0 = self.clock()
            try:
                doc = await asyncio.to_thread(parse_inventory_doc, raw, self.wanted)
            except ValueError:
                if since is None:
                    raise
                doc = None
            changed = self._apply(peer, doc, since)  # on the loop: merging costs too
            spent = self.clock() - t0
            if peer.dropped is not None:
                return
            polled = sum(self.peers[a].dropped is None for a in self.polled)
            peer.ask_at = max(
                t0 + spent * INVENTORY_CPU_SHARE * max(1, polled),
                self.clock() + peer.backoff.next(changed),
            )
            peer.unreachable = None
        except (aiohttp.ClientConnectionError, OSError, TimeoutError) as exc:
            # unreachable now (not started yet, gone): nothing from it until it answers
            self._unreachable(peer, f"{type(exc).__name__}: {exc}".rstrip(": "))
        except aiohttp.ClientError as exc:  # an answer that is not HTTP
            self._drop_and_say(peer, f"broke the protocol ({type(exc).__name__}: {exc})")
        except ValueError as exc:
            self._drop_and_say(peer, f"sent an invalid inventory ({exc})")

    def _apply(self, peer: Peer, doc: Inventory | None, since: str | None) -> bool:
        """Apply an inventory answer to ``peer``; whether what it holds changed. A full one
        replaces; a delta must follow what we hold (the epoch we asked from, a seq not going
        back), else its state is forgotten and the next ask is for a full one (after
        ``MAX_BAD_DELTAS`` in a row, the peer is dropped)."""
        if doc is not None and doc.full:
            before = peer.holdings
            peer.holdings = doc.objects
            peer.epoch, peer.seq = doc.epoch, doc.seq or 0
            peer.bad_deltas = 0
            self.inventories += 1
            return peer.holdings != before
        if (
            doc is not None
            and since is not None
            and doc.epoch == peer.epoch
            and doc.seq is not None
            and doc.seq >= peer.seq
        ):
            changed = bool(doc.touched) or any(i in peer.holdings for i in doc.removed)
            limit = len(self.wanted) if self.wanted is not None else MAX_HOLDINGS
            peer.holdings = apply_delta(peer.holdings, doc, limit)
            peer.seq = doc.seq
            peer.bad_deltas = 0
            self.inventories += 1
            return changed
        peer.bad_deltas += 1
        if peer.bad_deltas >= MAX_BAD_DELTAS:
            self._drop_and_say(
                peer, f"sent {peer.bad_deltas} inventory deltas in a row that do not follow"
            )
        peer.holdings, peer.epoch, peer.seq = {}, None, 0
        return True  # ask (for a full one) again soon

    def _unreachable(self, peer: Peer, reason: str) -> None:
        # What we held of it is forgotten, so its version too: the next ask is for all of it
        # (a ``since`` would get a 304 or a delta, and what did not change never came back).
        peer.holdings, peer.epoch, peer.seq = {}, None, 0
        peer.unreachable = reason
        if "unreachable" not in peer.told:
            peer.told.add("unreachable")
            self.on_message(f"peer {peer.address} unreachable: {reason}; asking again")

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
        for lookup in self._lookups.values():
            lookup.cancel()  # its thread ends when the resolver gives up; nobody waits
        self._lookups = {}
        if self._session is not None:
            await self._session.close()
            self._session = None

    def holders(self, oid: str, start: int, end: int) -> int:
        """How many polled peers, not dropped nor busy, hold ``[start, end)`` of ``oid`` (how
        rare a chunk is, for :class:`swarm.ChunkPicker <spotstart.fetch.swarm.ChunkPicker>`)."""
        now = self.clock()
        n = 0
        for a in self.polled:
            p = self.peers[a]
            if p.dropped is None and p.busy_until <= now and p.has(oid, start, end):
                n += 1
        return n

    def pick(self, oid: str, start: int, end: int) -> Peer | None:
        """The peer to ask for ``[start, end)`` of ``oid``: one that holds it, is not
        dropped or busy, and (once measured) is not slower than an origin stream; the
        least loaded first, then the fastest. Once ``PROBATION_AFTER`` peers that had given
        nothing failed, the peers that have not yet given a checked chunk are tried one chunk
        at a time, all of them together: each hostile peer then costs at most a chunk
        deadline on one stream (the others carry on from the origin), so a name resolving to
        many of them costs the fetch a stream, not a deadline per peer on every stream."""
        now = self.clock()
        best: Peer | None = None
        ties = 0
        probation = self.unproven_failures >= PROBATION_AFTER
        trying = sum(p.in_flight for p in self.peers.values() if not p.bytes) if probation else 0
        for p in self.peers.values():
            if p.dropped is not None or p.busy_until > now or not p.has(oid, start, end):
                continue
            if probation and not p.bytes and trying >= 1:
                continue
            if p.seconds > 1.0 and self.origin_rate and p.rate() < 0.5 * self.origin_rate:
                continue  # measured slower than the origin: the origin serves it
            # The least loaded; among equals one at random (reservoir sampling), so that the
            # nodes of a fleet asking for the same chunk spread over its holders.
            if best is None or p.in_flight < best.in_flight:
                best, ties = p, 1
            elif p.in_flight == best.in_flight:
                ties += 1
                if self.rng.randrange(ties) == 0:
                    best = p
        return best

    def drop(self, peer: Peer, reason: str) -> bool:
        """Ask ``peer`` for nothing more this run; True when it was not dropped already."""
        if peer.dropped is not None:
            return False
        peer.dropped = reason
        peer.holdings = {}
        return True

    def _drop_and_say(self, peer: Peer, reason: str) -> None:
        if self.drop(peer, reason):
            self.on_message(f"peer {peer.address} dropped: {reason}")

    def miss(self, peer: Peer, oid: str, reason: str) -> None:
        """``peer`` did not give ``oid`` though its inventory listed it: nothing more of it
        from this peer until a new inventory lists it again."""
        peer.holdings.pop(oid, None)
        peer.misses[oid] = reason
        peer.epoch = None  # its next inventory a full one: lists it again if it still holds it
        if "miss" not in peer.told:
            peer.told.add("miss")
            self.on_message(f"peer {peer.address}: {reason}; left to the origin")

    def failed(self, peer: Peer, oid: str, exc: BaseException) -> None:
        """What one failed read of ``oid`` costs ``peer``: a busy answer (429, 503) a pause
        (its Retry-After, at most ``MAX_BUSY_S``); an object it does not hold after all (404;
        412, 416: not those bytes) that object, until its inventory lists it again; anything
        else (auth refused, a redirect, a wrong range or size, a short, slow or endless
        answer, a broken head, a 5xx, a failed connection) the rest of the run, except a
        missed deadline or a stall from a peer that has given checked bytes: a pause of
        ``SLOW_PAUSE_S`` (its uplink is shared by many nodes), ``MAX_SLOW`` in a row drop it."""
        if isinstance(exc, TransientError) and exc.throttled:
            self.busy(peer, min(MAX_BUSY_S, exc.retry_after_s or 1.0))
        elif isinstance(exc, NotFound | ObjectChanged):
            self.miss(peer, oid, str(exc))
        elif isinstance(exc, DirectUnsupported):
            self._drop_and_say(peer, "sent a body without a length (chunked or until close)")
        elif isinstance(exc, StallDetected) and peer.bytes and peer.slow + 1 < MAX_SLOW:
            # A peer that has given checked bytes and is now too slow for a chunk's deadline
            # is most likely a holder whose uplink many nodes share (a rollout): paused, not
            # dropped; MAX_SLOW such misses in a row without a chunk between drop it (a
            # peer that turns into a trickle costs at most that many deadlines).
            peer.slow += 1
            self.busy(peer, SLOW_PAUSE_S)
            if "slow" not in peer.told:
                peer.told.add("slow")
                self.on_message(f"peer {peer.address} too slow for a chunk ({exc}); paused")
        else:
            if not peer.bytes and peer.dropped is None:
                self.unproven_failures += 1
            self._drop_and_say(peer, str(exc) or type(exc).__name__)

    def served(self, peer: Peer, oid: str, length: int, seconds: float) -> None:
        """``peer`` gave ``length`` bytes of ``oid`` (checked) in ``seconds``."""
        peer.bytes += length
        peer.seconds += seconds
        peer.slow = 0
        peer.misses.pop(oid, None)

    def busy(self, peer: Peer, seconds: float) -> None:
        peer.busy_until = self.clock() + seconds

    def dropped(self) -> dict[str, str]:
        """Each peer this run stopped asking, for all or for some objects, and why; peers
        whose inventory could not be read, and names that gave no address, the last time
        they were asked for."""
        out: dict[str, str] = {}
        for p in self.peers.values():
            if p.dropped is not None:
                out[p.address] = p.dropped
            elif p.misses:
                last = next(reversed(p.misses.values()))
                out[p.address] = f"left to the origin for {len(p.misses)} object(s): {last}"
            elif p.unreachable is not None:
                out[p.address] = f"unreachable: {p.unreachable}"
        for entry, reason in self.unresolved.items():
            out[entry] = f"no address: {reason}"
        return out

    def bytes_by_peer(self) -> dict[str, int]:
        return {p.address: p.bytes for p in self.peers.values() if p.bytes}
