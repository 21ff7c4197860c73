"""Peers at cluster scale, the client side (:class:`spotstart.fetch.peers.PeerSet`): an
inventory of a 140 GB model's shape read whole from the project's own peer server; inventory
deltas (``?since=``, 304, full and delta documents) against a small server in this file that
speaks the protocol as the team brief gives it, and hostile variations of it; the bounded
sample of polled peers, poll backoff, ties spread at random. Time is a fake clock passed in:
no test reads the wall clock for its assertions."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from spotstart import Concurrency, FetchConfig, Retry
from spotstart.fetch import peers as peers_mod
from spotstart.fetch.engine import Fetcher
from spotstart.fetch.journal import JournalHeader
from spotstart.fetch.layout import work_paths
from spotstart.fetch.peer_server import PeerServer, PeerServerThread
from spotstart.fetch.peers import (
    MAX_BAD_DELTAS,
    MAX_FLEET,
    MAX_PEERS,
    Peer,
    PeerObject,
    PeerSet,
    PeerSpec,
    object_id,
    parse_inventory_doc,
)
from spotstart.fetch.scheduler import NullProgress
from spotstart.store import parse_url
from spotstart.store.memory import MemorySource

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
CHUNK = 16 * MiB
CHUNKS_140GB = 8750  # 140 GB in 16 MiB chunks
SOURCE = "gs://bucket/model/"


def _crc(i: int) -> str:
    return f"{(i * 2654435761 + 12345) & 0xFFFFFFFF:08x}"


# -- a directory holding a 140 GB model, synthetically: state files and sparse files ---------


def add_sparse_complete(root: Path, rel: str, chunks: int, chunk_bytes: int) -> str:
    """``rel`` finished, listed in the cache index with one CRC per chunk; its file sparse."""
    size = chunks * chunk_bytes - 1234
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    index_path = root / ".spotstart" / "index.json"
    index_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        index = json.loads(index_path.read_text())
    except FileNotFoundError:
        index = {"version": 1, "files": {}}
    index["files"][rel] = {
        "source": SOURCE + rel,
        "version": "1",
        "size": size,
        "mtime_ns": path.stat().st_mtime_ns,
        "chunk_bytes": chunk_bytes,
        "crc": "crc32c",
        "parts": [],
        "crcs": [_crc(i) for i in range(chunks)],
    }
    index_path.write_text(json.dumps(index))
    return object_id(SOURCE + rel, "1", size)


def add_sparse_arriving(
    root: Path, rel: str, chunks: int, chunk_bytes: int, held: Iterable[int]
) -> tuple[str, int]:
    """``rel`` still arriving: its journal lists the chunks ``held``; its part file sparse.
    Returns (object id, size)."""
    size = chunks * chunk_bytes - 777
    part, journal = work_paths(root, rel)
    part.parent.mkdir(parents=True, exist_ok=True)
    with open(part, "wb") as f:
        f.truncate(size)
    header = JournalHeader(source=SOURCE + rel, size=size, version="1", chunk_bytes=chunk_bytes)
    lines = [header.to_json(), *(f"{i} {_crc(i)}" for i in held)]
    journal.write_text("\n".join(lines) + "\n")
    return object_id(SOURCE + rel, "1", size), size


@pytest.fixture
def big_peer(tmp_path: Path) -> Iterable[tuple[str, str, str]]:
    """(address, complete id, arriving id): a real PeerServer over a directory holding a
    140 GB model finished and another of the same shape half arrived (every other chunk, and
    the last 50), an inventory of ~400 kB."""
    root = tmp_path / "peer"
    done = add_sparse_complete(root, "m/a.safetensors", CHUNKS_140GB, CHUNK)
    held = [i for i in range(CHUNKS_140GB) if i % 2 == 0 or i >= CHUNKS_140GB - 50]
    arriving, _ = add_sparse_arriving(root, "m/b.safetensors", CHUNKS_140GB, CHUNK, held)
    thread = PeerServerThread(PeerServer(root))
    port = thread.start("127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{port}", done, arriving
    finally:
        thread.close()


def _chunk(i: int, size: int | None = None) -> tuple[int, int]:
    end = (i + 1) * CHUNK
    return i * CHUNK, end if size is None else min(end, size)


def test_an_inventory_of_a_140gb_model_is_read_whole_and_its_last_chunks_are_used(
    big_peer: tuple[str, str, str],
) -> None:
    """Broke before: one ``read(limit)`` returned what had arrived (64-128 kB) of a ~400 kB
    inventory; the JSON did not parse and the peer was dropped for the run."""
    address, done, arriving = big_peer
    messages: list[str] = []

    async def go() -> PeerSet:
        peers = PeerSet(PeerSpec((address,)), messages.append, wanted={done, arriving})
        try:
            await peers.refresh()
        finally:
            await peers.close()
        return peers

    peers = asyncio.run(go())
    assert peers.dropped() == {} and not messages, messages
    assert peers.inventories == 1 and peers.control_bytes > 300_000, peers.control_bytes
    peer = peers.peers[address]
    last = CHUNKS_140GB - 1
    # the complete one: every chunk, the last one's CRC published
    assert peers.holders(done, *_chunk(last - 1)) == 1
    assert peer.holdings[done].crc_of(CHUNK, "crc32c", (), last) == int(_crc(last), 16)
    # the arriving one: exactly what its journal lists, to the end
    assert peers.holders(arriving, *_chunk(last - 1)) == 1
    assert peers.holders(arriving, *_chunk(CHUNKS_140GB - 51)) == 0  # odd, before the last 50
    assert peers.holders(arriving, *_chunk(4000)) == 1
    assert peers.holders(arriving, *_chunk(4001)) == 0
    assert peers.pick(arriving, *_chunk(last - 3)) is peer
    assert peer.holdings[arriving].crc_of(CHUNK, "crc32c", (), last - 3) == int(_crc(last - 3), 16)


def test_the_project_s_peer_server_sends_a_140gb_model_s_changes_not_its_whole_inventory(
    tmp_path: Path,
) -> None:
    """Against the real PeerServer (rescanning at every request): a full first inventory, 304
    while nothing lands, a delta of a few chunks' size when some do (their CRCs added to those
    kept), and the object's removal."""
    root = tmp_path / "peer"
    held = range(0, CHUNKS_140GB // 2)
    oid, _ = add_sparse_arriving(root, "m/b.safetensors", CHUNKS_140GB, CHUNK, held)
    part, journal = work_paths(root, "m/b.safetensors")
    server = PeerServer(root)
    thread = PeerServerThread(server)
    port = thread.start("127.0.0.1", 0)
    assert server.index is not None
    server.index.ttl_s = 0.0  # every request rescans: what landed is seen at once
    address = f"127.0.0.1:{port}"
    clock = FakeClock()

    async def go() -> None:
        peers = PeerSet(PeerSpec((address,)), wanted={oid}, clock=clock, rng=random.Random(0))
        p = None
        try:
            await peers.refresh()
            full = peers.control_bytes
            p = peers.peers[address]
            assert p.epoch is not None and full > 50_000
            assert peers.holders(oid, *_chunk(CHUNKS_140GB // 2 - 1)) == 1
            assert peers.holders(oid, *_chunk(CHUNKS_140GB // 2)) == 0
            clock.now = 1.0
            await peers.refresh()
            assert peers.not_modified == 1
            new = range(CHUNKS_140GB // 2, CHUNKS_140GB // 2 + 10)
            with journal.open("a") as f:
                f.write("".join(f"{i} {_crc(i)}\n" for i in new))
            clock.now = 3.0
            before = peers.control_bytes
            await peers.refresh()
            assert peers.inventories == 2 and peers.control_bytes - before < 2_000
            assert peers.holders(oid, *_chunk(new[-1])) == 1
            obj = p.holdings[oid]
            assert len(obj.crcs) == CHUNKS_140GB // 2 + 10
            assert obj.crc_of(CHUNK, "crc32c", (), 0) == int(_crc(0), 16)  # kept
            assert obj.crc_of(CHUNK, "crc32c", (), new[-1]) == int(_crc(new[-1]), 16)
            journal.unlink()
            part.unlink()
            clock.now = 4.0
            await peers.refresh()
            assert p.holdings == {} and p.dropped is None and peers.inventories == 3
        finally:
            await peers.close()

    try:
        asyncio.run(go())
    finally:
        thread.close()


def _config(addresses: list[str]) -> FetchConfig:
    return FetchConfig(
        chunk_bytes=MiB,
        concurrency=Concurrency(streams=4),
        retry=Retry(backoff_base_s=0.01, backoff_cap_s=0.05),
        peers=PeerSpec(tuple(addresses)) if addresses else None,
    )


def _fetch_from(source: MemorySource, dest: Path, cfg: FetchConfig) -> object:
    async def go() -> object:
        return await Fetcher(source, parse_url("gs://mem/m/"), dest, cfg, NullProgress()).run()

    return asyncio.run(go())


def test_a_new_node_takes_real_bytes_from_a_peer_whose_inventory_is_over_1mb(
    tmp_path: Path,
) -> None:
    data = os.urandom(4 * MiB + 17)
    source = MemorySource({"m/w.bin": data})
    a = tmp_path / "a"
    _fetch_from(source, a, _config([]))
    info = source._info("m/w.bin")
    wanted = object_id("gs://mem/m/w.bin", info.version, info.size)
    # Beside it, 50,000 chunks of another object half arrived, listed BEFORE it (the server
    # sorts by id): the object the fetch wants is at the end of a >1 MB document.
    for n in range(1000):
        rel = f"filler{n}.bin"
        size = 50_000 * MiB - 777
        if object_id(SOURCE + rel, "1", size) < wanted:
            break
    held = range(0, 50_000, 2)
    filler, _ = add_sparse_arriving(a, rel, 50_000, MiB, held)
    assert filler < wanted
    thread = PeerServerThread(PeerServer(a))
    port = thread.start("127.0.0.1", 0)
    try:
        address = f"127.0.0.1:{port}"

        async def size_of_inventory() -> int:
            peers = PeerSet(PeerSpec((address,)))
            try:
                await peers.refresh()
            finally:
                await peers.close()
            assert peers.peers[address].holdings.keys() == {filler, wanted}
            return peers.control_bytes

        assert asyncio.run(size_of_inventory()) > 1_000_000
        report = _fetch_from(source, tmp_path / "b", _config([address]))
    finally:
        thread.close()
    assert (tmp_path / "b" / "w.bin").read_bytes() == data
    assert report.bytes_from_peers == len(data)  # type: ignore[attr-defined]
    assert not report.peers_dropped  # type: ignore[attr-defined]


# -- the delta protocol, against a server that speaks it as the brief says --------------------


@dataclass
class Held:
    size: int
    ranges: list[tuple[int, int]]
    chunk_bytes: int
    crcs: dict[int, tuple[str, int]]  # index -> (hex, seq it was added)
    seq: int  # of its last change
    complete: bool = False


@dataclass
class ProtocolPeer:
    """``GET /v1/inventory[?since=E.S]`` as the brief specifies: 304 when If-None-Match is
    the current ETag; a delta from a ``since`` of this epoch within the history kept; else
    full. ``legacy``: a server of before deltas (no epoch, always full). ``answer``: replaces
    the 200 body (a hostile peer) when it returns bytes."""

    clock: Callable[[], float]
    epoch: str = "0123456789abcdef"
    seq: int = 0
    legacy: bool = False
    held: dict[str, Held] = field(default_factory=dict)
    gone: dict[str, int] = field(default_factory=dict)  # id -> seq it was removed
    asked: list[tuple[float, str | None, str | None, int]] = field(default_factory=list)
    answer: Callable[[str | None], bytes | None] | None = None
    runner: web.AppRunner | None = None
    address: str = ""

    def put(self, oid: str, size: int, chunk_bytes: int, indexes: Iterable[int]) -> None:
        """Chunks ``indexes`` of ``oid`` arrived (one rescan that changed something)."""
        self.seq += 1
        h = self.held.get(oid)
        if h is None or h.chunk_bytes != chunk_bytes:
            h = self.held[oid] = Held(size, [], chunk_bytes, {}, self.seq)
        for i in indexes:
            h.crcs.setdefault(i, (_crc(i), self.seq))
        ranges: list[tuple[int, int]] = []
        for i in sorted(h.crcs):
            lo, hi = i * chunk_bytes, min(size, (i + 1) * chunk_bytes)
            if ranges and ranges[-1][1] == lo:
                ranges[-1] = (ranges[-1][0], hi)
            else:
                ranges.append((lo, hi))
        h.ranges, h.seq = ranges, self.seq
        self.gone.pop(oid, None)

    def remove(self, oid: str) -> None:
        self.seq += 1
        del self.held[oid]
        self.gone[oid] = self.seq

    def restart(self, epoch: str) -> None:
        """A new process: a new epoch, its history begins again."""
        self.epoch, self.seq, self.gone = epoch, 0, {}
        for h in self.held.values():
            h.seq = 0
            h.crcs = {i: (c, 0) for i, (c, _) in h.crcs.items()}

    def document(self, since: str | None) -> dict[str, object]:
        after: int | None = None
        if since is not None and not self.legacy:
            e, _, s = since.partition(".")
            if e == self.epoch and s.isdigit() and int(s) <= self.seq:
                after = int(s)
        objects = []
        for oid, h in sorted(self.held.items()):
            if after is not None and h.seq <= after:
                continue
            crcs = {str(i): c for i, (c, at) in h.crcs.items() if after is None or at > after}
            objects.append(
                {
                    "id": oid,
                    "size": h.size,
                    "ranges": [list(r) for r in h.ranges],
                    "complete": h.complete,
                    "chunks": {"bytes": h.chunk_bytes, "crc": "crc32c", "parts": [], "crcs": crcs},
                }
            )
        if self.legacy:
            return {"version": 1, "objects": objects}
        removed = [i for i, at in self.gone.items() if after is not None and at > after]
        return {
            "version": 1,
            "epoch": self.epoch,
            "seq": self.seq,
            "full": after is None,
            "objects": objects,
            "removed": removed,
        }

    async def handle(self, request: web.Request) -> web.Response:
        since = request.query.get("since")
        inm = request.headers.get("If-None-Match")
        etag = f'"{self.epoch}.{self.seq}"'
        if not self.legacy and inm == etag:
            self.asked.append((self.clock(), since, inm, 304))
            return web.Response(status=304, headers={"ETag": etag})
        self.asked.append((self.clock(), since, inm, 200))
        body = self.answer(since) if self.answer is not None else None
        if body is None:
            body = json.dumps(self.document(since)).encode()
        return web.Response(body=body, content_type="application/json", headers={"ETag": etag})

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/v1/inventory", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.address = f"127.0.0.1:{port}"
        return self.address

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


A, B, C = "a" * 64, "b" * 64, "c" * 64


def _run(coro_fn: Callable[[], object]) -> None:
    asyncio.run(coro_fn())  # type: ignore[arg-type]


def test_only_changes_are_sent_after_the_first_inventory_and_nothing_when_nothing_changed() -> None:
    clock = FakeClock()

    async def go() -> None:
        server = ProtocolPeer(clock)
        await server.start()
        peers = PeerSet(PeerSpec((server.address,)), clock=clock, rng=random.Random(0))
        try:
            server.put(A, 1000 * MiB, MiB, range(0, 400))
            server.put(B, 10 * MiB, MiB, range(0, 10))
            await peers.refresh()
            full_bytes = peers.control_bytes
            p = peers.peers[server.address]
            assert (p.epoch, p.seq) == (server.epoch, 2)
            assert p.holdings[A].ranges == ((0, 400 * MiB),) and len(p.holdings[A].crcs) == 400

            clock.now = 1.0
            await peers.refresh()  # nothing changed: 304
            assert peers.not_modified == 1 and peers.inventories == 1
            assert p.holdings[A].ranges == ((0, 400 * MiB),)

            server.put(A, 1000 * MiB, MiB, range(400, 405))
            server.remove(B)
            server.put(C, 5 * MiB, MiB, [0])
            clock.now = 3.0
            before = peers.control_bytes
            await peers.refresh()  # a delta: A's 5 new chunks, B gone, C new
            assert peers.inventories == 2
            assert p.holdings.keys() == {A, C}
            assert p.holdings[A].ranges == ((0, 405 * MiB),)
            # the CRCs it had kept, the 5 new ones added
            assert p.holdings[A].crcs == {i: int(_crc(i), 16) for i in range(405)}
            assert peers.control_bytes - before < full_bytes / 5
        finally:
            await peers.close()
            await server.close()
        asked = [(since, inm, status) for _, since, inm, status in server.asked]
        etag = f"{server.epoch}.2"
        assert asked == [
            (None, None, 200),
            (etag, f'"{etag}"', 304),
            (etag, f'"{etag}"', 200),
        ]

    _run(go)


def test_polls_back_off_while_nothing_changes_and_return_to_the_base_when_it_does() -> None:
    clock = FakeClock()

    async def go() -> ProtocolPeer:
        server = ProtocolPeer(clock)
        await server.start()
        server.put(A, 10 * MiB, MiB, [0])
        spec = PeerSpec((server.address,), refresh_s=1.0, poll_max_s=8.0)
        peers = PeerSet(spec, clock=clock, rng=random.Random(0))
        try:
            for step in range(60):
                clock.now = step * 0.5
                if clock.now == 10.0:
                    server.put(A, 10 * MiB, MiB, [1])
                await peers.refresh()
        finally:
            await peers.close()
            await server.close()
        return server

    server = asyncio.run(go())
    assert [(t, status) for t, _, _, status in server.asked] == [
        (0.0, 200),
        (1.0, 304),
        (3.0, 304),
        (7.0, 304),
        (15.0, 200),  # the change at 10 s, seen at the next ask
        (16.0, 304),
        (18.0, 304),
        (22.0, 304),
    ]


def test_the_parse_cost_spaces_asks_when_it_is_later_than_the_backoff(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each parse "costs" 0.5 s of the fake clock: the next ask is no sooner than 10x that
    (INVENTORY_CPU_SHARE), the later of the two; a 304 costs no parse."""
    clock = FakeClock()
    real = peers_mod.parse_inventory_doc

    def slow(raw: bytes, wanted: object = None) -> object:
        clock.now += 0.5
        return real(raw, wanted)  # type: ignore[arg-type]

    monkeypatch.setattr(peers_mod, "parse_inventory_doc", slow)

    async def go() -> ProtocolPeer:
        server = ProtocolPeer(clock)
        await server.start()
        spec = PeerSpec((server.address,), refresh_s=1.0, poll_max_s=8.0)
        peers = PeerSet(spec, clock=clock, rng=random.Random(0))
        try:
            for step in range(20):
                clock.now = float(step)
                server.put(A, 100 * MiB, MiB, [step])  # changes every second
                await peers.refresh()
        finally:
            await peers.close()
            await server.close()
        return server

    server = asyncio.run(go())
    assert [t for t, _, _, _ in server.asked] == [0.0, 5.0, 10.0, 15.0]


def test_a_peer_that_restarts_with_a_new_epoch_is_asked_for_a_full_inventory() -> None:
    clock = FakeClock()

    async def go() -> None:
        server = ProtocolPeer(clock)
        await server.start()
        peers = PeerSet(PeerSpec((server.address,)), clock=clock, rng=random.Random(0))
        try:
            server.put(A, 10 * MiB, MiB, range(4))
            server.put(B, 10 * MiB, MiB, range(4))
            await peers.refresh()
            server.restart("fedcba9876543210")
            del server.held[B]  # lost with the old process (no removal recorded)
            server.put(A, 10 * MiB, MiB, [5])
            clock.now = 1.0
            await peers.refresh()
            p = peers.peers[server.address]
            assert (p.epoch, p.seq) == ("fedcba9876543210", 1)
            assert p.holdings.keys() == {A}  # replaced, not merged: B is gone
            assert sorted(p.holdings[A].crcs) == [0, 1, 2, 3, 5]
            assert server.asked[-1][3] == 200 and peers.inventories == 2
        finally:
            await peers.close()
            await server.close()

    _run(go)


def test_a_chunk_plan_that_changed_replaces_the_crcs_instead_of_merging_them() -> None:
    clock = FakeClock()

    async def go() -> None:
        server = ProtocolPeer(clock)
        await server.start()
        peers = PeerSet(PeerSpec((server.address,)), clock=clock, rng=random.Random(0))
        try:
            server.put(A, 16 * MiB, MiB, range(8))
            await peers.refresh()
            server.put(A, 16 * MiB, 2 * MiB, [0])  # another plan: the CRCs are of others
            clock.now = 1.0
            await peers.refresh()
            obj = peers.peers[server.address].holdings[A]
            assert obj.chunk_bytes == 2 * MiB and obj.crcs == {0: int(_crc(0), 16)}
        finally:
            await peers.close()
            await server.close()

    _run(go)


def test_a_server_of_before_deltas_is_asked_for_its_whole_inventory_each_time() -> None:
    clock = FakeClock()

    async def go() -> ProtocolPeer:
        server = ProtocolPeer(clock, legacy=True)
        await server.start()
        peers = PeerSet(PeerSpec((server.address,)), clock=clock, rng=random.Random(0))
        try:
            server.put(A, 10 * MiB, MiB, range(4))
            for step in range(4):
                clock.now = 10.0 * step
                await peers.refresh()
            assert peers.holders(A, 0, 4 * MiB) == 1 and peers.inventories == 4
        finally:
            await peers.close()
            await server.close()
        return server

    server = asyncio.run(go())
    assert [(since, inm) for _, since, inm, _ in server.asked] == [(None, None)] * 4


# A delta that does not follow what the client holds, or is not one.
BAD_DELTAS = {
    "another epoch": lambda d: {**d, "epoch": "ffffffffffffffff"},
    "seq going back": lambda d: {**d, "seq": 0},
    "removed not a list": lambda d: {**d, "removed": 5},
    "seq not an integer": lambda d: {**d, "seq": "7"},
    "epoch not hex": lambda d: {**d, "epoch": "../../etc/passwd"},
    "full not a bool": lambda d: {**d, "full": 0},
    "not json": lambda d: b"{",
}


@pytest.mark.parametrize("why", list(BAD_DELTAS))
def test_a_delta_that_does_not_follow_is_forgotten_and_a_full_inventory_asked_for(
    why: str,
) -> None:
    clock = FakeClock()
    messages: list[str] = []

    async def go() -> ProtocolPeer:
        server = ProtocolPeer(clock)
        await server.start()

        def hostile(since: str | None) -> bytes | None:
            if since is None:
                return None  # full documents honest
            doc = BAD_DELTAS[why](server.document(since))
            return doc if isinstance(doc, bytes) else json.dumps(doc).encode()

        server.answer = hostile
        peers = PeerSet(
            PeerSpec((server.address,)), messages.append, clock=clock, rng=random.Random(0)
        )
        try:
            server.put(A, 10 * MiB, MiB, range(4))
            server.seq += 5  # so that "seq going back" goes back
            await peers.refresh()
            p = peers.peers[server.address]
            server.put(A, 10 * MiB, MiB, [4])
            clock.now = 1.0
            await peers.refresh()  # the bad delta: what we held of it forgotten
            assert p.dropped is None and p.epoch is None and p.holdings == {}
            assert peers.holders(A, 0, MiB) == 0
            clock.now = 2.0
            await peers.refresh()  # a full ask, answered honestly
            assert p.holdings[A].ranges == ((0, 5 * MiB),) and p.bad_deltas == 0
        finally:
            await peers.close()
            await server.close()
        return server

    server = asyncio.run(go())
    assert [since for _, since, _, _ in server.asked] == [None, f"{server.epoch}.6", None]
    assert not messages


def test_a_peer_answering_full_asks_with_deltas_is_dropped_after_a_few() -> None:
    clock = FakeClock()

    async def go() -> tuple[PeerSet, ProtocolPeer]:
        server = ProtocolPeer(clock)
        await server.start()
        server.put(A, 10 * MiB, MiB, range(4))
        server.answer = lambda since: json.dumps({**server.document(since), "full": False}).encode()
        peers = PeerSet(PeerSpec((server.address,)), clock=clock, rng=random.Random(0))
        try:
            for step in range(2 * MAX_BAD_DELTAS):
                clock.now = 10.0 * step
                await peers.refresh()
        finally:
            await peers.close()
            await server.close()
        return peers, server

    peers, server = asyncio.run(go())
    (why,) = peers.dropped().values()
    assert "do not follow" in why and peers.peers[server.address].holdings == {}
    assert [since for _, since, _, _ in server.asked] == [None] * MAX_BAD_DELTAS


def test_a_full_inventory_that_is_not_one_drops_the_peer() -> None:
    clock = FakeClock()

    async def go() -> PeerSet:
        server = ProtocolPeer(clock)
        await server.start()
        server.answer = lambda since: b'{"version": 1, "epoch": 7, "seq": 1, "objects": []}'
        peers = PeerSet(PeerSpec((server.address,)), clock=clock, rng=random.Random(0))
        try:
            await peers.refresh()
        finally:
            await peers.close()
            await server.close()
        return peers

    peers = asyncio.run(go())
    assert "invalid inventory" in next(iter(peers.dropped().values()))


def test_a_304_to_a_request_that_asked_for_everything_breaks_the_protocol() -> None:
    async def go() -> PeerSet:
        async def h(request: web.Request) -> web.Response:
            return web.Response(status=304)

        app = web.Application()
        app.router.add_get("/v1/inventory", h)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        peers = PeerSet(PeerSpec((f"127.0.0.1:{port}",)))
        try:
            await peers.refresh()
        finally:
            await peers.close()
            await runner.cleanup()
        return peers

    peers = asyncio.run(go())
    assert "HTTP 304" in next(iter(peers.dropped().values())) and peers.not_modified == 0


def test_delta_documents_are_validated_like_full_ones() -> None:
    good = {
        "version": 1,
        "epoch": "0123456789abcdef",
        "seq": 3,
        "full": False,
        "objects": [
            {"id": A, "size": 10, "ranges": [[0, 5]], "chunks": {"bytes": 2, "crcs": {"1": "ff"}}},
            {"id": B, "size": 10, "ranges": [[0, 50]]},  # past the size: B is stale now
            {"id": "../x", "size": 10, "ranges": [[0, 5]]},
        ],
        "removed": [C, "not an id", 7],
    }
    doc = parse_inventory_doc(json.dumps(good).encode())
    assert (doc.epoch, doc.seq, doc.full, doc.removed) == ("0123456789abcdef", 3, False, (C,))
    assert doc.objects.keys() == {A} and doc.touched == {A, B}
    held = {B: PeerObject(((0, 10),)), C: PeerObject(((0, 10),))}
    assert peers_mod.apply_delta(held, doc).keys() == {A}
    # CRC indexes no chunk of the object can have are not kept (a delta would pile them up)
    bounded = {**good, "objects": [{**good["objects"][0], "chunks": {"bytes": 2, "crcs": {
        "4": "1", "5": "1", "99999999": "1", "-1": "1"}}}]}  # fmt: skip
    crcs = parse_inventory_doc(json.dumps(bounded).encode()).objects[A].crcs
    assert sorted(crcs) == [4]  # 10 bytes in chunks of 2: chunks 0-4
    for bad in (
        {**good, "epoch": None},  # a delta with no version
        {**good, "seq": -1},
        {**good, "seq": True},
        {**good, "seq": 1.5},
        {**good, "epoch": "0123456789ABCDEF0"},
    ):
        with pytest.raises(ValueError):
            parse_inventory_doc(json.dumps(bad).encode())
    # a document of before deltas: full, no version
    legacy = parse_inventory_doc(b'{"version": 1, "objects": []}')
    assert legacy.full and legacy.epoch is None and legacy.seq is None


# -- the bounded sample, the fleet, ties -----------------------------------------------------


def test_thousands_of_addresses_are_remembered_but_a_bounded_few_polled() -> None:
    entries = tuple(f"127.1.{i // 250}.{i % 250}:9" for i in range(5000))  # nobody home
    messages: list[str] = []
    clock = FakeClock()

    async def go() -> PeerSet:
        peers = PeerSet(
            PeerSpec(entries, sample=8, connect_timeout_s=0.5),
            messages.append,
            wanted=set(),
            clock=clock,
            rng=random.Random(7),
        )
        try:
            for step in range(4):
                clock.now = 20.0 * step  # past resample_s each time
                await peers.refresh()
                assert len(peers.polled) == 8 and set(peers.polled) <= peers.peers.keys()
        finally:
            await peers.close()
        return peers

    peers = asyncio.run(go())
    assert len(peers.fleet()) == MAX_FLEET == 4096
    assert len(peers.peers) == MAX_PEERS
    assert list(peers.peers) != [a for a in entries[:MAX_PEERS]]  # drawn, not the first ones
    assert sum("asking the first" in m for m in messages) == 1, messages


def test_peers_that_drop_are_replaced_in_the_sample_and_never_more_than_max_peers_are_tried() -> (
    None
):
    asked: set[int] = set()

    async def go() -> PeerSet:
        async def h(request: web.Request) -> web.Response:
            asked.add(request.transport.get_extra_info("sockname")[1])  # type: ignore[union-attr]
            return web.Response(status=404)  # not a peer server: dropped

        app = web.Application()
        app.router.add_get("/v1/inventory", h)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        ports = []
        for _ in range(MAX_PEERS + 6):
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            ports.append(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        peers = PeerSet(
            PeerSpec(tuple(f"127.0.0.1:{p}" for p in ports), sample=8),
            wanted=set(),
            rng=random.Random(3),
        )
        try:
            for _ in range(MAX_PEERS // 8 + 3):
                await peers.refresh()
        finally:
            await peers.close()
            await runner.cleanup()
        return peers

    peers = asyncio.run(go())
    assert len(asked) == MAX_PEERS and peers.polled == []
    assert len(peers.dropped()) == MAX_PEERS and peers.fleet() == [
        a for a in peers.fleet() if a not in peers.peers
    ]


def test_peers_holding_what_we_want_stay_polled_and_the_others_are_swapped_over_time() -> None:
    clock = FakeClock()

    async def go() -> tuple[list[list[str]], list[ProtocolPeer]]:
        servers = [ProtocolPeer(clock) for _ in range(12)]
        for s in servers:
            await s.start()
        for s in servers[:3]:
            s.put(A, 10 * MiB, MiB, range(3))
        peers = PeerSet(
            PeerSpec(tuple(s.address for s in servers), sample=4, resample_s=15.0),
            wanted={A},
            clock=clock,
            rng=random.Random(11),
        )
        seen: list[list[str]] = []
        try:
            for step in range(80):
                clock.now = 5.0 * step
                await peers.refresh()
                seen.append(list(peers.polled))
        finally:
            await peers.close()
            for s in servers:
                await s.close()
        return seen, servers

    seen, servers = asyncio.run(go())
    holders = {s.address for s in servers[:3]}
    assert all(len(polled) == 4 for polled in seen)
    assert holders <= set(seen[-1])  # found, and kept
    for before, after in itertools.pairwise(seen):
        assert holders & set(before) <= set(after)  # a holder once polled is never let go
        assert len(set(before) - set(after)) <= 1  # one swapped at a time
    assert len({a for polled in seen for a in polled}) == 12  # every peer met in time


def test_ties_between_equally_loaded_holders_are_broken_at_random() -> None:
    peers = PeerSet(PeerSpec(), rng=random.Random(5))
    for i in range(4):
        p = Peer(f"10.0.0.{i}:8471", holdings={A: PeerObject(((0, 100),))})
        p.bytes, p.seconds = 1000 * (i + 1), 1.0  # unequal rates: no longer a tie-break
        peers.peers[p.address] = p
        peers.polled.append(p.address)
    picks = [peers.pick(A, 0, 10) for _ in range(400)]
    counts = {p.address: sum(q is p for q in picks) for p in peers.peers.values()}
    assert all(60 <= n <= 140 for n in counts.values()), counts
    loaded = list(peers.peers.values())
    for p in loaded[1:]:
        p.in_flight = 1
    assert all(peers.pick(A, 0, 10) is loaded[0] for _ in range(50))  # least loaded first
    # holders: polled, not dropped, not busy
    assert peers.holders(A, 0, 10) == 4
    peers.drop(loaded[1], "test")
    peers.busy(loaded[2], 30.0)
    peers.polled.remove(loaded[3].address)
    assert peers.holders(A, 0, 10) == 1 and peers.holders(A, 0, 101) == 0


def test_me_is_the_configured_address_else_the_first_excluded() -> None:
    assert PeerSet(PeerSpec(exclude=("10.0.0.1:8471",))).me == "10.0.0.1:8471"
    assert PeerSet(PeerSpec(exclude=("10.0.0.1:8471",), me="n1:8471")).me == "n1:8471"
