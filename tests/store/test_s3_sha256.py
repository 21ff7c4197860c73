"""S3's ``x-amz-checksum-sha256`` read from a real moto server: the whole object's SHA-256
(a cryptographic digest that proves peer bytes), never a composite of parts."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

from spotstart.emulate.crosscheck import MotoS3
from spotstart.store import HttpOptions, ObjectInfo, open_source, parse_url
from spotstart.store.s3 import _whole_sha256
from tests.conftest import BUCKET


def _stat(key: str) -> ObjectInfo:
    async def go() -> ObjectInfo:
        source = open_source(parse_url(f"s3://{BUCKET}"), HttpOptions())
        try:
            return await source.stat(key)
        finally:
            await source.close()

    return asyncio.run(go())


def test_a_sha256_checksum_uploaded_with_the_object_is_its_whole_sha256(
    moto: MotoS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in moto.env().items():
        monkeypatch.setenv(k, v)
    data = os.urandom(100_000)
    moto.client().put_object(Bucket=BUCKET, Key="sha/x", Body=data, ChecksumAlgorithm="SHA256")
    assert _stat("sha/x").checksums.sha256 == hashlib.sha256(data).digest()
    moto.client().put_object(Bucket=BUCKET, Key="sha/plain", Body=data)
    assert _stat("sha/plain").checksums.sha256 is None


@pytest.mark.parametrize(
    ("value", "kind", "parts", "whole"),
    [
        ("47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=", None, 0, True),
        ("47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=", "FULL_OBJECT", 3, True),
        ("47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=", None, 3, False),  # ambiguous
        ("47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=-3", None, 3, False),  # composite
        ("47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=", "COMPOSITE", 0, False),
        ("AAAA", None, 0, False),  # not 32 bytes
        ("not base64!", None, 0, False),
        (None, None, 0, False),
    ],
)
def test_only_a_whole_object_sha256_counts(
    value: str | None, kind: str | None, parts: int, whole: bool
) -> None:
    assert (_whole_sha256(value, kind, parts) is not None) is whole
