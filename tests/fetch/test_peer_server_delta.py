"""Inventory versions against a real PeerServer on 127.0.0.1 over a real directory (cache
index, part files and journals as a fetch leaves them): the first answer is full with an
epoch and a seq; a chunk landing gives a delta naming only that object with only that chunk's
CRC; nothing new is a 304; a removed object is listed as removed; any since the server cannot
answer from (stale, foreign, malformed, hostile) gets the full document, never an error."""

from __future__ import annotations

import asyncio
import json
import os
import re
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from spotstart.fetch import peer_server
from spotstart.fetch.journal import JournalHeader
from spotstart.fetch.layout import work_paths
from spotstart.fetch.peer_server import Holding, PeerServer, Versions, parse_since
from spotstart.fetch.peers import object_id
from tests.fetch.peer_dirs import SOURCE, add_complete, http_get

CHUNK = 4096
ENTRY_KEYS = {"id", "size", "ranges", "complete", "chunks"}
CHUNK_KEYS = {"bytes", "crc", "parts", "crcs"}


class Arriving:
    """A file still arriving: its part file (full size) and a journal listing ``done``."""

    def __init__(self, root: Path, rel: str, data: bytes) -> None:
        self.data = data
        self.part, self.journal = work_paths(root, rel)
        self.part.parent.mkdir(parents=True, exist_ok=True)
        with open(self.part, "wb") as f:
            f.truncate(len(data))  # sparse: the bytes are never read by these tests
        source = SOURCE + rel
        self.header = JournalHeader(source=source, size=len(data), version="1", chunk_bytes=CHUNK)
        self.oid = object_id(source, "1", len(data))
        self.done: list[int] = []

    def crc(self, i: int) -> str:
        return f"{zlib.crc32(self.data[i * CHUNK : (i + 1) * CHUNK]):x}"

    def land(self, *chunks: int) -> None:
        self.done.extend(chunks)
        lines = [self.header.to_json()]
        lines += [
            f"{i} {zlib.crc32(self.data[i * CHUNK : (i + 1) * CHUNK]):08x}" for i in self.done
        ]
        self.journal.write_text("\n".join(lines) + "\n")


class Client:
    def __init__(self, server: PeerServer, session: aiohttp.ClientSession) -> None:
        self.server, self.session = server, session
        self.base = f"http://127.0.0.1:{server.port}"

    async def rescan(self) -> None:
        """The index sees the directory as it is now (requests rescan at most every 0.5 s)."""
        assert self.server.index is not None
        await self.server.index.table(max_age_s=0)

    async def get(
        self, query: str = "", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any] | None, str | None]:
        """(status, the JSON document or None, ETag)."""
        url = self.base + "/v1/inventory" + (f"?{query}" if query else "")
        async with self.session.get(url, headers=headers or {}) as r:
            body = await r.read()
            doc = json.loads(body) if r.status == 200 else None
            if r.status == 304:
                assert body == b""
            return r.status, doc, r.headers.get("ETag")


@asynccontextmanager
async def serving(root: Path) -> AsyncIterator[Client]:
    server = PeerServer(root)
    await server.start("127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as session:
            yield Client(server, session)
    finally:
        await server.close()


def run(root: Path, body: Callable[[Client], Awaitable[None]]) -> None:
    async def go() -> None:
        async with serving(root) as client:
            await body(client)

    asyncio.run(go())


def since(doc: dict[str, Any]) -> str:
    return f"since={doc['epoch']}.{doc['seq']}"


def by_id(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {o["id"]: o for o in doc["objects"]}


def plan(entry: dict[str, Any]) -> tuple[Any, ...]:
    chunks = entry["chunks"]
    return chunks["bytes"], chunks["crc"], chunks["parts"]


def merge(held: dict[str, dict[str, Any]], delta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What a client holds after applying ``delta`` (the protocol's rules)."""
    out = {k: json.loads(json.dumps(v)) for k, v in held.items() if k not in delta["removed"]}
    for o in delta["objects"]:
        old = out.get(o["id"])
        if old is not None and plan(old) == plan(o):
            o = {
                **o,
                "chunks": {**o["chunks"], "crcs": {**old["chunks"]["crcs"], **o["chunks"]["crcs"]}},
            }
        out[o["id"]] = o
    return out


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "dir"


def test_the_first_answer_is_full_with_an_epoch_a_seq_and_the_keys_old_clients_know(
    root: Path,
) -> None:
    done = add_complete(root, "m/config.json", b"{}" * 100)
    part = Arriving(root, "m/model.bin", os.urandom(4 * CHUNK))
    part.land(0, 1)

    async def body(c: Client) -> None:
        status, doc, etag = await c.get()
        assert status == 200 and doc is not None
        assert re.fullmatch(r"[0-9a-f]{16}", doc["epoch"]) and doc["seq"] >= 1
        assert doc["full"] is True and doc["removed"] == [] and doc["version"] == 1
        assert etag == f'"{doc["epoch"]}.{doc["seq"]}"'
        objects = by_id(doc)
        assert set(objects) == {done.oid, part.oid}
        for o in objects.values():
            assert set(o) == ENTRY_KEYS and set(o["chunks"]) == CHUNK_KEYS
        assert objects[part.oid]["ranges"] == [[0, 2 * CHUNK]]
        assert objects[part.oid]["chunks"]["crcs"] == {"0": part.crc(0), "1": part.crc(1)}
        assert objects[done.oid]["complete"] is True

    run(root, body)


def test_a_chunk_landing_gives_a_delta_of_that_object_with_only_the_new_crc(root: Path) -> None:
    add_complete(root, "m/config.json", b"{}" * 100)
    part = Arriving(root, "m/model.bin", os.urandom(4 * CHUNK))
    part.land(0, 1)

    async def body(c: Client) -> None:
        _, first, etag = await c.get()
        assert first is not None
        part.land(3)  # out of order, as streams finish
        await c.rescan()
        status, delta, new_etag = await c.get(since(first), {"If-None-Match": str(etag)})
        assert status == 200 and delta is not None
        assert delta["full"] is False and delta["epoch"] == first["epoch"]
        assert delta["seq"] == first["seq"] + 1 and new_etag == f'"{delta["epoch"]}.{delta["seq"]}"'
        assert [o["id"] for o in delta["objects"]] == [part.oid]  # the index file: unchanged
        (entry,) = delta["objects"]
        assert entry["chunks"]["crcs"] == {"3": part.crc(3)}
        assert entry["ranges"] == [[0, 2 * CHUNK], [3 * CHUNK, 4 * CHUNK]]  # whole, merged
        assert delta["removed"] == []
        # the client's view, merged from the full answer and the delta, is the full answer now
        _, now, _ = await c.get()
        assert now is not None and now["seq"] == delta["seq"]
        assert merge(by_id(first), delta) == by_id(now)
        # two changes behind: both chunks, still only that object
        part.land(2)
        await c.rescan()
        _, two, _ = await c.get(since(first))
        assert two is not None and [o["id"] for o in two["objects"]] == [part.oid]
        assert two["objects"][0]["chunks"]["crcs"] == {"2": part.crc(2), "3": part.crc(3)}
        assert two["objects"][0]["ranges"] == [[0, 4 * CHUNK]]

    run(root, body)


def test_nothing_new_is_a_304_with_the_etag_and_no_body(root: Path) -> None:
    add_complete(root, "m/config.json", b"{}" * 100)

    async def body(c: Client) -> None:
        _, doc, etag = await c.get()
        assert doc is not None and etag is not None
        await c.rescan()  # a rescan that finds nothing new keeps the seq
        status, again, same = await c.get(since(doc), {"If-None-Match": etag})
        assert (status, again, same) == (304, None, etag)
        status, empty, _ = await c.get(since(doc))  # a since without If-None-Match
        assert status == 200 and empty is not None
        assert (empty["full"], empty["objects"], empty["removed"]) == (False, [], [])
        status, _, _ = await c.get(since(doc), {"If-None-Match": f'"{doc["epoch"]}.0"'})
        assert status == 200  # another version: a body
        assert c.server.not_modified == 1

    run(root, body)


def test_a_removed_object_is_named_in_removed(root: Path) -> None:
    gone = add_complete(root, "m/old.bin", b"x" * 5000)
    kept = add_complete(root, "m/config.json", b"{}" * 100)

    async def body(c: Client) -> None:
        _, first, _ = await c.get()
        assert first is not None and set(by_id(first)) == {gone.oid, kept.oid}
        index = root / ".spotstart" / "index.json"
        doc = json.loads(index.read_text())
        del doc["files"]["m/old.bin"]  # evicted
        index.write_text(json.dumps(doc))
        await c.rescan()
        _, delta, _ = await c.get(since(first))
        assert delta is not None
        assert (delta["full"], delta["objects"], delta["removed"]) == (False, [], [gone.oid])
        assert merge(by_id(first), delta) == by_id((await c.get())[1] or {})
        _, full, _ = await c.get()
        assert full is not None and full["removed"] == [] and set(by_id(full)) == {kept.oid}

    run(root, body)


def test_a_stale_foreign_or_malformed_since_gets_the_full_document(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(peer_server, "MAX_HISTORY", 2)
    part = Arriving(root, "m/model.bin", os.urandom(8 * CHUNK))
    part.land(0)

    async def body(c: Client) -> None:
        _, first, _ = await c.get()
        assert first is not None
        epoch, seq = first["epoch"], first["seq"]
        for i in (1, 2, 3):  # three changes: `first` falls out of a history of two
            part.land(i)
            await c.rescan()
        other = "0123456789abcdef" if epoch != "0123456789abcdef" else "fedcba9876543210"
        for query in (
            since(first),  # older than the history kept
            f"since={other}.{seq + 3}",  # another server, or this one before a restart
            f"since={epoch}.{seq + 4}",  # a seq this server never had
            f"since={epoch.upper()}.{seq + 3}",
            f"since={epoch}.0{seq + 3}",
            f"since={epoch}",
            "since=",
        ):
            status, doc, _ = await c.get(query)
            assert status == 200 and doc is not None, query
            assert doc["full"] is True and doc["seq"] == seq + 3, query
            assert doc["objects"][0]["chunks"]["crcs"] == {str(i): part.crc(i) for i in range(4)}
        _, ok, _ = await c.get(f"since={epoch}.{seq + 1}")  # inside the history: a delta
        assert ok is not None and ok["full"] is False
        assert ok["objects"][0]["chunks"]["crcs"] == {"2": part.crc(2), "3": part.crc(3)}

    run(root, body)


HOSTILE = [
    "since=" + "9" * 5000,  # longer than any query of ours
    "since={e}." + "9" * 19,  # a number past what int64 holds
    "since={e}." + "9" * 200,
    "since={e}.%D9%A3",  # an Arabic-Indic digit, percent-encoded
    "since={e}.\u0663",  # ... and as raw UTF-8 on the request line
    "since={e}.\uff11",  # a fullwidth digit
    "since={e}.1&since={e}.1",  # repeated
    "since={e}.-1",
    "since={e}.+1",
    "since={e}.1e3",
    "since={e}.0x1",
    "since={e}.1%00",
    "since={e}.1%20",
    "since%3D{e}.1",
    "&&&&&&&",
    "since",
    "since={e}." + "1" * 18 + "&x=" + "y" * 300,
]


@pytest.mark.parametrize("query", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_query_strings_get_the_full_document_never_an_error(root: Path, query: str) -> None:
    add_complete(root, "m/config.json", b"{}" * 100)

    async def body(c: Client) -> None:
        _, first, _ = await c.get()
        assert first is not None
        target = "/v1/inventory?" + query.replace("{e}", first["epoch"])
        address = f"127.0.0.1:{c.server.port}"
        status, raw = await asyncio.to_thread(http_get, address, target)
        # the HTTP parser may refuse a request line it cannot read (400, 414); the
        # inventory handler itself answers every query it gets with the full document
        assert status in (200, 400, 414), (status, raw[:200])
        if status == 200:
            doc = json.loads(raw)
            assert doc["full"] is True and [o["id"] for o in doc["objects"]] == [
                o["id"] for o in first["objects"]
            ]
        status, after, _ = await c.get(since(first))  # still serving, deltas still answered
        assert status == 200 and after is not None and after["full"] is False

    run(root, body)


@pytest.mark.parametrize(
    ("query", "want"),
    [
        ("since=0123456789abcdef.0", ("0123456789abcdef", 0)),
        ("since=0123456789abcdef." + "9" * 18, ("0123456789abcdef", 10**18 - 1)),
        ("other=1&since=0123456789abcdef.7", ("0123456789abcdef", 7)),
        ("since=0123456789abcdef." + "9" * 19, None),
        ("since=0123456789abcdef.\u0663", None),
        ("since=0123456789abcde.1", None),
        ("since=0123456789abcdef.01", None),
        ("", None),
    ],
)
def test_parse_since(query: str, want: tuple[str, int] | None) -> None:
    assert parse_since(query) == want


def _holding(crcs: int, plan: str = "crc32c") -> Holding:
    return Holding(
        "x",
        crcs * CHUNK,
        ((0, crcs * CHUNK),),
        False,
        CHUNK,
        plan,
        (),
        tuple((i, i) for i in range(crcs)),
    )


def test_versions_forget_old_removals_and_then_answer_older_sinces_in_full(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The removed ids remembered are bounded: forgetting one moves the floor past it."""
    monkeypatch.setattr(peer_server, "MAX_REMOVED", 3)
    table = {f"{i:064x}": _holding(2) for i in range(6)}
    v = Versions("0123456789abcdef").advance({}, table)
    assert v.seq == 1 and v.chunks[f"{0:064x}"] == {0: 1, 1: 1}
    for i in range(6):
        smaller = dict(table)
        del smaller[f"{i:064x}"]
        v, table = v.advance(table, smaller), smaller
    assert v.seq == 7 and len(v.removed) == 3 and v.floor == 4
    assert v.base((v.epoch, 3)) is None and v.base((v.epoch, 4)) == 4
    assert v.advance(table, dict(table)) is v  # nothing changed: same seq, same object


def test_versions_of_a_changed_chunk_plan_give_every_crc_again() -> None:
    """A client replaces its CRCs when bytes/crc/parts differ: the delta must hold them all."""
    oid = "a" * 64
    v = Versions("0123456789abcdef").advance({}, {oid: _holding(3)})
    v2 = v.advance({oid: _holding(3)}, {oid: _holding(4)})
    assert v2.chunks[oid] == {0: 1, 1: 1, 2: 1, 3: 2}
    v3 = v2.advance({oid: _holding(4)}, {oid: _holding(4, "crc64nvme")})
    assert v3.chunks[oid] == {0: 3, 1: 3, 2: 3, 3: 3}


def test_a_model_of_8750_chunks_sends_its_whole_inventory_once_then_deltas(root: Path) -> None:
    """A 140 GB model's shape (8,750 chunks; sparse bytes): the full answer lists every CRC,
    the answer after one more chunk lands is a small fraction of it."""
    n = 8750
    part = Arriving(root, "m/model.bin", b"")
    with open(part.part, "wb") as f:
        f.truncate(n * CHUNK)
    part.header = JournalHeader(
        source=SOURCE + "m/model.bin", size=n * CHUNK, version="1", chunk_bytes=CHUNK
    )
    part.oid = object_id(SOURCE + "m/model.bin", "1", n * CHUNK)
    part.data = bytes(n * CHUNK)
    part.land(*range(n - 1))

    async def body(c: Client) -> None:
        _, first, _ = await c.get()
        assert first is not None and len(first["objects"][0]["chunks"]["crcs"]) == n - 1
        part.land(n - 1)
        await c.rescan()
        url = f"{c.base}/v1/inventory?{since(first)}"
        async with c.session.get(url) as r:
            delta_raw = await r.read()
        async with c.session.get(f"{c.base}/v1/inventory") as r:
            full_raw = await r.read()
        delta = json.loads(delta_raw)
        assert delta["objects"][0]["chunks"]["crcs"] == {str(n - 1): part.crc(n - 1)}
        assert len(delta_raw) * 100 < len(full_raw)

    run(root, body)
