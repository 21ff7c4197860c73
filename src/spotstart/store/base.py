"""The one storage seam: every backend (gs, s3, http, file, memory) implements :class:`RangeSource`.

Backends translate their own failures into :mod:`spotstart.errors` here, at the seam, so the
fetch engine above only ever sees our exceptions. Not a general object-store client: read-only.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

from spotstart.errors import NotFound

# A sink receives the body of a ranged read piece by piece, in order; awaiting it is the
# backpressure (the disk writer's bounded queue).
Sink = Callable[[bytes], Awaitable[None]]


CrcScope = Literal["object", "parts", "either"]


@dataclass(frozen=True)
class Checksums:
    """Checksums the store vouches for.

    ``crc32c``, ``crc32``, ``crc64nvme``: unsigned CRCs (a store gives one; :attr:`crc` picks
    it). ``crc_scope`` says of what: ``"object"`` the whole body (GCS; S3 FULL_OBJECT, always
    for CRC-64/NVME), ``"parts"`` the CRC of the concatenated big-endian CRCs of each part (S3
    multipart COMPOSITE), ``"either"`` a multipart S3 object whose server did not say
    (``x-amz-checksum-type`` absent): either one matching proves the bytes.
    ``md5``: raw 16-byte digest of the body (S3 single-part ETag, GCS md5Hash).
    ``md5_of_parts``: an S3 multipart ETag ``"<hex>-N"``, the MD5 of the concatenated per-part
    MD5 digests. Per-part checks need :attr:`ObjectInfo.parts`.
    ``sha256``: raw 32-byte SHA-256 of the whole body (S3 ``x-amz-checksum-sha256`` of a
    single-part upload or a FULL_OBJECT checksum; never the composite of parts).
    """

    crc32c: int | None = None
    md5: bytes | None = None
    crc_scope: CrcScope = "object"
    md5_of_parts: bytes | None = None
    crc32: int | None = None
    crc64nvme: int | None = None
    sha256: bytes | None = None

    @property
    def crc(self) -> tuple[str, int] | None:
        """The CRC to verify with, as (algorithm, value): CRC-32C first (hardware, and what
        GCS gives), then CRC-64/NVME, then CRC-32."""
        for name in ("crc32c", "crc64nvme", "crc32"):
            value = getattr(self, name)
            if value is not None:
                return name, value
        return None

    @property
    def kinds(self) -> tuple[str, ...]:
        crc = self.crc
        md5 = self.md5 or self.md5_of_parts
        return tuple(k for k, v in ((crc[0] if crc else "", crc), ("md5", md5)) if v is not None)

    @staticmethod
    def from_goog_hash(header: str) -> Checksums:
        """Parse GCS ``x-goog-hash: crc32c=AAAAAA==,md5=...`` (base64, big-endian crc)."""
        crc: int | None = None
        md5: bytes | None = None
        for part in header.split(","):
            name, _, value = part.strip().partition("=")
            if name == "crc32c" and value:
                crc = int.from_bytes(base64.b64decode(value + "=" * (-len(value) % 4)), "big")
            elif name == "md5" and value:
                md5 = base64.b64decode(value + "=" * (-len(value) % 4))
        return Checksums(crc, md5)


@dataclass(frozen=True)
class ObjectInfo:
    """One object: its key, size and version (GCS generation, S3/HTTP ETag, file mtime).
    ``ranges`` is False for an http server that does not honour byte ranges: such an
    object is read as one stream. ``needs_stat``: this came from a listing that does not carry
    the object's checksums (S3 ListObjectsV2); ``stat(key)`` gives them. ``parts``: the sizes of
    the parts of a multipart upload, in order, when per-part checksums are to be verified."""

    key: str
    size: int
    version: str
    checksums: Checksums = field(default_factory=Checksums)
    ranges: bool = True
    needs_stat: bool = False
    parts: tuple[int, ...] = ()


class RangeSource(Protocol):
    """Read-only access to one bucket (or one URL, or one directory)."""

    @property
    def display(self) -> str:
        """How to name this source in messages, e.g. ``gs://bucket``."""
        ...

    async def stat(self, key: str) -> ObjectInfo:
        """Size, version and checksums of ``key``; :class:`NotFound` if absent."""
        ...

    async def list(self, prefix: str) -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (may be empty)."""
        ...

    async def read(self, obj: ObjectInfo, start: int, length: int, sink: Sink) -> None:
        """Stream bytes ``[start, start+length)`` of exactly version ``obj.version`` into
        ``sink``. Raises :class:`TransientError` (retry), :class:`ObjectChanged`, or a fatal
        error. A short body is a :class:`TransientError`; the caller counts bytes."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class ObjectWriter(Protocol):
    """The one write a source may offer (gs, s3, az, file; not http): a small whole object
    put under ``key``, replacing any there (a manifest beside a model). Translates failures
    as reads do."""

    async def put(self, key: str, data: bytes, content_type: str) -> None: ...


@runtime_checkable
class ObjectCreator(Protocol):
    """Create-only upload (gs, s3, az, file; not http): the local file at ``path`` becomes
    the NEW object ``key`` only if no object is there. True when written, False when one
    already exists (it is left as it is). The body is streamed from the file (memory bounded,
    whatever its size) in one request, at most 5 GiB (``UsageError`` beyond); the store is
    given the file's checksums so a body damaged on the way is refused, and a file that
    changes while it is sent publishes nothing (``IntegrityError``). Other failures are
    translated as reads do; a ``TransientError`` may leave the object written (the answer
    was lost): a retry then answers False, and the caller checks what is there."""

    async def create(self, key: str, path: Path, content_type: str) -> bool: ...


@dataclass(frozen=True)
class Named:
    """What a URL's key names in a store: one object, or else the objects under a prefix."""

    object: ObjectInfo | None
    prefix: str
    objects: list[ObjectInfo] = field(default_factory=list)


async def lookup(source: RangeSource, scheme: str, key: str) -> Named:
    """Stat ``key`` as one object; when it is none (or ends in ``/``), list it as a prefix.
    An http(s) URL always names one object; ``file`` keys are relative to the source's root.
    Listed objects may still need a stat (``needs_stat``)."""
    if scheme in ("http", "https"):
        return Named(await source.stat(key), key)
    if scheme == "file":
        key = key.lstrip("/")
    if key and not key.endswith("/"):
        try:
            return Named(await source.stat(key), key)
        except NotFound:
            key += "/"  # not an object: maybe a prefix
    return Named(None, key, await source.list(key))
