"""URL parsing and the GCS hash header."""

from __future__ import annotations

import base64
import hashlib

import google_crc32c
import pytest

from spotstart.errors import UsageError
from spotstart.store import Checksums, parse_url


@pytest.mark.parametrize(
    ("text", "scheme", "bucket", "key"),
    [
        ("gs://models/llama/", "gs", "models", "llama/"),
        ("s3://my.bucket-1/a/b.safetensors", "s3", "my.bucket-1", "a/b.safetensors"),
        ("az://container/p", "az", "container", "p"),
        ("gs://models", "gs", "models", ""),
        ("file:///tmp/x", "file", "", "/tmp/x"),
        (
            "https://h.example/m.safetensors?sig=1",
            "https",
            "",
            "https://h.example/m.safetensors?sig=1",
        ),
    ],
)
def test_urls_parse_into_scheme_bucket_and_key(
    text: str, scheme: str, bucket: str, key: str
) -> None:
    u = parse_url(text)
    assert (u.scheme, u.bucket, u.key) == (scheme, bucket, key)


def test_plain_paths_are_local_files() -> None:
    u = parse_url("relative/dir")
    assert u.scheme == "file" and u.key.endswith("/relative/dir") and u.key.startswith("/")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "empty"),
        ("ftp://x/y", "unsupported scheme"),
        ("gs:///x", "missing bucket"),
        ("s3://UPPER/x", "not a valid bucket"),
        ("http:///x", "missing host"),
        ("file://remote/x", "must be local"),
    ],
)
def test_bad_urls_name_the_problem(text: str, needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        parse_url(text)


def test_goog_hash_header_gives_crc32c_and_md5() -> None:
    data = b"spotstart"
    crc = base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()
    md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
    sums = Checksums.from_goog_hash(f"crc32c={crc},md5={md5}")
    assert sums.crc32c == google_crc32c.value(data)
    assert sums.md5 == hashlib.md5(data).digest()
    assert sums.kinds == ("crc32c", "md5")
    assert Checksums.from_goog_hash("crc32c=" + crc).md5 is None
