"""Both data paths on real servers with faults on the wire: the direct reader (ranged bodies
received into a reused buffer on threads, written with O_DIRECT or through the page cache)
and the aiohttp stream (``HttpOptions(direct_reads=False)``). Same bytes, same verification,
same retries."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spotstart import Concurrency, Disk, FetchConfig, Retry, fetch
from spotstart.emulate.link import FaultRule
from spotstart.emulate.storage import StorageEmulator
from spotstart.store import HttpOptions
from tests.conftest import BUCKET

MiB = 1 << 20


def _config(direct: bool) -> FetchConfig:
    return FetchConfig(
        chunk_bytes=MiB,
        concurrency=Concurrency(streams=4),
        retry=Retry(backoff_base_s=0.01, backoff_cap_s=0.05),
        http=HttpOptions(direct_reads=direct),
    )


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "stream"])
@pytest.mark.parametrize("store", ["gs", "s3", "http"])
def test_each_path_survives_faults_and_lands_the_same_bytes(
    store: str,
    direct: bool,
    clean_cloud: StorageEmulator,
    gcs_env: dict[str, str],
    s3_env: dict[str, str],
    tmp_path: Path,
) -> None:
    data = os.urandom(5 * MiB + 123)
    clean_cloud.seed_gcs(BUCKET, {"paths/w.bin": data})
    clean_cloud.seed_s3(BUCKET, {"paths/w.bin": data})
    url = (
        f"{clean_cloud.http_base}/{BUCKET}/paths/w.bin"
        if store == "http"
        else f"{store}://{BUCKET}/paths/w.bin"
    )
    clean_cloud.set_faults(
        [
            FaultRule(kind="reset", count=1, after_bytes=100_000, ranged_only=True),
            FaultRule(kind="status", status=503, count=2, ranged_only=True, retry_after_s=0),
            FaultRule(kind="corrupt", at_byte=5000, count=1, method="GET", ranged_only=True),
            FaultRule(kind="truncate", after_bytes=300_000, count=1, ranged_only=True),
        ]
    )
    report = fetch(url, tmp_path, _config(direct))
    assert (tmp_path / "w.bin").read_bytes() == data
    assert report.retries >= 3  # a fault may land on the range probe instead (http)
    if store != "http":  # fake-gcs and seaweedfs give checksums: the corrupt chunk is found
        assert report.refetched_chunks == 1
    assert (report.chunks_direct > 0) is direct
    assert report.bytes_transferred >= len(data)


@pytest.mark.parametrize("where", ["o_direct", "page_cache", "tmpfs"])
def test_the_direct_reader_lands_the_same_bytes_wherever_they_are_written(
    where: str, clean_cloud: StorageEmulator, gcs_env: dict[str, str], tmp_path: Path
) -> None:
    # Chunks of 1 MiB + 1000 bytes: every chunk but the first starts off a 4 KiB block.
    data = os.urandom(6 * MiB + 4321)
    clean_cloud.seed_gcs(BUCKET, {"land/w.bin": data})
    dest = tmp_path
    if where == "tmpfs":
        shm = Path("/dev/shm")
        if not shm.is_dir():
            pytest.skip("no /dev/shm tmpfs on this machine")
        import tempfile

        dest = Path(tempfile.mkdtemp(prefix="spotstart-land-", dir=shm))
    config = FetchConfig(
        chunk_bytes=MiB + 1000,
        concurrency=Concurrency(streams=4),
        disk=Disk(direct_io=where != "page_cache"),
    )
    try:
        report = fetch(f"gs://{BUCKET}/land/w.bin", dest, config)
        assert (dest / "w.bin").read_bytes() == data
        assert report.chunks_direct == -(-len(data) // (MiB + 1000))
    finally:
        if where == "tmpfs":
            import shutil

            shutil.rmtree(dest)
