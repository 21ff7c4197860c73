"""Storage backends behind one seam (:class:`~spotstart.store.base.RangeSource`)."""

from __future__ import annotations

from spotstart.errors import UsageError
from spotstart.store._direct import (
    BodySink,
    DirectRangeSource,
    DirectReader,
    DirectUnsupported,
    RangeRequest,
    SinkError,
)
from spotstart.store._http import HttpOptions
from spotstart.store.base import (
    Checksums,
    Named,
    ObjectCreator,
    ObjectInfo,
    ObjectWriter,
    RangeSource,
    Sink,
    lookup,
)
from spotstart.store.url import StorageURL, parse_url

__all__ = [
    "BodySink",
    "Checksums",
    "DirectRangeSource",
    "DirectReader",
    "DirectUnsupported",
    "HttpOptions",
    "Named",
    "ObjectCreator",
    "ObjectInfo",
    "ObjectWriter",
    "RangeRequest",
    "RangeSource",
    "Sink",
    "SinkError",
    "StorageURL",
    "lookup",
    "open_source",
    "parse_url",
]


def open_source(
    url: StorageURL,
    options: HttpOptions,
    *,
    endpoint: str | None = None,
    anonymous: bool = False,
) -> RangeSource:
    """The backend for ``url``. ``endpoint`` overrides the store's endpoint (S3-compatible
    stores, emulators)."""
    if url.scheme == "gs":
        from spotstart.store.gcs import GCSSource

        return GCSSource(url.bucket, options, endpoint=endpoint, anonymous=anonymous or None)
    if url.scheme == "s3":
        from spotstart.store.s3 import S3Source

        return S3Source(url.bucket, options, endpoint=endpoint, anonymous=anonymous)
    if url.scheme == "az":
        from spotstart.store.azure import AzureSource

        return AzureSource(url.bucket, options, endpoint=endpoint, anonymous=anonymous)
    if url.scheme in ("http", "https"):
        from spotstart.store.http import HttpSource

        return HttpSource(url.key, options)
    if url.scheme == "file":
        from spotstart.store.local import LocalSource

        return LocalSource("/")
    raise UsageError(
        f"{url}: {url.scheme}:// is not supported yet (see README, 'Not yet'); "
        "use gs://, s3://, az://, http(s)://, file://"
    )
