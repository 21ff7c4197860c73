"""Chunk manifests: SHA-256 digests of every piece of a model's objects, written by the model's
owner next to the model (``spotstart manifest URL``) and read from the origin at fetch time,
so a peer's bytes are checked against digests the peer cannot forge (a CRC can be forged:
four patch bytes restore any CRC-32C). Pure: the format, its strict bounded parser, the piece
grid and the per-piece check; building one (a verified fetch from the origin, then hashing)
is :func:`build_manifest`, uploading it is the CLI's.

Where it lives (one file per model prefix):

- ``<prefix>/.spotstart-manifest.json`` for a prefix (``gs://b/llama/`` ->
  ``gs://b/llama/.spotstart-manifest.json``): it covers every object under the prefix;
- ``<key>.spotstart-manifest.json`` for a single object (``gs://b/m.safetensors`` ->
  ``gs://b/m.safetensors.spotstart-manifest.json``).

A fetch looks for ``<key>.spotstart-manifest.json`` of the object its URL names, then
``.spotstart-manifest.json`` in each directory from the object's own up to the URL's; an
entry of exactly the object's version counts, any other is stale and ignored.

Format (``version`` 1; anything else, unknown fields, a wrong count of pieces, hex of the
wrong length, NaN, duplicate keys, more than :data:`MAX_MANIFEST_BYTES` is malformed)::

    {"version": 1,
     "objects": [{"url": "gs://b/llama/model.safetensors",   # as fetch names it
                  "version": "1700000000000000",              # generation / ETag / ...
                  "size": 123456789,
                  "parts": [],                                # S3 multipart sizes, if known
                  "piece_bytes": 4194304,
                  "pieces": ["<sha256 hex>", ...],
                  "sha256": "<sha256 hex of the whole object>"}]}

Pieces are ``plan.plan_chunks(size, piece_bytes, part_boundaries(parts))``: fixed
``piece_bytes`` pieces that restart at every multipart boundary, so a fetch whose chunks are
a whole number of pieces (and that cuts at the same part boundaries) has chunks made of whole
pieces: each chunk from a peer is checked piece by piece as it lands. A fetch with peers plans
a covered object's chunks so (its chunk size rounded down to whole pieces, at least one). The
manifest file is an object like any other: a fetch of the prefix copies it too.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spotstart.fetch import plan as planning

if TYPE_CHECKING:
    from spotstart.fetch.config import FetchConfig, FetchReport
    from spotstart.fetch.scheduler import ProgressListener

MANIFEST_NAME = ".spotstart-manifest.json"  # in a prefix's directory
MANIFEST_SUFFIX = ".spotstart-manifest.json"  # after a single object's key
FORMAT_VERSION = 1
# 64 MiB: a 1 TB model at 4 MiB pieces is ~18 MB of manifest; a bigger one is an error or a
# hostile file, and never read whole.
MAX_MANIFEST_BYTES = 64 << 20
MAX_OBJECTS = 100_000
MAX_PIECES = 1 << 22  # per object: 16 TiB at 4 MiB
MAX_PARTS = 10_000  # S3's own limit
MIN_PIECE_BYTES = 64 << 10
MAX_PIECE_BYTES = 64 << 20  # a fetch chunk is whole pieces: reads past 64 MiB lose throughput
DEFAULT_PIECE_BYTES = 4 << 20  # = plan.MIN_CHUNK: every fetch chunk can be whole pieces
MAX_TEXT = 4096  # URL and version strings
_HEX = frozenset("0123456789abcdef")
_OBJECT_FIELDS = {"url", "version", "size", "parts", "piece_bytes", "pieces", "sha256"}


@dataclass(frozen=True)
class ManifestEntry:
    """One object of a manifest: its identity (``url``, ``version``, ``size``, ``parts``) and
    its digests."""

    url: str
    version: str
    size: int
    parts: tuple[int, ...]
    piece_bytes: int
    pieces: tuple[bytes, ...]  # raw 32-byte SHA-256 of each piece, in order
    sha256: bytes
    starts: tuple[int, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        grid = piece_plan(self.size, self.piece_bytes, self.parts)
        if len(grid) != len(self.pieces):
            raise ValueError(
                f"{self.url}: {len(self.pieces)} piece digests, the piece grid has {len(grid)}"
            )
        object.__setattr__(self, "starts", tuple(c.start for c in grid))

    def matches(self, url: str, version: str, size: int) -> bool:
        """The entry is of exactly this object version (else it is stale for it)."""
        return (self.url, self.version, self.size) == (url, version, size)

    def pieces_in(self, start: int, length: int) -> list[tuple[int, int, bytes]]:
        """``(offset, length, digest)`` of the pieces that make up ``[start, start+length)``;
        ValueError when that range does not begin and end on piece boundaries."""
        i = bisect.bisect_left(self.starts, start)
        end = start + length
        if length <= 0 or i == len(self.starts) or self.starts[i] != start or end > self.size:
            raise ValueError(f"{self.url}: bytes {start}-{end - 1} do not start on a piece")
        out = []
        while i < len(self.starts) and self.starts[i] < end:
            nxt = self.starts[i + 1] if i + 1 < len(self.starts) else self.size
            out.append((self.starts[i], nxt - self.starts[i], self.pieces[i]))
            i += 1
        if out[-1][0] + out[-1][1] != end:
            raise ValueError(f"{self.url}: bytes {start}-{end - 1} do not end on a piece")
        return out

    def chunk_bytes_for(self, wanted: int) -> int:
        """The chunk size nearest below ``wanted`` made of whole pieces (at least one)."""
        return self.piece_bytes * max(1, wanted // self.piece_bytes)

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "version": self.version,
            "size": self.size,
            "parts": list(self.parts),
            "piece_bytes": self.piece_bytes,
            "pieces": [p.hex() for p in self.pieces],
            "sha256": self.sha256.hex(),
        }


@dataclass(frozen=True)
class Manifest:
    """The entries of one manifest file, by URL."""

    entries: dict[str, ManifestEntry]

    def to_bytes(self) -> bytes:
        doc = {
            "version": FORMAT_VERSION,
            "objects": [e.to_json() for _, e in sorted(self.entries.items())],
        }
        return json.dumps(doc, separators=(",", ":")).encode()


def piece_plan(size: int, piece_bytes: int, parts: tuple[int, ...] = ()) -> list[planning.Chunk]:
    """The pieces of an object: ``piece_bytes`` each, restarting at every part boundary."""
    return planning.plan_chunks(size, piece_bytes, planning.part_boundaries(parts))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _int(v: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"{what} must be an integer in [{lo}, {hi}]")
    return int(v)


def _text(v: Any, what: str) -> str:
    if not isinstance(v, str) or len(v) > MAX_TEXT:
        raise ValueError(f"{what} must be a string of at most {MAX_TEXT} characters")
    return v


def _digest(v: Any, what: str) -> bytes:
    if not isinstance(v, str) or len(v) != 64 or not _HEX.issuperset(v):
        raise ValueError(f"{what} must be 64 lowercase hex digits")
    return bytes.fromhex(v)


def _entry(o: Any, n: int) -> ManifestEntry:
    where = f"objects[{n}]"
    if not isinstance(o, dict):
        raise ValueError(f"{where} is not an object")
    if set(o) != _OBJECT_FIELDS:
        extra, missing = set(o) - _OBJECT_FIELDS, _OBJECT_FIELDS - set(o)
        raise ValueError(f"{where}: unknown {sorted(extra)} / missing {sorted(missing)} fields")
    size = _int(o["size"], f"{where}.size", 0, 1 << 53)
    piece_bytes = _int(o["piece_bytes"], f"{where}.piece_bytes", MIN_PIECE_BYTES, MAX_PIECE_BYTES)
    if -(-size // piece_bytes) > MAX_PIECES:
        raise ValueError(f"{where}: more than {MAX_PIECES} pieces")
    parts_raw = o["parts"]
    if not isinstance(parts_raw, list) or len(parts_raw) > MAX_PARTS:
        raise ValueError(f"{where}.parts must be a list of at most {MAX_PARTS} sizes")
    parts = tuple(_int(p, f"{where}.parts", 1, 1 << 53) for p in parts_raw)
    if parts and sum(parts) != size:
        raise ValueError(f"{where}.parts do not add up to its size")
    pieces_raw = o["pieces"]
    # The grid's length is known before any digest is looked at: a list of the wrong length
    # (or an absurd size for its piece size) is refused before it is walked.
    expected = -(-size // piece_bytes) + len(parts)
    if not isinstance(pieces_raw, list) or len(pieces_raw) > min(expected, MAX_PIECES):
        raise ValueError(f"{where}.pieces must be a list of at most {min(expected, MAX_PIECES)}")
    return ManifestEntry(
        _text(o["url"], f"{where}.url"),
        _text(o["version"], f"{where}.version"),
        size,
        parts,
        piece_bytes,
        tuple(_digest(p, f"{where}.pieces") for p in pieces_raw),
        _digest(o["sha256"], f"{where}.sha256"),
    )


def parse_manifest(raw: bytes) -> Manifest:
    """A manifest from its bytes; ValueError naming the first thing wrong with it.

    >>> parse_manifest(b'{"version": 1, "objects": []}').entries
    {}
    """
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ValueError(f"larger than {MAX_MANIFEST_BYTES >> 20} MiB")
    try:
        doc = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_reject_constant,
        )
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON ({exc})") from None
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if not isinstance(doc, dict) or set(doc) != {"version", "objects"}:
        raise ValueError('expected exactly {"version": 1, "objects": [...]}')
    if doc["version"] != FORMAT_VERSION or isinstance(doc["version"], bool):
        raise ValueError(f"version {doc['version']!r} is not {FORMAT_VERSION}")
    objects = doc["objects"]
    if not isinstance(objects, list) or len(objects) > MAX_OBJECTS:
        raise ValueError(f"objects must be a list of at most {MAX_OBJECTS}")
    entries: dict[str, ManifestEntry] = {}
    for n, o in enumerate(objects):
        e = _entry(o, n)
        if e.url in entries:
            raise ValueError(f"objects[{n}]: {e.url} is listed twice")
        entries[e.url] = e
    return Manifest(entries)


class PieceHasher:
    """SHA-256 of consecutive pieces of one chunk as its bytes arrive, in order, any split:
    :meth:`update` from the reader's thread (hashlib releases the GIL), :meth:`mismatch` once
    the chunk has landed."""

    def __init__(self, pieces: list[tuple[int, int, bytes]]) -> None:
        self.pieces = pieces
        self._i = 0
        self._left = pieces[0][1] if pieces else 0
        self._h = hashlib.sha256()
        self._bad: int | None = None
        self._extra = False

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view.nbytes:
            if self._i >= len(self.pieces):
                self._extra = True
                return
            n = min(self._left, view.nbytes)
            self._h.update(view[:n])
            view = view[n:]
            self._left -= n
            if self._left == 0:
                self._close_piece()

    def _close_piece(self) -> None:
        if self._bad is None and self._h.digest() != self.pieces[self._i][2]:
            self._bad = self._i
        self._i += 1
        self._h = hashlib.sha256()
        self._left = self.pieces[self._i][1] if self._i < len(self.pieces) else 0

    def mismatch(self) -> str | None:
        """None when every piece arrived whole and matched; else which did not."""
        if self._bad is not None:
            at, n, _ = self.pieces[self._bad]
            return f"bytes {at}-{at + n - 1} fail the manifest's SHA-256"
        if self._extra or self._i != len(self.pieces):
            return "its length does not match the manifest's pieces"
        return None


def hash_file(
    path: Path, piece_bytes: int, parts: tuple[int, ...], size: int, threads: int = 4
) -> tuple[tuple[bytes, ...], bytes]:
    """(piece digests, whole-object digest) of a local file. The whole object's SHA-256 is
    one sequential pass; the pieces are hashed beside it on other threads (hashlib releases
    the GIL), so the wall time is about one pass, not two."""
    grid = piece_plan(size, piece_bytes, parts)
    block = 8 << 20
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def feed(h: Any, start: int, length: int) -> Any:
        for at in range(start, start + length, block):
            want = min(block, start + length - at)
            data = os.pread(fd, want, at)
            if len(data) != want:
                raise ValueError(f"{path}: shorter than {size} bytes")
            h.update(data)
        return h

    try:
        if os.fstat(fd).st_size != size:
            raise ValueError(f"{path}: {os.fstat(fd).st_size} bytes, not {size}")
        with ThreadPoolExecutor(max(1, threads)) as pool:
            whole = pool.submit(feed, hashlib.sha256(), 0, size)
            pieces = pool.map(lambda c: feed(hashlib.sha256(), c.start, c.length).digest(), grid)
            return tuple(pieces), whole.result().digest()
    finally:
        os.close(fd)


def manifest_candidates(
    scheme: str, url_key: str, keys: Iterable[str], limit: int = 32
) -> list[str]:
    """Keys where manifests covering ``keys`` may be, nearest first: the single object's
    ``<key>.spotstart-manifest.json`` when the URL names one of them, then
    ``.spotstart-manifest.json`` in each directory from each object's up to the URL's."""
    if scheme in ("http", "https"):
        return [url_key + MANIFEST_SUFFIX] if "?" not in url_key and "#" not in url_key else []
    key_of_url = url_key.lstrip("/") if scheme == "file" else url_key
    top = key_of_url[: key_of_url.rfind("/") + 1]  # the URL's directory ("" at the root)
    out: dict[str, None] = {}
    for key in keys:
        if key == key_of_url:
            out[key + MANIFEST_SUFFIX] = None
    for key in keys:
        d = key[: key.rfind("/") + 1]
        while len(out) < limit:
            out[d + MANIFEST_NAME] = None
            if not d.startswith(top) or len(d) <= len(top):
                break
            d = d[: d[:-1].rfind("/") + 1]
    return list(out)[:limit]


def manifest_key(prefix: str, single: str | None) -> str:
    """Where the manifest of a prefix (or of the ``single`` object a URL names) goes."""
    if single is not None:
        return single + MANIFEST_SUFFIX
    return (
        prefix + MANIFEST_NAME
        if not prefix or prefix.endswith("/")
        else prefix + "/" + MANIFEST_NAME
    )


@dataclass(frozen=True)
class BuiltManifest:
    """What :func:`build_manifest` made: the manifest, its key beside the model, and the
    fetch that read the objects (its ``verified`` says what proved them)."""

    manifest: Manifest
    key: str
    report: FetchReport
    hash_seconds: float


async def build_manifest(
    src: str,
    workdir: Path,
    config: FetchConfig,
    *,
    piece_bytes: int = DEFAULT_PIECE_BYTES,
    progress: ProgressListener | None = None,
    on_hashed: Callable[[str], None] | None = None,
) -> BuiltManifest:
    """Fetch everything ``src`` names from the origin (never peers) into the fresh private
    directory ``workdir``, verified by the origin's checksums exactly as ``fetch`` does, then
    hash each file as it landed. The identities come from the fetch's own cache index (the
    object versions it verified)."""
    # The engine imports the scheduler, which imports this module: imported here.
    import asyncio
    import dataclasses
    import time

    from spotstart.fetch.cache import CacheIndex
    from spotstart.fetch.engine import Fetcher
    from spotstart.fetch.scheduler import NullProgress, source_for
    from spotstart.store import lookup, parse_url

    if not MIN_PIECE_BYTES <= piece_bytes <= MAX_PIECE_BYTES:
        raise ValueError(f"piece size must be in [{MIN_PIECE_BYTES}, {MAX_PIECE_BYTES}] bytes")
    cfg = dataclasses.replace(
        config,
        # through the page cache: the files are read back for hashing right away
        disk=dataclasses.replace(config.disk, direct_io=False),
        peers=None,
        serve_peers=None,
        use_cache=False,
        exclude=(*config.exclude, "*" + MANIFEST_SUFFIX),
    )
    url = parse_url(src)
    source = source_for(url, cfg)
    try:
        found = await lookup(source, url.scheme, url.key)
        fetcher = Fetcher(source, url, workdir, cfg, progress or NullProgress())
        report = await fetcher.run()
    finally:
        await source.close()
    t0 = time.monotonic()
    index = CacheIndex(workdir)
    entries: dict[str, ManifestEntry] = {}
    for rel, e in sorted(index.entries.items()):
        pieces, whole = await asyncio.to_thread(
            hash_file, workdir / rel, piece_bytes, e.parts, e.size
        )
        entries[e.source] = ManifestEntry(
            e.source, e.version, e.size, e.parts, piece_bytes, pieces, whole
        )
        if on_hashed is not None:
            on_hashed(rel)
    if len(entries) != report.files_total:
        raise ValueError(f"{len(entries)} of {report.files_total} objects were recorded")
    single = found.object.key if found.object is not None else None
    return BuiltManifest(
        Manifest(entries),
        manifest_key(found.prefix, single),
        report,
        round(time.monotonic() - t0, 3),
    )
