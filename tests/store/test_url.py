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


@pytest.mark.parametrize(
    "header",
    ["", "unknown=abc", "crc32c=", "md5=", " , ,"],
)
def test_goog_hash_without_usable_hashes_gives_no_checksums(header: str) -> None:
    assert Checksums.from_goog_hash(header) == Checksums()


def test_goog_hash_order_and_spacing_do_not_matter() -> None:
    data = b"x" * 1000
    crc = base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()
    md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
    sums = Checksums.from_goog_hash(f"md5={md5}, crc32c={crc}")
    assert (sums.crc32c, sums.md5) == (google_crc32c.value(data), hashlib.md5(data).digest())


@pytest.mark.parametrize(
    ("text", "display"),
    [("gs://models/llama/", "gs://models/llama/"), ("s3://bkt/k", "s3://bkt/k")],
)
def test_urls_print_as_the_user_wrote_them(text: str, display: str) -> None:
    assert str(parse_url(text)) == display
