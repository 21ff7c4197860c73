"""S3 multipart objects: composite CRC-32C (x-amz-checksum-type COMPOSITE) and "<md5>-N" ETags are
verified part by part, on moto (which keeps multipart uploads as S3 does), fetch and load alike,
also through a link that flips a byte."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import google_crc32c
import pytest

from spotstart import FetchConfig, fetch
from spotstart.emulate.crosscheck import MotoS3
from spotstart.emulate.link import FaultRule, LinkConfig
from spotstart.emulate.proxy import LinkEmulator
from spotstart.errors import IntegrityError
from spotstart.fetch import Concurrency, Retry
from spotstart.fetch.verify import ALGORITHMS
from spotstart.store.s3 import _checksums
from tests.conftest import BUCKET

MiB = 1 << 20
CFG = FetchConfig(
    chunk_bytes=3 * MiB, concurrency=Concurrency(streams=4), retry=Retry(backoff_base_s=0.01)
)


def b64crc(data: bytes) -> str:
    return base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()


def upload_multipart(moto: MotoS3, key: str, parts: list[bytes], *, crc: bool) -> None:
    client = moto.client()
    extra = {"ChecksumAlgorithm": "CRC32C"} if crc else {}
    up = client.create_multipart_upload(Bucket=BUCKET, Key=key, **extra)
    done = []
    for n, body in enumerate(parts, 1):
        kw = {"ChecksumCRC32C": b64crc(body)} if crc else {}
        r = client.upload_part(
            Bucket=BUCKET, Key=key, UploadId=up["UploadId"], PartNumber=n, Body=body, **kw
        )
        done.append({"PartNumber": n, "ETag": r["ETag"], **kw})
    client.complete_multipart_upload(
        Bucket=BUCKET, Key=key, UploadId=up["UploadId"], MultipartUpload={"Parts": done}
    )


@pytest.fixture
def moto_link(moto: MotoS3, monkeypatch: pytest.MonkeyPatch) -> Iterator[LinkEmulator]:
    """moto behind a link emulator (fault injection); the S3 endpoint points at the proxy."""
    with LinkEmulator(LinkConfig(per_conn_bytes_per_s=None, first_byte_latency_s=0.0)) as link:
        proxy = link.open_proxy(("127.0.0.1", moto.port), http=True, flavor="s3")
        for key, value in moto.env().items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{proxy.port}")
        yield link


# Parts of unequal sizes (S3 allows any size >= 5 MiB but the last) and a chunk size that does
# not divide them: chunks must be cut at the part boundaries.
PARTS = [5 * MiB + 1, 6 * MiB, 123_457]


def part_bodies(tag: str) -> list[bytes]:
    return [
        hashlib.sha256(f"{tag}{i}".encode()).digest() * (n // 32) + b"x" * (n % 32)
        for i, n in enumerate(PARTS)
    ]


def test_composite_crc32c_of_a_multipart_object_is_verified_per_part(
    moto: MotoS3, moto_link: LinkEmulator, tmp_path: Path
) -> None:
    parts = part_bodies("composite")
    upload_multipart(moto, "mp/crc.bin", parts, crc=True)
    report = fetch(f"s3://{BUCKET}/mp/crc.bin", tmp_path, CFG)
    assert (tmp_path / "crc.bin").read_bytes() == b"".join(parts)
    assert report.verified == {"size": 1, "crc32c-composite": 1}
    assert report.refetched_chunks == 0


def test_multipart_etag_is_verified_as_the_md5_of_the_parts_md5s(
    moto: MotoS3, moto_link: LinkEmulator, tmp_path: Path
) -> None:
    parts = part_bodies("etag")
    upload_multipart(moto, "mp/etag.bin", parts, crc=False)
    report = fetch(f"s3://{BUCKET}/mp/etag.bin", tmp_path, CFG)
    assert (tmp_path / "etag.bin").read_bytes() == b"".join(parts)
    assert report.verified == {"size": 1, "md5-of-parts": 1}


@pytest.mark.parametrize("crc", [True, False])
def test_a_flipped_byte_in_a_multipart_object_is_refetched_then_fails_loudly(
    crc: bool, moto: MotoS3, moto_link: LinkEmulator, tmp_path: Path
) -> None:
    parts = part_bodies(f"flip{crc}")
    key = f"mp/flip-{crc}.bin"
    upload_multipart(moto, key, parts, crc=crc)
    corrupt = FaultRule(kind="corrupt", at_byte=1000, method="GET", ranged_only=True)
    moto_link.set_faults([corrupt])
    report = fetch(f"s3://{BUCKET}/{key}", tmp_path / "once", CFG)
    assert (tmp_path / "once" / f"flip-{crc}.bin").read_bytes() == b"".join(parts)
    assert report.refetched_chunks == 1
    moto_link.set_faults([FaultRule(**{**corrupt.to_dict(), "count": 1000})])
    with pytest.raises(IntegrityError, match="mismatch"):
        fetch(f"s3://{BUCKET}/{key}", tmp_path / "always", CFG)
    assert not any(
        p.is_file() for p in (tmp_path / "always").rglob("*") if ".spotstart" not in p.parts
    )


@pytest.mark.parametrize(
    ("etag", "crc", "ctype", "scope", "n_parts"),
    [
        ('"' + "a" * 32 + '"', "AAAAAQ==", None, "object", 0),
        ('"' + "a" * 32 + '"', "AAAAAQ==", "FULL_OBJECT", "object", 0),
        ('"' + "a" * 32 + '-3"', "AAAAAQ==-3", "COMPOSITE", "parts", 3),  # AWS
        ('"' + "a" * 32 + '-3"', "AAAAAQ==", "COMPOSITE", "parts", 3),
        ('"' + "a" * 32 + '-3"', "AAAAAQ==", "FULL_OBJECT", "object", 3),  # CRC64NVME-style
        ('"' + "a" * 32 + '-3"', "AAAAAQ==", None, "either", 3),  # moto, older servers
    ],
)
def test_s3_checksum_headers_say_what_the_crc_covers(
    etag: str, crc: str, ctype: str | None, scope: str, n_parts: int
) -> None:
    sums, n = _checksums(etag, crc, ctype)
    assert sums.crc32c == 1 and sums.crc_scope == scope and n == n_parts
    assert (sums.md5 is None) == bool(n_parts)
    assert (sums.md5_of_parts is not None) == bool(n_parts)


def test_an_encrypted_objects_etag_is_not_taken_for_an_md5() -> None:
    sums, _ = _checksums('"' + "b" * 32 + '"', None, None, encrypted=True)
    assert sums.md5 is None and sums.crc32c is None


def test_random_bytes_are_not_a_crc() -> None:
    sums, _ = _checksums('"x"', base64.b64encode(os.urandom(8)).decode(), None)
    assert sums.crc32c is None


@pytest.mark.parametrize(("crc", "kind"), [(True, "crc32c-composite"), (False, "md5-of-parts")])
def test_load_verifies_multipart_shards_as_fetch_does(
    crc: bool, kind: str, moto: MotoS3, moto_link: LinkEmulator, tmp_path: Path
) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save

    from spotstart.weights.loader import load_async

    g = torch.Generator().manual_seed(3)
    tensors = {f"w{i}": torch.randn(1024, 1100, generator=g) for i in range(3)}  # ~13 MB
    blob = save(tensors)
    cut = [5 * MiB + 7, 5 * MiB + 7]
    parts = [blob[: cut[0]], blob[cut[0] : cut[0] + cut[1]], blob[cut[0] + cut[1] :]]
    upload_multipart(moto, f"mpload-{crc}/model.safetensors", parts, crc=crc)
    url = f"s3://{BUCKET}/mpload-{crc}/"
    got, report = asyncio.run(load_async(url, config=CFG))
    assert all(torch.equal(got[n], t) for n, t in tensors.items())
    assert report.verified == {"size": 1, kind: 1}
    # and a flipped byte on the load path is caught the same way
    moto_link.set_faults([FaultRule(kind="corrupt", count=1000, at_byte=4096, ranged_only=True)])
    with pytest.raises(IntegrityError, match="mismatch"):
        asyncio.run(load_async(url, config=CFG))


def test_a_503_while_asking_part_sizes_is_retried_not_taken_for_no_parts(
    moto: MotoS3, moto_link: LinkEmulator, tmp_path: Path
) -> None:
    parts = part_bodies("part503")
    upload_multipart(moto, "mp/part503.bin", parts, crc=True)
    moto_link.set_faults(
        [FaultRule(kind="status", status=503, count=2, method="HEAD", path_regex="partNumber=")]
    )
    report = fetch(f"s3://{BUCKET}/mp/part503.bin", tmp_path, CFG)
    assert report.verified == {"size": 1, "crc32c-composite": 1}  # not degraded to size
    assert report.retries >= 1


def _crc_b64(algorithm: str, data: bytes) -> str:
    algo = ALGORITHMS[algorithm.lower()]
    return base64.b64encode(algo.update(data, 0).to_bytes(algo.width_bytes, "big")).decode()


def upload_with(moto: MotoS3, key: str, parts: list[bytes], algorithm: str) -> None:
    """An upload whose checksum the uploader chose (the AWS SDKs' default is CRC64NVME)."""
    client = moto.client()
    field = f"Checksum{algorithm}"
    if len(parts) == 1:
        client.put_object(
            Bucket=BUCKET,
            Key=key,
            Body=parts[0],
            ChecksumAlgorithm=algorithm,
            **{field: _crc_b64(algorithm, parts[0])},
        )
        return
    extra = {"ChecksumType": "FULL_OBJECT"} if algorithm == "CRC64NVME" else {}
    up = client.create_multipart_upload(
        Bucket=BUCKET, Key=key, ChecksumAlgorithm=algorithm, **extra
    )
    done = []
    for n, body in enumerate(parts, 1):
        kw = {field: _crc_b64(algorithm, body)}
        r = client.upload_part(
            Bucket=BUCKET, Key=key, UploadId=up["UploadId"], PartNumber=n, Body=body, **kw
        )
        done.append({"PartNumber": n, "ETag": r["ETag"], **kw})
    client.complete_multipart_upload(
        Bucket=BUCKET, Key=key, UploadId=up["UploadId"], MultipartUpload={"Parts": done}
    )


@pytest.mark.parametrize(
    ("algorithm", "multipart", "kind"),
    [
        ("CRC64NVME", False, "crc64nvme"),
        ("CRC64NVME", True, "crc64nvme"),  # FULL_OBJECT: the only type S3 allows for it
        ("CRC32", False, "crc32"),
        ("CRC32", True, "crc32-composite"),
    ],
)
def test_s3_crc64nvme_and_crc32_objects_are_verified_by_their_own_crc(
    algorithm: str,
    multipart: bool,
    kind: str,
    moto: MotoS3,
    moto_link: LinkEmulator,
    tmp_path: Path,
) -> None:
    parts = part_bodies(f"{algorithm}{multipart}")
    parts = parts if multipart else [b"".join(parts)]
    key = f"crc/{algorithm}-{multipart}.bin"
    upload_with(moto, key, parts, algorithm)
    report = fetch(f"s3://{BUCKET}/{key}", tmp_path / "ok", CFG)
    assert (tmp_path / "ok" / key.rsplit("/", 1)[1]).read_bytes() == b"".join(parts)
    assert report.verified == {"size": 1, kind: 1}
    # a byte flipped on the wire: found by that CRC, the bad chunk fetched again
    moto_link.set_faults([FaultRule(kind="corrupt", at_byte=1000, method="GET", ranged_only=True)])
    again = fetch(f"s3://{BUCKET}/{key}", tmp_path / "flip", CFG)
    assert (tmp_path / "flip" / key.rsplit("/", 1)[1]).read_bytes() == b"".join(parts)
    assert again.refetched_chunks == 1 and again.verified == {"size": 1, kind: 1}


def test_a_crc64nvme_header_of_the_wrong_width_is_no_checksum() -> None:
    # moto without the CRT library labels a 4-byte CRC-32 as CRC64NVME
    sums, _ = _checksums('"x"', "AAAAAQ==", "FULL_OBJECT", algorithm="crc64nvme")
    assert sums.crc is None
    sums, _ = _checksums(
        '"x"', base64.b64encode(bytes(7) + b"\x05").decode(), None, algorithm="crc64nvme"
    )
    assert sums.crc == ("crc64nvme", 5) and sums.crc_scope == "object"
