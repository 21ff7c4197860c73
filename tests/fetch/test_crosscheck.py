"""fetch against every implementation the run starts (seaweedfs, moto with SigV4 enforced,
s3rver, fake-gcs-server, gcp-storage-emulator, nginx over http and https): the same objects,
byte-identical results, each store's checksums verified, URLs sent exactly as signed."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from spotstart import FetchConfig, fetch
from spotstart.errors import UsageError
from spotstart.fetch import Concurrency
from tests.conftest import Store, tree_digest

MiB = 1 << 20
SMALL = FetchConfig(chunk_bytes=MiB, concurrency=Concurrency(streams=4))
# What each store vouches for (besides the size) on an object written by one plain upload.
CHECKSUM_KINDS = {
    "seaweedfs": "md5",
    "moto": "crc32",  # boto3 uploads carry a CRC-32 by default; a CRC wins over the MD5 ETag
    "s3rver": "md5",
    "fake-gcs": "crc32c",
    "gcp-storage-emulator": "crc32c",
    "nginx": None,
    "nginx-tls": None,
}
NAMES = ["a.bin", "sub dir/b+c.bin", "ünï/%41=&.bin", "deep/er/x.safetensors"]


def blobs(tag: str) -> dict[str, bytes]:
    out = {}
    for i, name in enumerate(NAMES):
        seed = hashlib.sha256(f"{tag}{i}".encode()).digest()
        out[name] = (seed * ((2 * MiB + 17 * i) // 32 + 1))[: 2 * MiB + 17 * i]
    return out


def digest(tree: dict[str, bytes]) -> dict[str, str]:
    return {k: hashlib.sha256(v).hexdigest() for k, v in tree.items()}


def test_every_store_gives_byte_identical_objects_verified_by_its_checksums(
    store: Store, tmp_path: Path
) -> None:
    tree = blobs(store.name)
    prefix = f"cross-{store.name}"
    store.seed({f"{prefix}/{k}": v for k, v in tree.items()})
    if store.scheme in ("s3", "gs"):
        report = fetch(store.url(prefix + "/"), tmp_path, SMALL)
        assert tree_digest(tmp_path) == digest(tree)
        verified = report.verified
    else:  # http(s): one URL per object; the local name is the URL's last segment
        verified = {}
        for name, data in tree.items():
            from urllib.parse import quote

            out = tmp_path / hashlib.sha1(name.encode()).hexdigest()
            report = fetch(store.url(quote(f"{prefix}/{name}")), out, SMALL)
            (got,) = [p for p in out.iterdir() if p.is_file()]
            assert got.read_bytes() == data
            for kind, n in report.verified.items():
                verified[kind] = verified.get(kind, 0) + n
    assert verified["size"] == len(tree)
    kind = CHECKSUM_KINDS[store.name]
    if kind is None:
        assert set(verified) == {"size"}
    else:
        assert verified.get(kind) == len(tree), verified


@pytest.mark.parametrize("store", ["moto", "s3rver", "seaweedfs"], indirect=True)
def test_s3_listing_whose_query_needs_escaping_is_signed_as_sent(
    store: Store, tmp_path: Path
) -> None:
    # prefix= carries '/', ' ' and '+': %2F, %20 and %2B in the signed query string; an HTTP
    # library that re-encodes the URL after signing breaks the signature on servers that
    # check it (moto, s3rver).
    tree = {f"q x+{store.name}/dir/{n}": n.encode() * 100 for n in ("a", "b")}
    store.seed(tree)
    fetch(store.url(f"q x+{store.name}/dir/"), tmp_path, SMALL)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["a", "b"]


@pytest.mark.parametrize("store", ["moto"], indirect=True)
def test_a_key_with_dot_segments_is_asked_for_as_it_is_named(store: Store, tmp_path: Path) -> None:
    # "d/./x.bin" and "d/x.bin" are two objects; a client that collapses dot segments
    # downloads the second when asked for the first. (moto keeps keys as given; the servers
    # that store objects as files collapse such names themselves, so they cannot hold both.)
    p = f"dots-{store.name}"
    store.seed({f"{p}/d/./x.bin": b"dotted" * 1000, f"{p}/d/x.bin": b"plain" * 1000})
    fetch(store.url(f"{p}/d/./x.bin"), tmp_path / "one", SMALL)
    assert (tmp_path / "one" / "x.bin").read_bytes() == b"dotted" * 1000
    with pytest.raises(UsageError, match="lands on the same path"):
        fetch(store.url(f"{p}/"), tmp_path / "tree", SMALL)
    assert not (tmp_path / "tree").exists() or not any((tmp_path / "tree").rglob("*.bin"))


def test_objects_bigger_than_one_read_come_through_nginx_in_ranges(
    nginx: object, tmp_path: Path
) -> None:
    from spotstart.emulate.crosscheck import Nginx

    assert isinstance(nginx, Nginx)
    data = os.urandom(5 * MiB + 3)
    nginx.seed({"ranged/w.bin": data})
    report = fetch(f"{nginx.endpoint}/ranged/w.bin", tmp_path, SMALL)
    assert (tmp_path / "w.bin").read_bytes() == data
    assert report.chunk_bytes == MiB  # planned as ranges: nginx honours Range and If-Range
