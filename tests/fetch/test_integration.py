"""fetch against real servers: seaweedfs (S3) and fake-gcs-server (GCS) behind the link
emulator, a plain http URL, and local paths. Every result is compared by sha256."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from spotstart import FetchConfig, fetch
from spotstart.emulate.storage import StorageEmulator
from tests.conftest import BUCKET, tree_digest

MiB = 1 << 20


def model_tree(seed: int) -> dict[str, bytes]:
    def data(n: int, tag: str) -> bytes:
        block = hashlib.sha256(f"{seed}{tag}".encode()).digest() * (MiB // 32)
        return (block * (n // len(block) + 1))[:n]

    return {
        "model-00001-of-00002.safetensors": data(5 * MiB + 3, "a"),
        "model-00002-of-00002.safetensors": data(3 * MiB, "b"),
        "config.json": b'{"hidden_size": 16}',
        "tokenizer.model": data(1000, "t"),
        "sub/extra.safetensors": data(100_000, "e"),
    }


def seed(cloud: StorageEmulator, store: str, prefix: str, tree: dict[str, bytes]) -> None:
    objects = {f"{prefix}/{k}": v for k, v in tree.items()}
    if store == "s3":
        cloud.seed_s3(BUCKET, objects)
    else:
        cloud.seed_gcs(BUCKET, objects)


def digest(tree: dict[str, bytes]) -> dict[str, str]:
    return {k: hashlib.sha256(v).hexdigest() for k, v in tree.items()}


SMALL = FetchConfig(chunk_bytes=MiB)


@pytest.mark.parametrize("store", ["s3", "gs"])
def test_tree_copy_is_byte_identical(
    store: str,
    clean_cloud: StorageEmulator,
    tmp_path: Path,
    s3_env: dict[str, str],
    gcs_env: dict[str, str],
) -> None:
    tree = model_tree(1)
    seed(clean_cloud, store, f"tree-{store}", tree)
    report = fetch(f"{store}://{BUCKET}/tree-{store}/", tmp_path, SMALL)
    assert tree_digest(tmp_path) == digest(tree)
    assert report.files_fetched == len(tree)
    assert report.bytes_transferred == sum(len(v) for v in tree.values())
    assert "size" in report.verified


@pytest.mark.parametrize("store", ["s3", "gs"])
def test_globs_select_weights_and_json_only(
    store: str,
    clean_cloud: StorageEmulator,
    tmp_path: Path,
    s3_env: dict[str, str],
    gcs_env: dict[str, str],
) -> None:
    tree = model_tree(2)
    seed(clean_cloud, store, f"globs-{store}", tree)
    cfg = FetchConfig(chunk_bytes=MiB, include=("*.safetensors", "*.json"), exclude=("sub/*",))
    fetch(f"{store}://{BUCKET}/globs-{store}", tmp_path, cfg)
    want = {
        k: v
        for k, v in digest(tree).items()
        if (k.endswith((".safetensors", ".json"))) and not k.startswith("sub/")
    }
    assert tree_digest(tmp_path) == want


def test_gcs_objects_are_verified_by_crc32c(
    clean_cloud: StorageEmulator, tmp_path: Path, gcs_env: dict[str, str]
) -> None:
    seed(clean_cloud, "gs", "crc", {"w.bin": os.urandom(3 * MiB)})
    report = fetch(f"gs://{BUCKET}/crc/w.bin", tmp_path, SMALL)
    assert report.verified == {"size": 1, "crc32c": 1}


def test_s3_single_part_objects_are_verified_by_md5_etag(
    clean_cloud: StorageEmulator, tmp_path: Path, s3_env: dict[str, str]
) -> None:
    seed(clean_cloud, "s3", "md5", {"w.bin": os.urandom(3 * MiB)})
    report = fetch(f"s3://{BUCKET}/md5/w.bin", tmp_path, SMALL)
    assert report.verified == {"size": 1, "md5": 1}


@pytest.mark.parametrize("store", ["s3", "gs"])
def test_single_object_lands_under_its_base_name(
    store: str,
    clean_cloud: StorageEmulator,
    tmp_path: Path,
    s3_env: dict[str, str],
    gcs_env: dict[str, str],
) -> None:
    data = os.urandom(2 * MiB + 1)
    seed(clean_cloud, store, f"single-{store}", {"dir/model.safetensors": data})
    fetch(f"{store}://{BUCKET}/single-{store}/dir/model.safetensors", tmp_path, SMALL)
    assert (tmp_path / "model.safetensors").read_bytes() == data


def test_http_url_is_fetched_with_ranged_reads(
    clean_cloud: StorageEmulator, tmp_path: Path
) -> None:
    data = os.urandom(4 * MiB + 5)
    seed(clean_cloud, "gs", "http", {"m.safetensors": data})
    url = f"{clean_cloud.http_base}/{BUCKET}/http/m.safetensors"
    fetch(url, tmp_path, SMALL)
    assert (tmp_path / "m.safetensors").read_bytes() == data
    assert clean_cloud.stats()["requests"] >= 5  # one HEAD + several ranged GETs


@pytest.mark.parametrize("as_url", [False, True])
def test_local_directory_and_file_url(as_url: bool, tmp_path: Path) -> None:
    src = tmp_path / "src"
    tree = model_tree(3)
    for rel, data in tree.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    dest = tmp_path / "dest"
    fetch(f"file://{src}" if as_url else str(src), dest, SMALL)
    assert tree_digest(dest) == digest(tree)


@pytest.mark.parametrize("store", ["s3", "gs"])
def test_second_fetch_copies_nothing_and_a_new_version_is_fetched(
    store: str,
    clean_cloud: StorageEmulator,
    tmp_path: Path,
    s3_env: dict[str, str],
    gcs_env: dict[str, str],
) -> None:
    seed(clean_cloud, store, f"cache-{store}", {"a.bin": b"one" * 1000, "b.bin": b"two" * 10})
    url = f"{store}://{BUCKET}/cache-{store}/"
    fetch(url, tmp_path, SMALL)
    again = fetch(url, tmp_path, SMALL)
    assert again.files_cached == 2 and again.bytes_transferred == 0
    seed(clean_cloud, store, f"cache-{store}", {"a.bin": b"new" * 1000})
    third = fetch(url, tmp_path, SMALL)
    assert third.files_fetched == 1 and third.files_cached == 1
    assert (tmp_path / "a.bin").read_bytes() == b"new" * 1000


@pytest.fixture
def plain_http_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """Python's own http.server: HEAD and GET, but no Range support (always 200)."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, format: str, *args: Any) -> None:
            return None

    class Server(ThreadingHTTPServer):
        def handle_error(self, request: Any, client_address: Any) -> None:
            return None  # clients hanging up early (a refused 200) are not news

    server = Server(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_object_within_one_chunk_is_fetched_from_a_server_without_range_support(
    plain_http_server: tuple[str, Path], tmp_path: Path
) -> None:
    base, root = plain_http_server
    data = os.urandom(300_000)
    (root / "small.bin").write_bytes(data)
    fetch(f"{base}/small.bin", tmp_path / "d", SMALL)
    assert (tmp_path / "d" / "small.bin").read_bytes() == data


def test_server_that_ignores_range_is_read_as_one_stream(
    plain_http_server: tuple[str, Path], tmp_path: Path
) -> None:
    base, root = plain_http_server
    data = os.urandom(3 * MiB)
    (root / "big.bin").write_bytes(data)
    fetch(f"{base}/big.bin", tmp_path / "d", SMALL)
    assert (tmp_path / "d" / "big.bin").read_bytes() == data


ODD_NAMES = ["with space.bin", "plus+sign.bin", "ünïcödé.bin", "pct%41.bin", "eq=amp&.bin"]


@pytest.mark.parametrize("store", ["s3", "gs"])
def test_keys_with_characters_that_need_escaping_round_trip(
    store: str,
    clean_cloud: StorageEmulator,
    tmp_path: Path,
    s3_env: dict[str, str],
    gcs_env: dict[str, str],
) -> None:
    tree = {f"dir x/{name}": name.encode() * 1000 for name in ODD_NAMES}
    seed(clean_cloud, store, f"odd-{store}", tree)
    fetch(f"{store}://{BUCKET}/odd-{store}/", tmp_path / "tree", SMALL)
    assert tree_digest(tmp_path / "tree") == digest(tree)
    one = ODD_NAMES[0]
    fetch(f"{store}://{BUCKET}/odd-{store}/dir x/{one}", tmp_path / "one", SMALL)
    assert (tmp_path / "one" / one).read_bytes() == tree[f"dir x/{one}"]


def test_s3_listing_past_one_page_fetches_every_object(
    clean_cloud: StorageEmulator, tmp_path: Path, s3_env: dict[str, str]
) -> None:
    tree = {f"{i:05d}.json": str(i).encode() for i in range(1003)}  # S3 pages hold 1000 keys
    seed(clean_cloud, "s3", "many", tree)
    report = fetch(f"s3://{BUCKET}/many/", tmp_path, SMALL)
    assert report.files_fetched == len(tree)
    assert tree_digest(tmp_path) == digest(tree)
