"""One layer as a stream of tar members: the blob is read in 1 MiB pieces, its digest and size
checked, decompressed by its magic bytes (never by its name or media type: plain, gzip or
zstd), the tar's diff_id checked, and the members handed over. Nothing holds a whole layer:
memory is the queue's bound (``QUEUE_CHUNKS`` decompressed pieces per layer in flight)."""

from __future__ import annotations

import io
import queue
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import zstandard

from spotstart.errors import IntegrityError, InvalidImage, SpotstartError, UnsupportedImage
from spotstart.image.digest import Digest
from spotstart.image.tarscan import TarEntry, TarScanner

READ_BYTES = 1 << 20
QUEUE_CHUNKS = 8
_GZIP = b"\x1f\x8b"
_ZSTD = b"\x28\xb5\x2f\xfd"


def compression_of(head: bytes) -> str:
    """``none``, ``gzip`` or ``zstd`` from a layer's first bytes (a zstd:chunked layer may open
    with a skippable frame, magic 0x184D2A5?)."""
    if head[:2] == _GZIP:
        return "gzip"
    if head[:4] == _ZSTD or (
        len(head) >= 4 and head[1:4] == b"\x2a\x4d\x18" and head[0] & 0xF0 == 0x50
    ):
        return "zstd"
    if head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00":
        raise UnsupportedImage("the layer is bzip2/xz-compressed; OCI layers are tar, gzip or zstd")
    return "none"


@dataclass
class LayerStats:
    compression: str = ""
    bytes_stored: int = 0
    bytes_uncompressed: int = 0


OUT_BYTES = 4 << 20  # most decompressed bytes per call: zeros inflate 1000x, memory must not


def _gunzip(pieces: Iterator[bytes]) -> Iterator[bytes]:
    # Concatenated gzip members are one valid stream (RFC 1952 2.2): after each member's
    # end a fresh decoder takes what is left.
    d = zlib.decompressobj(31)
    fed = False
    for piece in pieces:
        while piece:
            fed = True
            out = d.decompress(piece, OUT_BYTES)
            if out:
                yield out
            if d.eof:
                piece, d, fed = d.unused_data, zlib.decompressobj(31), False
            else:
                piece = d.unconsumed_tail
    while fed and not d.eof:
        out = d.decompress(d.unconsumed_tail, OUT_BYTES)
        if not out:
            raise InvalidImage("the layer's gzip stream is truncated")
        yield out


class _PieceReader(io.RawIOBase):
    """The blob's pieces as a file, for zstd's stream reader."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self._pieces = pieces
        self._left = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        while not len(self._left):
            nxt = next(self._pieces, None)
            if nxt is None:
                return 0
            self._left = memoryview(nxt)
        n = min(len(buf), len(self._left))
        buf[:n] = self._left[:n]
        self._left = self._left[n:]
        return n


def _unzstd(pieces: Iterator[bytes]) -> Iterator[bytes]:
    # zstd:chunked and pzstd write many frames: read across them. The reader bounds each
    # output to OUT_BYTES. (It does not report a stream cut at a frame's middle: the blob's
    # size and digest, and the tar's own end, do.)
    reader = zstandard.ZstdDecompressor().stream_reader(
        io.BufferedReader(_PieceReader(pieces)), read_size=READ_BYTES, read_across_frames=True
    )
    while out := reader.read(OUT_BYTES):
        yield out


def _pieces(
    f: BinaryIO, first: bytes, counter: Callable[[bytes], None], limit: int | None
) -> Iterator[bytes]:
    """The blob in pieces, never more than ``limit`` bytes (its size and one more, enough to
    tell it is too long: a blob that is /dev/zero, or a server that never stops, ends here)."""
    counter(first)
    if first:
        yield first
    left = None if limit is None else limit - len(first)
    while left is None or left > 0:
        piece = f.read(READ_BYTES if left is None else min(READ_BYTES, left))
        if not piece:
            return
        if left is not None:
            left -= len(piece)
        counter(piece)
        yield piece


def layer_members(
    open_blob: Callable[[], BinaryIO],
    *,
    digest: Digest | None,
    size: int | None,
    diff_id: Digest | None,
    what: str,
    stats: LayerStats,
) -> Iterator[TarEntry]:
    """Every member of one layer, in archive order; raises IntegrityError if the blob or its
    tar does not match its digests, InvalidImage if it is not a tar."""
    blob_hash = digest.hasher() if digest is not None else None
    tar_hash = diff_id.hasher() if diff_id is not None else None
    scanner = TarScanner()

    def count(piece: bytes) -> None:
        stats.bytes_stored += len(piece)
        if blob_hash is not None:
            blob_hash.update(piece)

    limit = None if size is None else size + 1
    with open_blob() as f:
        first = f.read(READ_BYTES if limit is None else min(READ_BYTES, limit))
        stats.compression = compression_of(first)
        plain = stats.compression == "none"
        same = plain and digest is not None and diff_id is not None and digest == diff_id
        if same:
            tar_hash = None  # one digest covers both
        raw = _pieces(f, first, count, limit)
        chunks = raw if plain else (_gunzip(raw) if stats.compression == "gzip" else _unzstd(raw))
        failure: SpotstartError | None = None
        try:
            for chunk in chunks:
                if tar_hash is not None:
                    tar_hash.update(chunk)
                if not scanner.ended:
                    yield from scanner.feed(chunk)
                else:
                    scanner.bytes_seen += len(chunk)
            scanner.close()
        except zstandard.ZstdError as exc:
            failure = InvalidImage(f"{what}: corrupt zstd stream ({exc})")
        except zlib.error as exc:
            failure = InvalidImage(f"{what}: corrupt gzip stream ({exc})")
        except InvalidImage as exc:
            failure = InvalidImage(f"{what}: {exc}")
        if failure is not None:
            for _ in raw:  # read the rest: a wrong digest says more than a broken tar
                pass
        stats.bytes_uncompressed = scanner.bytes_seen
    if size is not None and stats.bytes_stored > size:
        raise IntegrityError(
            f"{what}: blob is longer than the {size} bytes the manifest says (replaced); "
            "read no further"
        )
    if size is not None and stats.bytes_stored != size:
        raise IntegrityError(
            f"{what}: blob is {stats.bytes_stored} bytes, the manifest says {size} "
            "(truncated or replaced)"
        )
    if blob_hash is not None and digest is not None and blob_hash.hexdigest() != digest.encoded:
        raise IntegrityError(f"{what}: blob does not match its digest {digest} (corrupt)")
    if failure is not None:
        raise failure
    if not scanner.ended and scanner.bytes_seen == 0:
        raise InvalidImage(f"{what}: the layer is empty, not a tar")
    if tar_hash is not None and diff_id is not None and tar_hash.hexdigest() != diff_id.encoded:
        raise IntegrityError(
            f"{what}: uncompressed layer does not match its diff_id {diff_id} (corrupt)"
        )


_DONE = object()


def prefetched(items: Iterator[TarEntry], maxsize: int = 64) -> Iterator[TarEntry]:
    """Run ``items`` in a worker thread (inflate and hashing release the GIL) and hand its
    members over through a bounded queue, errors included, in order."""
    q: queue.Queue[object] = queue.Queue(maxsize)
    stop = threading.Event()

    def work() -> None:
        try:
            batch: list[TarEntry] = []
            for item in items:
                batch.append(item)
                if len(batch) >= 256:
                    _put(q, batch, stop)
                    batch = []
            _put(q, batch, stop)
            _put(q, _DONE, stop)
        except BaseException as exc:  # handed to the consumer, raised there
            _put(q, exc, stop)

    thread = threading.Thread(target=work, name="spotstart-layer", daemon=True)
    thread.start()
    try:
        while True:
            got = q.get()
            if got is _DONE:
                return
            if isinstance(got, BaseException):
                raise got
            yield from got  # type: ignore[misc]
    finally:
        stop.set()
        thread.join(timeout=5)


def _put(q: queue.Queue[object], item: object, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue
