"""Peers that forge: a real HTTP server on 127.0.0.1 speaking the peer protocol serves bytes
altered with four patch bytes so every chunk's CRC-32C (and the object's combined CRC) still
matches. Whatever the peer does, a fetch ends with the origin's bytes, exit 0, the peer
dropped: caught on arrival by a manifest's SHA-256 pieces, or at the end by the origin's MD5
recomputed from disk; objects with only a CRC or a size never ask a peer at all."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from spotstart import Concurrency, FetchConfig, Retry, fetch
from spotstart.emulate.crosscheck import MotoS3
from spotstart.emulate.storage import StorageEmulator
from spotstart.fetch import plan as planning
from spotstart.fetch.engine import Fetcher
from spotstart.fetch.manifest import (
    MAX_MANIFEST_BYTES,
    Manifest,
    ManifestEntry,
    PieceHasher,
    hash_file,
    manifest_candidates,
    parse_manifest,
)
from spotstart.fetch.peers import PeerSpec, object_id
from spotstart.fetch.scheduler import NullProgress
from spotstart.fetch.verify import crc32c, crc32c_combine
from spotstart.store import Checksums, HttpOptions, ObjectInfo, open_source, parse_url
from spotstart.store.memory import MemorySource
from tests.conftest import BUCKET, run_cli

MiB = 1 << 20
CHUNK = MiB
URL = f"gs://{BUCKET}/trust/"
KEY = "trust/w.bin"


# -- forging a CRC-32C: it is linear over GF(2) ------------------------------------------


def _solve_gf2(columns: list[int], target: int) -> int:
    """x (a bit per column) with XOR of the chosen columns == target."""
    rows: list[tuple[int, int]] = []  # (value, which columns make it), reduced
    for j, col in enumerate(columns):
        combo = 1 << j
        for value, used in rows:
            if col ^ value < col:
                col, combo = col ^ value, combo ^ used
        if col:
            rows.append((col, combo))
            rows.sort(reverse=True)
    x = 0
    for value, used in rows:
        if target ^ value < target:
            target, x = target ^ value, x ^ used
    assert target == 0, "no patch restores this CRC"
    return x


def forge(chunk: bytes, evil_at: int, patch_at: int) -> bytes:
    """``chunk`` with one byte changed at ``evil_at`` and four at ``patch_at`` chosen so its
    CRC-32C is unchanged: crc(a ^ b) = crc(a) ^ crc(b) ^ crc(0...), so the patch solves 32
    linear equations in its 32 bits."""
    n = len(chunk)
    zero = crc32c(bytes(n))

    def lin(diff: bytearray) -> int:  # the linear part of the CRC of a difference
        return crc32c(bytes(diff)) ^ zero

    evil = bytearray(n)
    evil[evil_at] = 0x5A
    columns = []
    for bit in range(32):
        d = bytearray(n)
        d[patch_at + bit // 8] = 1 << (bit % 8)
        columns.append(lin(d))
    x = _solve_gf2(columns, lin(evil))
    out = bytearray(chunk)
    out[evil_at] ^= 0x5A
    for bit in range(32):
        if x >> bit & 1:
            out[patch_at + bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def forge_object(data: bytes, chunk_bytes: int = CHUNK) -> bytes:
    """Every chunk (of the fetch's plan) altered, each keeping its CRC-32C."""
    out = bytearray(data)
    for ch in planning.plan_chunks(len(data), chunk_bytes):
        if ch.length >= 4096:
            out[ch.start : ch.start + ch.length] = forge(
                data[ch.start : ch.start + ch.length], 100, 2000
            )
    return bytes(out)


def test_a_forged_chunk_keeps_its_crc32c_and_the_objects_combined_crc() -> None:
    data = os.urandom(3 * MiB + 17)
    bad = forge_object(data)
    assert bad != data and len(bad) == len(data)
    plan = planning.plan_chunks(len(data), CHUNK)
    for ch in plan:
        good, evil = data[ch.start : ch.start + ch.length], bad[ch.start : ch.start + ch.length]
        assert crc32c(good) == crc32c(evil)
    combined = 0
    for i, ch in enumerate(plan):
        c = crc32c(bad[ch.start : ch.start + ch.length])
        combined = c if i == 0 else crc32c_combine(combined, c, ch.length)
    assert combined == crc32c(data) == crc32c(bad)  # the store's whole-object CRC-32C
    assert hashlib.md5(bad).digest() != hashlib.md5(data).digest()


# -- a hostile peer: a real HTTP server speaking the peer protocol -------------------------


class HostilePeer:
    """``GET /v1/inventory`` (holds everything, publishes the TRUE chunk CRCs: a hint that
    checks out) and ``GET /v1/objects/<id>`` with a Range -> 206 of ``served`` bytes."""

    def __init__(self, objects: dict[str, tuple[bytes, bytes]], chunk_bytes: int = CHUNK):
        self.objects = objects  # id -> (true bytes, served bytes)
        self.chunk_bytes = chunk_bytes
        self.asked: list[str] = []
        peer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                return None

            def do_GET(self) -> None:
                peer.asked.append(self.path)
                if self.path == "/v1/inventory":
                    self._send(200, json.dumps(peer.inventory()).encode(), {})
                    return
                oid = self.path.removeprefix("/v1/objects/")
                if oid not in peer.objects:
                    self._send(404, b"", {})
                    return
                _, served = peer.objects[oid]
                lo, hi = self.headers["Range"].removeprefix("bytes=").split("-")
                a, b = int(lo), int(hi)
                headers = {"Content-Range": f"bytes {a}-{b}/{len(served)}"}
                self._send(206, served[a : b + 1], headers)

            def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def inventory(self) -> dict[str, object]:
        objects = []
        for oid, (true, _) in self.objects.items():
            plan = planning.plan_chunks(len(true), self.chunk_bytes)
            crcs = {str(c.index): f"{crc32c(true[c.start : c.start + c.length]):x}" for c in plan}
            objects.append(
                {
                    "id": oid,
                    "size": len(true),
                    "ranges": [[0, len(true)]],
                    "complete": True,
                    "chunks": {
                        "bytes": self.chunk_bytes,
                        "crc": "crc32c",
                        "parts": [],
                        "crcs": crcs,
                    },
                }
            )
        return {"version": 1, "objects": objects}

    def object_requests(self) -> list[str]:
        return [p for p in self.asked if p.startswith("/v1/objects/")]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def peers() -> Iterator[list[HostilePeer]]:
    started: list[HostilePeer] = []
    yield started
    for p in started:
        p.close()


class Recorder(NullProgress):
    def __init__(self) -> None:
        self.messages: list[str] = []

    def on_message(self, text: str) -> None:
        self.messages.append(text)


def _config(addresses: list[str], verify: str = "auto") -> FetchConfig:
    return FetchConfig(
        chunk_bytes=CHUNK,
        verify=verify,  # type: ignore[arg-type]
        concurrency=Concurrency(streams=4),
        retry=Retry(backoff_base_s=0.01, backoff_cap_s=0.05),
        peers=PeerSpec(tuple(addresses)) if addresses else None,
    )


def _stat(url: str, key: str) -> ObjectInfo:
    async def go() -> ObjectInfo:
        source = open_source(parse_url(url), HttpOptions())
        try:
            return await source.stat(key)
        finally:
            await source.close()

    return asyncio.run(go())


@pytest.fixture
def weights(clean_cloud: StorageEmulator, gcs_env: dict[str, str]) -> tuple[bytes, str]:
    """One object on fake-gcs-server (CRC-32C and MD5) and its peer id."""
    data = os.urandom(3 * MiB + 17)
    clean_cloud.seed_gcs(BUCKET, {KEY: data})
    info = _stat(URL, KEY)
    assert info.checksums.crc32c is not None and info.checksums.md5 is not None
    return data, object_id(f"gs://{BUCKET}/{KEY}", info.version, info.size)


def _liar(peers: list[HostilePeer], oid: str, data: bytes) -> HostilePeer:
    p = HostilePeer({oid: (data, forge_object(data))})
    peers.append(p)
    return p


def _honest(peers: list[HostilePeer], oid: str, data: bytes) -> HostilePeer:
    p = HostilePeer({oid: (data, data)})
    peers.append(p)
    return p


def _make_manifest(url: str, *extra: str) -> dict[str, object]:
    r = run_cli(["manifest", url, "--piece-size", "512KiB", "--json", *extra], env=dict(os.environ))
    assert r.code == 0, r.stderr
    return dict(json.loads(r.stdout))


# -- without a manifest: the origin's MD5, recomputed over the whole object ----------------


@pytest.mark.parametrize("verify", ["auto", "full"])
def test_a_crc_forging_peer_is_caught_by_the_origins_md5_and_the_fetch_exits_0(
    weights: tuple[bytes, str], peers: list[HostilePeer], tmp_path: Path, verify: str
) -> None:
    data, oid = weights
    liar = _liar(peers, oid, data)
    dest = tmp_path / "d"
    r = run_cli(
        [
            *("fetch", URL, str(dest), "--peers", liar.address, "--chunk-size", "1MiB"),
            *("--verify", verify, "--json"),
        ],
        env=dict(os.environ),
    )
    assert r.code == 0, r.stderr
    report = json.loads(r.stdout)
    assert (dest / "w.bin").read_bytes() == data
    assert liar.object_requests()  # it was asked, and its CRCs all checked out...
    assert report["bytes_from_peers"] > 0
    # ...but the MD5 did not: it is dropped, and every one of its chunks came again
    assert "fail the origin's checksum" in report["peers_dropped"][liar.address]
    assert report["verified"] == {"size": 1, "crc32c": 1, "md5": 1}
    # nothing the liar gave was journaled or cached as proven before the MD5 passed
    index = json.loads((dest / ".spotstart" / "index.json").read_text())
    assert "w.bin" in index["files"]


def test_unproven_peer_chunks_are_never_journaled_so_a_rerun_cannot_resume_them(
    weights: tuple[bytes, str], peers: list[HostilePeer], tmp_path: Path
) -> None:
    """Without a manifest a peer's chunk is proven only by the whole-object MD5 at the end:
    until then it stays out of the journal (a run killed before the end must not leave a
    forged chunk that a rerun resumes and checks by CRC alone)."""
    from spotstart.fetch.scheduler import TransferScheduler, _landed

    data, _ = weights
    source = MemorySource({"m/w.bin": data})
    scheduler = TransferScheduler(source, parse_url("gs://mem/m/"), _config([]), NullProgress())
    f = scheduler.plan_file(source._info("m/w.bin"), "w.bin", lambda _f: None)  # type: ignore[arg-type,return-value]
    f.from_peers[0] = ("peer", 1)
    _landed(f, 0, 1)
    _landed(f, 1, 2)
    assert f.unproven == {0: 1} and f.uncommitted == {1: 2}
    scheduler.close()


# -- with a manifest: every peer chunk checked on arrival ----------------------------------


@pytest.mark.parametrize("verify", ["auto", "full"])
def test_with_a_manifest_a_forged_chunk_is_refused_on_arrival_and_an_honest_peer_counts(
    weights: tuple[bytes, str], peers: list[HostilePeer], tmp_path: Path, verify: str
) -> None:
    data, oid = weights
    made = _make_manifest(URL)
    assert made["manifest"] == f"gs://{BUCKET}/trust/.spotstart-manifest.json"
    liar = _liar(peers, oid, data)  # first in the list: asked first
    honest = _honest(peers, oid, data)
    recorder = Recorder()
    report = fetch(
        URL, tmp_path / "d", _config([liar.address, honest.address], verify), progress=recorder
    )
    assert (tmp_path / "d" / "w.bin").read_bytes() == data
    assert (tmp_path / "d" / ".spotstart-manifest.json").exists()  # a mirror of the prefix
    assert "fail the manifest's SHA-256" in report.peers_dropped[liar.address]
    assert honest.address not in report.peers_dropped
    assert report.bytes_from_peers > 0
    assert report.refetched_chunks == 0  # refused before it counted: nothing to refetch
    files = {Path(r.path).name: r for r in report.files}
    assert "sha256-manifest" in files["w.bin"].verified
    assert "md5" not in files["w.bin"].verified  # the pieces proved the peer bytes


def test_a_stale_manifest_is_ignored_and_the_md5_still_catches_the_liar(
    weights: tuple[bytes, str],
    peers: list[HostilePeer],
    tmp_path: Path,
    clean_cloud: StorageEmulator,
) -> None:
    data, _ = weights
    _make_manifest(URL)
    new = os.urandom(len(data))  # the model is replaced; the manifest is not remade
    clean_cloud.seed_gcs(BUCKET, {KEY: new})
    info = _stat(URL, KEY)
    liar = _liar(peers, object_id(f"gs://{BUCKET}/{KEY}", info.version, info.size), new)
    recorder = Recorder()
    report = fetch(URL, tmp_path / "d", _config([liar.address]), progress=recorder)
    assert (tmp_path / "d" / "w.bin").read_bytes() == new
    assert any("stale, ignored" in m for m in recorder.messages), recorder.messages
    assert "fail the origin's checksum" in report.peers_dropped[liar.address]


def test_a_malformed_manifest_is_ignored_with_a_message_and_peers_stay_bounded_by_md5(
    weights: tuple[bytes, str],
    peers: list[HostilePeer],
    tmp_path: Path,
    clean_cloud: StorageEmulator,
) -> None:
    data, oid = weights
    clean_cloud.seed_gcs(
        BUCKET, {"trust/.spotstart-manifest.json": b'{"version": 1, "objects": [{'}
    )
    liar = _liar(peers, oid, data)
    recorder = Recorder()
    report = fetch(URL, tmp_path / "d", _config([liar.address]), progress=recorder)
    assert (tmp_path / "d" / "w.bin").read_bytes() == data
    assert any("manifest" in m and "ignored (not JSON" in m for m in recorder.messages)
    assert liar.address in report.peers_dropped


# -- objects vouched for by a CRC or a size alone never ask a peer -------------------------


class CrcOnlySource(MemorySource):
    """What a store gives for a GCS composite object: a CRC-32C and no MD5."""

    def _info(self, key: str) -> ObjectInfo:
        info = super()._info(key)
        return ObjectInfo(info.key, info.size, info.version, Checksums(info.checksums.crc32c))


def _fetch_from(source: MemorySource, dest: Path, cfg: FetchConfig) -> object:
    async def go() -> object:
        return await Fetcher(source, parse_url("gs://mem/m/"), dest, cfg, NullProgress()).run()

    return asyncio.run(go())


def test_a_crc_only_object_never_asks_a_peer(peers: list[HostilePeer], tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 17)
    source = CrcOnlySource({"m/w.bin": data})
    info = source._info("m/w.bin")
    liar = _liar(peers, object_id("gs://mem/m/w.bin", info.version, info.size), data)
    report = _fetch_from(source, tmp_path / "d", _config([liar.address], "full"))
    assert (tmp_path / "d" / "w.bin").read_bytes() == data
    assert liar.object_requests() == []
    assert report.bytes_from_peers == 0  # type: ignore[attr-defined]


def test_a_crc_only_object_with_a_manifest_takes_only_piece_checked_peer_bytes(
    peers: list[HostilePeer], tmp_path: Path
) -> None:
    data = os.urandom(3 * MiB + 17)
    probe = CrcOnlySource({"m/w.bin": data})._info("m/w.bin")
    pieces, whole = _pieces(data, 512 << 10)
    entry = ManifestEntry(
        "gs://mem/m/w.bin", probe.version, len(data), (), 512 << 10, pieces, whole
    )
    manifest = Manifest({entry.url: entry}).to_bytes()
    source = CrcOnlySource({"m/w.bin": data, "m/.spotstart-manifest.json": manifest})
    oid = object_id("gs://mem/m/w.bin", probe.version, probe.size)
    liar, honest = _liar(peers, oid, data), _honest(peers, oid, data)
    report = _fetch_from(source, tmp_path / "d", _config([liar.address, honest.address]))
    assert (tmp_path / "d" / "w.bin").read_bytes() == data
    assert "fail the manifest's SHA-256" in report.peers_dropped[liar.address]  # type: ignore[attr-defined]
    assert report.bytes_from_peers > 0  # type: ignore[attr-defined]
    assert report.verified["sha256-manifest"] == 1  # type: ignore[attr-defined]


class Sha256OnlySource(MemorySource):
    """What S3 gives for an SSE-KMS object uploaded with a SHA-256 checksum: no MD5 (its
    ETag is not one), ``x-amz-checksum-sha256`` of the whole body."""

    def _info(self, key: str) -> ObjectInfo:
        info = super()._info(key)
        digest = hashlib.sha256(self.objects[key]).digest()
        return ObjectInfo(info.key, info.size, info.version, Checksums(sha256=digest))


def test_a_sha256_object_takes_peer_bytes_and_its_sha256_recomputed_catches_a_liar(
    peers: list[HostilePeer], tmp_path: Path
) -> None:
    data = os.urandom(3 * MiB + 17)
    source = Sha256OnlySource({"m/w.bin": data})
    info = source._info("m/w.bin")
    liar = _liar(peers, object_id("gs://mem/m/w.bin", info.version, info.size), data)
    report = _fetch_from(source, tmp_path / "d", _config([liar.address]))
    assert (tmp_path / "d" / "w.bin").read_bytes() == data
    assert liar.object_requests()
    assert "fail the origin's checksum" in report.peers_dropped[liar.address]  # type: ignore[attr-defined]
    assert report.verified == {"size": 1, "sha256": 1}  # type: ignore[attr-defined]


def test_a_size_only_object_never_asks_a_peer(peers: list[HostilePeer], tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(2 * MiB + 5)
    (src / "w.bin").write_bytes(data)
    info = _stat(f"file://{src}/", str(src / "w.bin").lstrip("/"))
    liar = _liar(peers, object_id(info.key, info.version, info.size), data)
    report = fetch(f"file://{src}/", tmp_path / "d", _config([liar.address]))
    assert (tmp_path / "d" / "w.bin").read_bytes() == data
    assert liar.object_requests() == [] and report.bytes_from_peers == 0


def test_a_manifest_larger_than_the_bound_is_ignored_unread(
    peers: list[HostilePeer], tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "w.bin").write_bytes(b"x" * 1000)
    with open(src / ".spotstart-manifest.json", "wb") as fh:
        fh.truncate(MAX_MANIFEST_BYTES + 1)  # sparse: nothing to read, and nothing is read
    recorder = Recorder()
    cfg = _config([_honest(peers, "0" * 64, b"").address])
    fetch(f"file://{src}/", tmp_path / "d", cfg, progress=recorder)
    assert any("more than 64 MiB" in m for m in recorder.messages), recorder.messages


# -- the manifest format: strict, bounded ----------------------------------------------------


def _pieces(data: bytes, piece_bytes: int) -> tuple[tuple[bytes, ...], bytes]:
    plan = planning.plan_chunks(len(data), piece_bytes)
    return (
        tuple(hashlib.sha256(data[c.start : c.start + c.length]).digest() for c in plan),
        hashlib.sha256(data).digest(),
    )


def _doc(**over: object) -> dict[str, object]:
    data = b"a" * 200_000
    pieces, whole = _pieces(data, 65536)
    obj: dict[str, object] = {
        "url": "gs://b/m/w.bin",
        "version": "7",
        "size": len(data),
        "parts": [],
        "piece_bytes": 65536,
        "pieces": [p.hex() for p in pieces],
        "sha256": whole.hex(),
    }
    obj.update(over)
    return {"version": 1, "objects": [obj]}


def test_a_manifest_round_trips() -> None:
    m = parse_manifest(json.dumps(_doc()).encode())
    assert parse_manifest(m.to_bytes()) == m
    e = m.entries["gs://b/m/w.bin"]
    assert e.matches("gs://b/m/w.bin", "7", 200_000) and not e.matches(
        "gs://b/m/w.bin", "8", 200_000
    )
    assert [p[:2] for p in e.pieces_in(65536, 2 * 65536)] == [(65536, 65536), (131072, 65536)]
    with pytest.raises(ValueError, match="start on a piece"):
        e.pieces_in(1, 65536)
    with pytest.raises(ValueError, match="end on a piece"):
        e.pieces_in(0, 65537)


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"\xff", "not JSON"),
        (b"[]", "expected exactly"),
        (b'{"version": 2, "objects": []}', "version 2"),
        (b'{"version": 1, "objects": [], "extra": 1}', "expected exactly"),
        (b'{"version": 1, "version": 1, "objects": []}', "duplicate key"),
        (b'{"version": 1, "objects": [NaN]}', "not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply|not JSON|expected"),
        (json.dumps(_doc(size=-1)).encode(), "size"),
        (json.dumps(_doc(size=True)).encode(), "size"),
        (json.dumps(_doc(piece_bytes=1)).encode(), "piece_bytes"),
        (json.dumps(_doc(pieces=["ab"] * 4)).encode(), "64 lowercase hex"),
        (json.dumps(_doc(pieces=[])).encode(), "piece grid"),
        (json.dumps(_doc(pieces=["0" * 64] * 5)).encode(), "at most 4"),
        (json.dumps(_doc(sha256="G" * 64)).encode(), "64 lowercase hex"),
        (json.dumps(_doc(parts=[1, 2])).encode(), "add up"),
        (json.dumps(_doc(size=1 << 53, piece_bytes=65536)).encode(), "more than"),
        (json.dumps(_doc(url="x" * 5000)).encode(), "at most 4096"),
        (json.dumps(_doc(extra=1)).encode(), "unknown"),
        (b" " * (MAX_MANIFEST_BYTES + 1), "larger than"),
    ],
)
def test_a_malformed_manifest_is_a_value_error_naming_the_cause(raw: bytes, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_manifest(raw)


@pytest.mark.parametrize("split", [1, 7, 65536, 100_000, 1 << 20])
def test_the_piece_hasher_checks_every_piece_whatever_the_split(split: int) -> None:
    data = os.urandom(300_000)
    pieces, _ = _pieces(data, 65536)
    grid = [(c.start, c.length, pieces[c.index]) for c in planning.plan_chunks(len(data), 65536)]
    h = PieceHasher(grid)
    for i in range(0, len(data), split):
        h.update(data[i : i + split])
    assert h.mismatch() is None
    bad = PieceHasher(grid)
    bad.update(forge(data, 70_000, 80_000))
    assert "bytes 65536-131071 fail" in (bad.mismatch() or "")
    short = PieceHasher(grid)
    short.update(data[:-1])
    assert "length" in (short.mismatch() or "")


def test_hash_file_gives_pieces_on_the_multipart_grid(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    (tmp_path / "f").write_bytes(data)
    pieces, whole = hash_file(tmp_path / "f", 65536, (100_000, 200_000), len(data))
    grid = planning.plan_chunks(len(data), 65536, (100_000,))
    assert pieces == tuple(
        hashlib.sha256(data[c.start : c.start + c.length]).digest() for c in grid
    )
    assert whole == hashlib.sha256(data).digest()


def test_manifests_are_looked_for_beside_the_object_then_up_to_the_urls_directory() -> None:
    assert manifest_candidates("gs", "m/", ["m/a", "m/sub/b"]) == [
        "m/.spotstart-manifest.json",
        "m/sub/.spotstart-manifest.json",
    ]
    assert manifest_candidates("gs", "m/w.bin", ["m/w.bin"]) == [
        "m/w.bin.spotstart-manifest.json",
        "m/.spotstart-manifest.json",
    ]
    assert manifest_candidates("https", "https://h/x.bin", []) == [
        "https://h/x.bin.spotstart-manifest.json"
    ]
    assert manifest_candidates("https", "https://h/x.bin?sig=1", []) == []


# -- load: the same scheduler, tensors landing straight from the peer ------------------------


@pytest.mark.parametrize("with_manifest", [False, True])
def test_load_from_a_crc_forging_peer_gives_the_origins_tensors(
    clean_cloud: StorageEmulator,
    gcs_env: dict[str, str],
    peers: list[HostilePeer],
    tmp_path: Path,
    with_manifest: bool,
) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from spotstart.weights.loader import load_async

    g = torch.Generator().manual_seed(1)
    tensors = {"w": torch.randn(700, 1200, generator=g), "b": torch.randn(333, generator=g)}
    save_file(tensors, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    key = "trust-load/model.safetensors"
    clean_cloud.seed_gcs(BUCKET, {key: data})
    url = f"gs://{BUCKET}/trust-load/"
    if with_manifest:
        _make_manifest(url)
    info = _stat(url, key)
    oid = object_id(f"gs://{BUCKET}/{key}", info.version, info.size)
    liar = _liar(peers, oid, data)
    honest = _honest(peers, oid, data)
    got, report = asyncio.run(load_async(url, config=_config([liar.address, honest.address])))
    for name, t in tensors.items():
        assert torch.equal(got[name], t), name
    assert liar.object_requests() and liar.address in report.peers_dropped
    assert report.bytes_from_peers > 0
    kinds = report.verified
    assert ("sha256-manifest" in kinds) if with_manifest else ("md5" in kinds)


def test_a_multipart_objects_chunks_line_up_with_the_manifests_pieces(
    moto: MotoS3, monkeypatch: pytest.MonkeyPatch, peers: list[HostilePeer], tmp_path: Path
) -> None:
    """Pieces restart at every part boundary (as chunks do): parts of 5 MiB + 1 and 6 MiB
    cut every 512 KiB grid, and each peer chunk is still whole pieces, checked on arrival."""
    from tests.fetch.test_multipart import part_bodies, upload_multipart

    for k, v in moto.env().items():
        monkeypatch.setenv(k, v)
    parts = part_bodies("trust")
    data = b"".join(parts)
    upload_multipart(moto, "trust-mp/w.bin", parts, crc=True)
    url = f"s3://{BUCKET}/trust-mp/"
    _make_manifest(url)
    info = _stat(url, "trust-mp/w.bin")
    assert len(info.parts) == 3
    oid = object_id(f"s3://{BUCKET}/trust-mp/w.bin", info.version, info.size)
    liar, honest = _liar(peers, oid, data), _honest(peers, oid, data)
    report = fetch(url, tmp_path / "d", _config([liar.address, honest.address]))
    assert (tmp_path / "d" / "w.bin").read_bytes() == data
    assert "fail the manifest's SHA-256" in report.peers_dropped[liar.address]
    assert report.bytes_from_peers > 0 and report.refetched_chunks == 0
    files = {Path(r.path).name: r for r in report.files}
    assert "sha256-manifest" in files["w.bin"].verified
