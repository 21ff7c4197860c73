"""The emulated cloud end to end: real SeaweedFS and fake-gcs-server behind the link."""

from __future__ import annotations

import http.client
import json
import os
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from spotstart.emulate.link import FaultRule, LinkConfig
from spotstart.emulate.storage import (
    StorageEmulator,
    StorageEmulatorOptions,
    s3_signed_headers,
    wait_for_exit,
)

BUCKET = "spotstart-test"
DATA = os.urandom(3 * 1024 * 1024 + 17)


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StorageEmulator]:
    options = StorageEmulatorOptions(
        data_dir=tmp_path_factory.mktemp("cloud"),
        link=LinkConfig(per_conn_bytes_per_s=None, first_byte_latency_s=0.001),
        buckets=(BUCKET,),
    )
    with StorageEmulator(options) as emulator:
        yield emulator


@pytest.fixture(autouse=True)
def _clean_link(cloud: StorageEmulator) -> None:
    cloud.clear_faults()
    cloud.reset_stats()


def fetch(
    url: str, headers: dict[str, str] | None = None, method: str = "GET", body: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
    try:
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        conn.request(method, target, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def s3_get(cloud: StorageEmulator, key: str, byte_range: str | None = None) -> tuple[int, bytes]:
    url = f"{cloud.s3.endpoint}/{BUCKET}/{key}"
    headers = {"Range": byte_range} if byte_range else {}
    status, _, body = fetch(url, s3_signed_headers("GET", url, headers))
    return status, body


def test_s3_ranged_get_through_the_link_returns_the_seeded_bytes(
    cloud: StorageEmulator, tmp_path: Path
) -> None:
    source = tmp_path / "blob.bin"
    source.write_bytes(DATA)
    cloud.seed_s3(BUCKET, {"dir/from-file.bin": source, "from-bytes.bin": b"hello s3"})
    assert s3_get(cloud, "from-bytes.bin") == (200, b"hello s3")
    status, body = s3_get(cloud, "dir/from-file.bin", "bytes=1000-1048575")
    assert status == 206
    assert body == DATA[1000:1048576]
    stats = cloud.stats()
    assert stats["body_bytes_down"] == len(b"hello s3") + len(body)
    assert stats["requests"] == 2


def test_s3_unsigned_get_is_refused(cloud: StorageEmulator) -> None:
    cloud.seed_s3(BUCKET, {"private.bin": b"x"})
    url = f"{cloud.s3.endpoint}/{BUCKET}/private.bin"
    assert fetch(url)[0] == 403
    wrong = s3_signed_headers("GET", url, access_key_id="intruder", secret_access_key="nope")
    assert fetch(url, wrong)[0] == 403


def test_gcs_ranged_get_through_the_link_returns_the_seeded_bytes(cloud: StorageEmulator) -> None:
    cloud.seed_gcs(BUCKET, {"models/m.bin": DATA})
    name = urllib.parse.quote("models/m.bin", safe="")
    url = f"{cloud.gcs.endpoint}/storage/v1/b/{BUCKET}/o/{name}?alt=media"
    status, headers, body = fetch(url, {"Range": "bytes=5-1000004"})
    assert status == 206
    assert body == DATA[5:1000005]
    assert "crc32c=" in headers.get("X-Goog-Hash", "")
    # the anonymous public path is the plain http(s):// source
    status, _, body = fetch(f"{cloud.http_base}/{BUCKET}/models/m.bin", {"Range": "bytes=0-9"})
    assert (status, body) == (206, DATA[:10])
    assert cloud.stats()["body_bytes_down"] == 1000000 + 10


def test_gcs_reload_picks_up_files_written_to_the_preload_dir(cloud: StorageEmulator) -> None:
    target = cloud.gcs.preload_dir / BUCKET / "preloaded" / "p.bin"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"preloaded bytes")
    endpoint_before = cloud.gcs.endpoint
    cloud.reload_gcs()
    status, _, body = fetch(f"{endpoint_before}/{BUCKET}/preloaded/p.bin")
    assert (status, body) == (200, b"preloaded bytes")


def test_faults_set_through_the_handle_hit_gcs_and_s3(cloud: StorageEmulator) -> None:
    cloud.seed_gcs(BUCKET, {"f.bin": b"0123456789"})
    cloud.seed_s3(BUCKET, {"f.bin": b"0123456789"})
    cloud.set_faults([FaultRule(kind="status", status=429, path_regex=r"f\.bin", count=2)])
    status, _, body = fetch(f"{cloud.http_base}/{BUCKET}/f.bin")
    assert status == 429
    assert json.loads(body)["error"]["code"] == 429
    assert s3_get(cloud, "f.bin")[0] == 429
    assert s3_get(cloud, "f.bin") == (200, b"0123456789")
    assert cloud.stats()["faults_fired"]["status"] == 2


def test_set_link_changes_the_running_link(cloud: StorageEmulator) -> None:
    new = LinkConfig(per_conn_bytes_per_s=80e6, first_byte_latency_s=0, aggregate_bytes_per_s=1e9)
    cloud.set_link(new)
    try:
        _, _, body = fetch(cloud.admin + "/link")
        assert LinkConfig.from_dict(json.loads(body)) == new
        status, _, body = fetch(
            cloud.admin + "/link", method="PUT", body=b'{"first_byte_latency_s": 0.5}'
        )
        assert status == 200
        assert json.loads(body) == {**new.to_dict(), "first_byte_latency_s": 0.5}
        assert fetch(cloud.admin + "/link", method="PUT", body=b'{"bogus": 1}')[0] == 400
    finally:
        cloud.set_link(LinkConfig(per_conn_bytes_per_s=None, first_byte_latency_s=0.001))


def test_env_for_tools_points_at_the_link(cloud: StorageEmulator) -> None:
    assert cloud.env_for_s3()["AWS_ENDPOINT_URL"] == cloud.s3.endpoint
    assert cloud.env_for_gcs()["STORAGE_EMULATOR_HOST"] == cloud.gcs.endpoint
    assert cloud.gcs.https_endpoint.startswith("https://127.0.0.1:")


def _server_pids(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline and (b"weed" in cmdline or b"fake-gcs" in cmdline):
                pids.append(int(entry.name))
    return pids


def test_exit_leaves_no_server_processes(tmp_path: Path) -> None:
    options = StorageEmulatorOptions(data_dir=tmp_path / "short-lived", buckets=("teardown",))
    with StorageEmulator(options) as emulator:
        pids = _server_pids(str(tmp_path))
        assert len(pids) == 2
        emulator_pid = emulator.pid
    assert wait_for_exit(emulator_pid, 10)
    assert all(wait_for_exit(pid, 10) for pid in pids)


def test_ready_line_has_the_documented_shape(cloud: StorageEmulator) -> None:
    info = cloud.info
    assert set(info["s3"]) >= {"endpoint", "direct", "region", "access_key_id", "secret_access_key"}
    assert set(info["gcs"]) >= {"endpoint", "direct", "https_endpoint", "https_direct"}
    assert info["http_base"] == info["gcs"]["endpoint"]
    assert {"admin", "link", "data_dir"} <= set(info)
    assert info["s3"]["endpoint"] != info["s3"]["direct"]


@pytest.mark.slow
def test_large_gcs_objects_are_seeded_through_the_preload_dir(
    cloud: StorageEmulator, tmp_path: Path
) -> None:
    from spotstart.emulate.storage import GCS_API_UPLOAD_MAX_BYTES

    big = tmp_path / "big.bin"
    tail = os.urandom(4096)
    with open(big, "wb") as f:
        f.truncate(GCS_API_UPLOAD_MAX_BYTES)
        f.seek(GCS_API_UPLOAD_MAX_BYTES)
        f.write(tail)
    cloud.seed_gcs(BUCKET, {"big/big.bin": big})
    assert (cloud.gcs.preload_dir / BUCKET / "big" / "big.bin").stat().st_size == big.stat().st_size
    start = GCS_API_UPLOAD_MAX_BYTES
    status, _, body = fetch(
        f"{cloud.http_base}/{BUCKET}/big/big.bin", {"Range": f"bytes={start}-{start + 4095}"}
    )
    assert (status, body) == (206, tail)
