"""Parsing of storage URLs (gs://, s3://, az://, http(s)://, file:// and plain paths). Pure."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from spotstart.errors import UsageError

SCHEMES = ("gs", "s3", "az", "http", "https", "file")


@dataclass(frozen=True)
class StorageURL:
    """A parsed source URL. For object stores ``bucket`` is the bucket/container and ``key``
    the object name or prefix; for http(s) ``bucket`` is empty and ``key`` the full URL; for
    files ``key`` is an absolute path."""

    scheme: str
    bucket: str
    key: str

    def __str__(self) -> str:
        if self.scheme in ("http", "https"):
            return self.key
        if self.scheme == "file":
            return self.key
        return f"{self.scheme}://{self.bucket}/{self.key}"

    def child(self, key: str) -> StorageURL:
        """The URL of object ``key`` in the same bucket."""
        return StorageURL(self.scheme, self.bucket, key)


def parse_url(text: str) -> StorageURL:
    """Parse ``text`` into a :class:`StorageURL`, or raise :class:`UsageError` naming the fix.

    >>> parse_url("gs://models/llama/")
    StorageURL(scheme='gs', bucket='models', key='llama/')
    """
    if not text:
        raise UsageError(
            "empty source URL; give gs://, s3://, az://, http(s)://, file:// or a path"
        )
    if "://" not in text:
        return StorageURL("file", "", str(Path(text).expanduser().absolute()))
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise UsageError(
            f"{text}: unsupported scheme {scheme!r}; use one of "
            + ", ".join(f"{s}://" for s in SCHEMES)
        )
    if scheme in ("http", "https"):
        if not parts.netloc:
            raise UsageError(f"{text}: missing host")
        return StorageURL(scheme, "", text)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise UsageError(f"{text}: file:// URLs must be local (file:///abs/path)")
        return StorageURL("file", "", unquote(parts.path))
    bucket = parts.netloc
    if not bucket:
        raise UsageError(f"{text}: missing bucket name ({scheme}://BUCKET/PREFIX)")
    if not _valid_bucket(bucket):
        raise UsageError(f"{text}: {bucket!r} is not a valid bucket/container name")
    key = parts.path.lstrip("/")
    return StorageURL(scheme, bucket, key)


def _valid_bucket(name: str) -> bool:
    # S3/GCS/Azure all allow lowercase letters, digits, '-', '.', '_' (GCS), 3-63 chars (GCS
    # domain-named buckets may reach 222). Reject what no cloud accepts rather than guess.
    if not 3 <= len(name) <= 222:
        return False
    allowed = set("abcdefghijklmnopqrstuvwxyz0123456789-._")
    return set(name) <= allowed and name[0].isalnum() and name[-1].isalnum()
