"""Red team of peer fetch at cluster scale (issue 25): a hostile peer server speaking the
inventory delta protocol, and a fleet of addresses that never answer. Real aiohttp servers
on 127.0.0.1; time is a fake clock passed in (no assertion reads the wall clock)."""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from aiohttp import web

from spotstart import Concurrency, FetchConfig, Retry
from spotstart.fetch import peers as peers_mod
from spotstart.fetch import plan as planning
from spotstart.fetch.engine import Fetcher
from spotstart.fetch.peer_server import PeerServer
from spotstart.fetch.peers import MAX_FLEET, MAX_INVENTORY_BYTES, PeerSet, PeerSpec, object_id
from spotstart.fetch.scheduler import NullProgress
from spotstart.fetch.swarm import MAX_RING_POINTS, ChunkPicker, HashRing
from spotstart.fetch.verify import crc32c
from spotstart.store import parse_url
from spotstart.store.memory import MemorySource
from tests.guard.test_proxy import free_port

MiB = 1 << 20

pytestmark = pytest.mark.timeout(120)

OID = "a" * 64
EPOCH = "0123456789abcdef"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def _serve(handler: Callable[[web.Request], object]) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_get("/v1/inventory", handler)  # type: ignore[arg-type]
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"127.0.0.1:{port}"


def _entry(crcs: dict[str, str]) -> dict[str, object]:
    # a plan of 1-byte chunks over a huge size: every index below 2**60 is "a chunk"
    size = 1 << 60
    return {
        "id": OID,
        "size": size,
        "ranges": [[0, 1]],
        "complete": False,
        "chunks": {"bytes": 1, "crc": "crc32c", "parts": [], "crcs": crcs},
    }


def test_deltas_cannot_grow_the_crcs_held_of_a_peer_past_what_one_inventory_may_carry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each delta adds new chunk CRCs to an object whose plan is unchanged; the merge kept
    them all, so a peer could grow what we hold of it by ~1 M entries per poll for ever
    (one document is bounded at MAX_INVENTORY_BYTES; their sum was not)."""
    # the real bound is about what one 16 MiB document carries; a smaller one keeps this fast
    one_document = MAX_INVENTORY_BYTES // len('"0":"1",')
    real_limit = peers_mod.MAX_CRCS
    assert real_limit <= one_document
    monkeypatch.setattr(peers_mod, "MAX_CRCS", 50_000)
    per_delta = 20_000
    rounds = 6
    clock = FakeClock()
    seq = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal seq
        full = "since" not in request.rel_url.query
        base = seq * per_delta
        seq += 1
        crcs = {str(base + i): "1" for i in range(per_delta)}
        doc = {
            "version": 1,
            "epoch": EPOCH,
            "seq": seq,
            "full": full,
            "objects": [_entry(crcs)],
            "removed": [],
        }
        return web.Response(body=json.dumps(doc).encode(), content_type="application/json")

    async def go() -> int:
        runner, address = await _serve(handler)
        peers = PeerSet(PeerSpec((address,)), wanted={OID}, clock=clock, rng=random.Random(0))
        try:
            most = 0
            p = None
            for _ in range(rounds):
                clock.now += 1000.0  # past any backoff or parse-cost spacing
                await peers.refresh()
                p = peers.peers[address]
                most = max(most, sum(len(o.crcs) for o in p.holdings.values()))
            assert p is not None and p.dropped is None
            assert peers.inventories == rounds  # every delta was applied
            return most
        finally:
            await peers.close()
            await runner.cleanup()

    held = asyncio.run(go())
    assert per_delta <= held <= 50_000  # without the bound: 120,000, growing with every poll


def test_a_fleet_of_addresses_that_never_answer_costs_a_bounded_wait_not_one_per_window() -> None:
    """A DNS name resolving to thousands of hosts that never fetch: every chunk of the model
    belongs to another node on the ring. Each chunk's wait started when it entered the
    picker's window, so the waits ran one window after another: (chunks / window) x wait in
    all, however fast the origin. Simulated time: streams land instantly."""
    wait = 10.0
    fleet = [f"10.1.{i // 256}.{i % 256}:8471" for i in range(4096)]
    keys = list(range(3000))
    picker: ChunkPicker[int] = ChunkPicker(
        "me:8471", keys, lambda k: f"{OID}:{k}", wait_s=wait, rng=random.Random(1)
    )
    picker.set_fleet(fleet)
    now = 0.0
    taken = 0
    while True:
        got = picker.next(now, lambda k: 0)
        if got is None:
            break
        if isinstance(got, float):
            assert got > now
            now = got
            continue
        taken += 1
    assert taken == len(keys)
    # the one wait runs for every dead owner at once: a bounded number of them in all
    assert now <= 2 * wait


def test_the_cost_of_merging_a_delta_on_the_loop_spaces_the_next_ask(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A peer holding many CRCs of an object that sends a tiny delta touching it every poll
    makes the client copy them all on the event loop (~80 ms per million, each second per
    such peer); only the parse, off the loop, was counted in the CPU share that spaces the
    next ask. The merge is timed with it now: a merge that costs 1 s (the fake clock moved
    by it) puts the next ask INVENTORY_CPU_SHARE seconds later, not after the 1 s backoff."""
    clock = FakeClock()
    seq = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal seq
        seq += 1
        doc = {
            "version": 1,
            "epoch": EPOCH,
            "seq": seq,
            "full": "since" not in request.rel_url.query,
            "objects": [_entry({str(seq): "1"})],
            "removed": [],
        }
        return web.Response(body=json.dumps(doc).encode(), content_type="application/json")

    real = peers_mod.apply_delta

    def costly(*args: object, **kw: object) -> object:
        clock.now += 1.0  # what merging a big holding costs the loop
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(peers_mod, "apply_delta", costly)

    async def go() -> None:
        runner, address = await _serve(handler)
        peers = PeerSet(PeerSpec((address,)), wanted={OID}, clock=clock, rng=random.Random(0))
        try:
            await peers.refresh()  # full: no merge
            clock.now = 100.0
            await peers.refresh()  # a delta: merged at a cost of 1 s
            p = peers.peers[address]
            assert peers.inventories == 2 and p.dropped is None
            assert p.ask_at >= 100.0 + 1.0 * peers_mod.INVENTORY_CPU_SHARE
        finally:
            await peers.close()
            await runner.cleanup()

    asyncio.run(go())


# -- a hostile peer speaking deltas, in a real fetch: the origin still gives correct bytes --


def test_a_delta_peer_claiming_everything_and_serving_forged_bytes_among_dead_fleet_nodes(
    tmp_path: Path,
) -> None:
    """A peer whose every inventory answer (a full one, then deltas, its epoch kept) claims
    every chunk, publishes the CRCs of the bytes it forges (so only the origin's MD5 at the
    end can tell), and serves them; beside it 40 fleet addresses nothing listens on (dead
    ring owners). The fetch ends with the origin's bytes, no chunk read from the origin more
    than a bounded number of times."""
    data = os.urandom(6 * MiB + 17)
    forged = bytes(b ^ 0x5A for b in data)
    source = MemorySource({"m/w.bin": data})
    info = source._info("m/w.bin")
    oid = object_id("gs://mem/m/w.bin", info.version, info.size)
    plan = planning.plan_chunks(len(data), MiB)
    crcs = {str(c.index): f"{crc32c(forged[c.start : c.start + c.length]):x}" for c in plan}
    seq = 0
    object_reads = 0

    async def inventory(request: web.Request) -> web.Response:
        nonlocal seq
        seq += 1
        doc = {
            "version": 1,
            "epoch": EPOCH,
            "seq": seq,
            "full": "since" not in request.rel_url.query,
            "objects": [
                {
                    "id": oid,
                    "size": len(data),
                    "ranges": [[0, len(data)]],
                    "complete": True,
                    "chunks": {"bytes": MiB, "crc": "crc32c", "parts": [], "crcs": crcs},
                }
            ],
            "removed": [],
        }
        return web.Response(body=json.dumps(doc).encode(), content_type="application/json")

    async def obj(request: web.Request) -> web.Response:
        nonlocal object_reads
        object_reads += 1
        lo, hi = request.headers["Range"].removeprefix("bytes=").split("-")
        a, b = int(lo), int(hi)
        return web.Response(
            status=206,
            body=forged[a : b + 1],
            headers={"Content-Range": f"bytes {a}-{b}/{len(forged)}"},
        )

    dead = [f"127.0.0.1:{free_port()}" for _ in range(40)]
    me = f"127.0.0.1:{free_port()}"

    async def go() -> object:
        app = web.Application()
        app.router.add_get("/v1/inventory", inventory)
        app.router.add_get("/v1/objects/{oid}", obj)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        cfg = FetchConfig(
            chunk_bytes=MiB,
            concurrency=Concurrency(streams=4),
            retry=Retry(backoff_base_s=0.01, backoff_cap_s=0.05),
            peers=PeerSpec(
                (f"127.0.0.1:{port}", *dead),
                exclude=(me,),
                me=me,
                sample=64,
                single_flight_wait_s=0.3,
            ),
        )
        try:
            url = parse_url("gs://mem/m/")
            return await Fetcher(source, url, tmp_path / "d", cfg, NullProgress()).run()
        finally:
            await runner.cleanup()

    asyncio.run(go())
    assert (tmp_path / "d" / "w.bin").read_bytes() == data
    assert object_reads >= 1  # it was asked: rarest first sent chunks its way
    per_chunk: dict[int, int] = {}
    for _, start, length in source.reads:
        for c in plan:
            if start <= c.start < start + length:
                per_chunk[c.index] = per_chunk.get(c.index, 0) + 1
    assert set(per_chunk) == {c.index for c in plan}
    assert max(per_chunk.values()) <= 3, per_chunk


def test_a_peer_whose_inventory_was_busy_once_is_asked_for_all_of_it_again() -> None:
    """An honest peer answers one poll 503 (its slots full: inventory polls share them with
    object reads) or times out once. What we held of it was forgotten, but its version kept:
    the next poll sent ``since`` and If-None-Match, the peer, unchanged, answered 304, and
    the node never took a byte of it again for the run (only objects that change later come
    back, in deltas). Its next ask must be for the whole inventory."""
    clock = FakeClock()
    busy = False
    doc = {
        "version": 1,
        "epoch": EPOCH,
        "seq": 1,
        "full": True,
        "objects": [
            {
                "id": OID,
                "size": 4 * MiB,
                "ranges": [[0, 4 * MiB]],
                "complete": True,
                "chunks": {"bytes": MiB, "crc": "crc32c", "parts": [], "crcs": {}},
            }
        ],
        "removed": [],
    }
    etag = f'"{EPOCH}.1"'

    async def handler(request: web.Request) -> web.Response:
        if busy:
            return web.Response(status=503)
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers={"ETag": etag})
        body = dict(doc)
        if "since" in request.rel_url.query:  # nothing changed since: an empty delta
            body.update(full=False, objects=[])
        return web.Response(
            body=json.dumps(body).encode(), content_type="application/json", headers={"ETag": etag}
        )

    async def go() -> None:
        nonlocal busy
        runner, address = await _serve(handler)
        peers = PeerSet(PeerSpec((address,)), wanted={OID}, clock=clock, rng=random.Random(0))
        try:
            await peers.refresh()
            assert peers.holders(OID, 0, MiB) == 1
            busy = True
            clock.now += 100.0
            await peers.refresh()
            assert peers.holders(OID, 0, MiB) == 0  # unreachable now: nothing from it
            busy = False
            clock.now += 100.0
            await peers.refresh()
            assert peers.peers[address].dropped is None
            assert peers.holders(OID, 0, MiB) == 1
        finally:
            await peers.close()
            await runner.cleanup()

    asyncio.run(go())


# -- a hostile peer client against PeerServer's pace --------------------------------------


def test_a_reader_queued_behind_abandoned_waits_is_not_held_for_their_shares(
    tmp_path: Path,
) -> None:
    """A peer opens requests, each takes a piece of the shared bucket and sleeps, and leaves
    them: their shares are given back, but an honest reader that took its piece behind them
    had computed its sleep behind all of them and slept it out while the uplink stood idle
    (with 63 slots, 1/64 of the rate for the honest; here 400 abandoned waits, so 401 pieces'
    time). It must go once the bucket has paid what is still owed: about one piece's time.
    The bound below is 16 pieces' time of the loop's clock (a guard against the hang, not a
    measure)."""
    rate = 4 * MiB  # pieces of 512 KiB: an eighth of a second each

    async def go() -> bool:
        server = PeerServer(tmp_path, max_rate=rate)
        await server.start("127.0.0.1", 0)
        try:
            assert server.bucket is not None
            piece_s = server.piece / rate
            await server._pace(server.piece)  # the burst: no wait, the bucket empty
            hostile = [asyncio.ensure_future(server._pace(server.piece)) for _ in range(400)]
            await asyncio.sleep(0)  # each has taken its share and sleeps
            honest = asyncio.ensure_future(server._pace(server.piece))
            await asyncio.sleep(0)
            for h in hostile:
                h.cancel()
            await asyncio.gather(*hostile, return_exceptions=True)
            done, _ = await asyncio.wait([honest], timeout=16 * piece_s)
            honest.cancel()
            return honest in done
        finally:
            await server.close()

    assert asyncio.run(go())


def test_a_ring_over_thousands_of_addresses_stays_a_bounded_size() -> None:
    """The ring is rebuilt on the fetch's event loop whenever the fleet changes (a peer
    dropped: up to 64 a run; a name resolving to another set of addresses: every refresh).
    At 4,096 nodes x 64 points it was 262,144 points, ~1-1.6 s of CPU per build (6 s on
    the busy test box) with the loop frozen meanwhile: peers' reads stall past their
    timeout. Its size is bounded now; small fleets keep 64 points a node."""
    fleet = [f"10.2.{i // 256}.{i % 256}:8471" for i in range(MAX_FLEET)]
    ring = HashRing(fleet)
    assert len(ring._keys) <= MAX_RING_POINTS == 1 << 14
    assert len(HashRing(fleet[:8])._keys) == 8 * 64
    # every node still owns something, and owners are the fleet's
    owners = {ring.owner(f"{OID}:{i}") for i in range(2000)}
    assert owners <= set(fleet) and len(owners) > 1000


def test_stalls_that_end_with_a_peer_holding_the_chunk_do_not_use_up_the_wait_budget() -> None:
    """The bound on waiting counts only stalls that ended with a wait running out (owners
    that never delivered): a node that waits, again and again, for shares that do arrive
    from peers (the swarm working, as in a rollout of many live nodes) keeps waiting for
    them instead of falling back to the origin for the rest of the model."""
    wait = 10.0
    fleet = [f"10.3.0.{i}:8471" for i in range(1, 200)]
    keys = list(range(3000))
    picker: ChunkPicker[int] = ChunkPicker(
        "me:8471", keys, lambda k: f"{OID}:{k}", wait_s=wait, rng=random.Random(2)
    )
    picker.set_fleet(fleet)
    held: set[int] = set()
    now = 0.0
    sources: dict[str, int] = {}
    while True:
        got = picker.next(now, lambda k: 1 if k in held else 0)
        if got is None:
            break
        if isinstance(got, float):
            # each stall ends when peers come to hold every chunk left to the others so
            # far, 0.9 x the wait on (their owners fetched them and peers got them)
            now += 0.9 * wait
            held.update(picker._deferred)
            continue
        sources[got.source] = sources.get(got.source, 0) + 1
    assert picker.stalled_s == 0.0
    assert sources.get("peer", 0) > 2500  # the others' shares came from peers
    assert now > 2 * picker.max_stall_s  # stalls past the budget, none of them wasted
