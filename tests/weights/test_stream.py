"""spotstart.iter_tensors against local files and the emulated S3/GCS stores: the same tensors
as spotstart.load, tensor memory bounded by the window (measured by the stream itself), early
stop without leaks, corrupted bytes refused, the cache and peers as for load."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import threading
import time
from pathlib import Path

import pytest

from spotstart.fetch import Concurrency

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402

from spotstart import FetchConfig  # noqa: E402
from spotstart.emulate.link import FaultRule  # noqa: E402
from spotstart.emulate.storage import StorageEmulator  # noqa: E402
from spotstart.errors import IntegrityError, UsageError  # noqa: E402
from spotstart.weights.loader import load  # noqa: E402
from spotstart.weights.stream import aiter_tensors, iter_tensors  # noqa: E402
from tests.conftest import BUCKET, spawn_cli  # noqa: E402
from tests.weights.test_loader import every_dtype, same, write_sharded  # noqa: E402

MiB = 1 << 20
SMALL = FetchConfig(chunk_bytes=MiB, concurrency=Concurrency(streams=4))
TENSOR = 256 << 10  # each tensor of the "long" checkpoint


def write_long(path: Path, tensors: int = 48) -> dict[str, torch.Tensor]:
    """One file of ``tensors`` x 256 KiB (12 MiB): many windows' worth."""
    g = torch.Generator().manual_seed(7)
    ts = {f"w.{i}": torch.randn(TENSOR // 4, generator=g) for i in range(tensors)}
    save_file(ts, path)
    return ts


def wait_for(cond: object, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def spotstart_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("spotstart-")]


def test_every_dtype_from_a_file_equals_load(tmp_path: Path) -> None:
    save_file(every_dtype(), tmp_path / "m.safetensors")
    ref = load(str(tmp_path / "m.safetensors"))
    with iter_tensors(str(tmp_path / "m.safetensors"), config=SMALL) as stream:
        got = dict(stream)
    assert set(got) == set(ref)
    for name in ref:
        assert same(got[name], ref[name]), name
    assert stream.report is not None and stream.report.tensors == len(ref)


@pytest.mark.parametrize("store", ["s3", "gs"])
def test_sharded_checkpoint_from_object_storage_equals_load(
    store: str,
    clean_cloud: StorageEmulator,
    tmp_path: Path,
    s3_env: dict[str, str],
    gcs_env: dict[str, str],
) -> None:
    tensors = write_sharded(tmp_path / "ckpt")
    write_long(tmp_path / "ckpt" / "unrelated.safetensors")  # not in the index
    objects = {f"stream-{store}/{p.name}": p for p in (tmp_path / "ckpt").iterdir()}
    (clean_cloud.seed_s3 if store == "s3" else clean_cloud.seed_gcs)(BUCKET, objects)
    url = f"{store}://{BUCKET}/stream-{store}/"
    ref = load(url, config=SMALL)
    with iter_tensors(url, config=SMALL, window_bytes=MiB) as stream:
        got = dict(stream)
    assert set(got) == set(ref) == set(tensors)
    for name, t in tensors.items():
        assert same(got[name], t), name
    report = stream.report
    assert report is not None and report.files == 3
    assert report.verified == {"size": 3, "md5" if store == "s3" else "crc32c": 3}


@pytest.mark.parametrize("store", ["s3", "gs"])
def test_a_slow_consumer_holds_at_most_the_window_plus_one_tensor(
    store: str,
    clean_cloud: StorageEmulator,
    tmp_path: Path,
    s3_env: dict[str, str],
    gcs_env: dict[str, str],
) -> None:
    tensors = write_long(tmp_path / "long.safetensors")
    seed = clean_cloud.seed_s3 if store == "s3" else clean_cloud.seed_gcs
    seed(BUCKET, {f"long-{store}/model.safetensors": tmp_path / "long.safetensors"})
    window = 2 * MiB
    total = sum(t.nbytes for t in tensors.values())
    stream = iter_tensors(f"{store}://{BUCKET}/long-{store}/", config=SMALL, window_bytes=window)
    with stream:
        first = next(stream)
        # The consumer holds on: the transfer must stop at the window, not run to the end.
        inner = stream._inner._stream
        assert inner is not None
        wait_for(lambda: bool(inner.budget._queue), "the stream to wait for memory")
        assert inner.budget.held <= window + TENSOR
        assert inner.tensors < len(tensors)
        got = dict([first, *stream])
    assert set(got) == set(tensors)
    assert all(same(got[n], t) for n, t in tensors.items())
    # chunk (1 MiB) + 2 x 256 KiB < window: the bound is the window plus one tensor at most
    assert 0 < stream.bytes_held_peak <= window + TENSOR < total


def test_a_local_file_streams_within_the_window(tmp_path: Path) -> None:
    tensors = write_long(tmp_path / "long.safetensors")
    with iter_tensors(str(tmp_path / "long.safetensors"), window_bytes=MiB) as stream:
        got = dict(stream)
    assert all(same(got[n], t) for n, t in tensors.items())
    # local reads go in batches of whole tensors: one batch at most beyond an empty window
    assert stream.bytes_held_peak <= MiB + TENSOR


def test_stopping_early_leaves_no_thread_and_no_connection(
    clean_cloud: StorageEmulator, tmp_path: Path, gcs_env: dict[str, str]
) -> None:
    import os

    write_long(tmp_path / "long.safetensors")
    clean_cloud.seed_gcs(BUCKET, {"early/model.safetensors": tmp_path / "long.safetensors"})
    fds_before = len(os.listdir("/proc/self/fd"))
    stream = iter_tensors(f"gs://{BUCKET}/early/", config=SMALL, window_bytes=MiB)
    for _ in range(3):
        next(stream)
    stream.close()
    assert next(stream, None) is None
    wait_for(lambda: not spotstart_threads(), f"threads to end: {spotstart_threads()}")
    wait_for(lambda: len(os.listdir("/proc/self/fd")) <= fds_before, "sockets to close")
    assert stream.report is None  # it did not finish


def test_async_form_equals_load_and_stops_early(
    clean_cloud: StorageEmulator, tmp_path: Path, gcs_env: dict[str, str]
) -> None:
    tensors = write_long(tmp_path / "long.safetensors")
    clean_cloud.seed_gcs(BUCKET, {"async/model.safetensors": tmp_path / "long.safetensors"})
    url = f"gs://{BUCKET}/async/"

    async def all_of_it() -> dict[str, torch.Tensor]:
        async with aiter_tensors(url, config=SMALL, window_bytes=MiB) as stream:
            return {name: t async for name, t in stream}

    async def two() -> int:
        n = 0
        async with aiter_tensors(url, config=SMALL, window_bytes=MiB) as stream:
            async for _ in stream:
                n += 1
                if n == 2:
                    break
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert not others, others
        return n

    got = asyncio.run(all_of_it())
    assert all(same(got[n], t) for n, t in tensors.items())
    assert asyncio.run(two()) == 2


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_a_corrupted_object_fails_the_stream(
    scheme: str,
    clean_cloud: StorageEmulator,
    tmp_path: Path,
    s3_env: dict[str, str],
    gcs_env: dict[str, str],
) -> None:
    write_long(tmp_path / "long.safetensors")
    seed = clean_cloud.seed_s3 if scheme == "s3" else clean_cloud.seed_gcs
    seed(BUCKET, {f"flip-{scheme}/model.safetensors": tmp_path / "long.safetensors"})
    # one flipped byte in every ranged body: the object's checksum (md5 on seaweedfs,
    # crc32c on fake-gcs) cannot match; nothing can be refetched after hand-over
    clean_cloud.set_faults(
        [FaultRule(kind="corrupt", count=10_000, at_byte=100_000, ranged_only=True)]
    )
    stream = iter_tensors(f"{scheme}://{BUCKET}/flip-{scheme}/", config=SMALL, window_bytes=MiB)
    with pytest.raises(IntegrityError, match="mismatch"), stream:
        for _ in stream:
            pass
    assert stream.report is None


def test_cache_dir_gets_a_verified_copy_and_the_next_stream_reads_it(
    clean_cloud: StorageEmulator, tmp_path: Path, gcs_env: dict[str, str]
) -> None:
    tensors = write_sharded(tmp_path / "ckpt")
    objects = {f"cached/{p.name}": p for p in (tmp_path / "ckpt").iterdir()}
    clean_cloud.seed_gcs(BUCKET, objects)
    url, cache = f"gs://{BUCKET}/cached/", tmp_path / "cache"
    with iter_tensors(url, config=SMALL, cache_dir=cache) as first:
        got1 = dict(first)
    assert first.report is not None and first.report.bytes_from_cache == 0
    with iter_tensors(url, config=SMALL, cache_dir=cache) as second:
        got2 = dict(second)
    assert second.report is not None
    assert second.report.bytes_from_cache == second.report.bytes_total > 0
    assert second.report.bytes_transferred == 0
    for name, t in tensors.items():
        assert same(got1[name], t) and same(got2[name], t), name


def test_the_tensors_come_from_a_peer_and_stay_bit_identical(
    clean_cloud: StorageEmulator, tmp_path: Path, gcs_env: dict[str, str]
) -> None:
    from spotstart import fetch
    from spotstart.fetch.peers import PeerSpec

    tensors = write_sharded(tmp_path / "ckpt")
    objects = {f"stream-peer/{p.name}": p for p in (tmp_path / "ckpt").iterdir()}
    clean_cloud.seed_gcs(BUCKET, objects)
    url = f"gs://{BUCKET}/stream-peer/"
    fetch(url, tmp_path / "node-a", SMALL)
    proc = spawn_cli(["serve-peers", str(tmp_path / "node-a"), "--listen", "127.0.0.1:0", "--json"])
    try:
        assert proc.stdout is not None
        address = json.loads(proc.stdout.readline())["listen"]
        config = dataclasses.replace(SMALL, peers=PeerSpec((address,)))
        with iter_tensors(url, config=config, window_bytes=MiB) as stream:
            got = dict(stream)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)
    assert set(got) == set(tensors)
    for name, t in tensors.items():
        assert same(got[name], t), name
    report = stream.report
    assert report is not None
    shard_bytes = sum(p.stat().st_size for p in (tmp_path / "ckpt").glob("model-*.safetensors"))
    assert report.bytes_from_peers > 0.9 * shard_bytes and not report.peers_dropped
    assert report.verified.get("md5") == 3  # peer bytes proven by the origin's MD5


def test_verify_full_and_a_bad_window_are_refused(tmp_path: Path) -> None:
    save_file(every_dtype(), tmp_path / "m.safetensors")
    with pytest.raises(UsageError, match="verify='full'"):
        iter_tensors(str(tmp_path / "m.safetensors"), config=FetchConfig(verify="full"))
    with pytest.raises(UsageError, match="window_bytes"):
        iter_tensors(str(tmp_path / "m.safetensors"), window_bytes=0)
