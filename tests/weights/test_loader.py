"""spotstart.load against local files and the real S3/GCS servers: tensors bit-identical to
safetensors.torch.load_file, sharded checkpoints, load_into, the cache, malformed input."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from spotstart.fetch import Concurrency

torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file  # noqa: E402

from spotstart import FetchConfig  # noqa: E402
from spotstart.emulate.storage import StorageEmulator  # noqa: E402
from spotstart.errors import InvalidCheckpoint, UsageError  # noqa: E402
from spotstart.weights.loader import load, load_async, load_into  # noqa: E402
from tests.conftest import BUCKET, error_line, run_cli  # noqa: E402

SMALL = FetchConfig(chunk_bytes=1 << 20, concurrency=Concurrency(streams=4))


def every_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ts = {
        "f32": torch.randn(33, 17, generator=g),
        "f16": torch.randn(64, 3, generator=g).half(),
        "bf16": torch.randn(1000, 700, generator=g).to(torch.bfloat16),
        "f64": torch.randn(9, generator=g, dtype=torch.float64),
        "f8e4m3": torch.randn(256, 300, generator=g).to(torch.float8_e4m3fn),
        "f8e5m2": torch.randn(77, generator=g).to(torch.float8_e5m2),
        "bool": torch.rand(13, generator=g) > 0.5,
        "u8": torch.randint(0, 255, (31,), dtype=torch.uint8, generator=g),
        "i8": torch.randint(-128, 127, (5, 5), dtype=torch.int8, generator=g),
        "i16": torch.randint(-999, 999, (7,), dtype=torch.int16, generator=g),
        "i32": torch.randint(-999, 999, (7, 2), dtype=torch.int32, generator=g),
        "i64": torch.arange(11, dtype=torch.int64),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }
    return ts


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical: same dtype, shape and bytes (NaNs included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool(
        torch.equal(
            a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)
        )
    )


def write_sharded(root: Path, shards: int = 3) -> dict[str, torch.Tensor]:
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    all_tensors: dict[str, torch.Tensor] = {}
    weight_map = {}
    for s in range(shards):
        ts = {
            f"layers.{s}.{i}.weight": torch.randn(256, 64, generator=g).to(torch.bfloat16)
            for i in range(4)
        }
        ts[f"layers.{s}.norm"] = torch.randn(64, generator=g)
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(ts, root / name)
        all_tensors.update(ts)
        weight_map.update(dict.fromkeys(ts, name))
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    (root / "config.json").write_text("{}")
    return all_tensors


def test_every_dtype_is_bit_identical_to_safetensors(tmp_path: Path) -> None:
    save_file(every_dtype(), tmp_path / "m.safetensors")
    ref = load_file(tmp_path / "m.safetensors")
    got = load(str(tmp_path / "m.safetensors"), config=SMALL)
    assert set(got) == set(ref)
    for name in ref:
        assert same(got[name], ref[name]), name


@pytest.mark.parametrize("store", ["s3", "gs"])
def test_sharded_checkpoint_from_object_storage(
    store: str,
    clean_cloud: StorageEmulator,
    tmp_path: Path,
    s3_env: dict[str, str],
    gcs_env: dict[str, str],
) -> None:
    tensors = write_sharded(tmp_path / "ckpt")
    save_file(every_dtype(), tmp_path / "ckpt" / "unrelated.safetensors")  # not in the index
    objects = {f"load-{store}/{p.name}": p for p in (tmp_path / "ckpt").iterdir()}
    (clean_cloud.seed_s3 if store == "s3" else clean_cloud.seed_gcs)(BUCKET, objects)
    got = load(f"{store}://{BUCKET}/load-{store}/", config=SMALL)
    assert set(got) == set(tensors)
    for name, t in tensors.items():
        assert same(got[name], t), name


def test_a_prefix_without_index_loads_every_safetensors_file(
    clean_cloud: StorageEmulator, tmp_path: Path, gcs_env: dict[str, str]
) -> None:
    save_file(every_dtype(), tmp_path / "model.safetensors")
    clean_cloud.seed_gcs(BUCKET, {"noindex/model.safetensors": tmp_path / "model.safetensors"})
    got = load(f"gs://{BUCKET}/noindex", config=SMALL)
    assert set(got) == set(every_dtype())


def test_dtype_cast_applies_to_floating_tensors_only(tmp_path: Path) -> None:
    save_file(every_dtype(), tmp_path / "m.safetensors")
    got = load(str(tmp_path / "m.safetensors"), dtype=torch.float32)
    assert got["bf16"].dtype == torch.float32 and got["i64"].dtype == torch.int64
    assert torch.equal(got["bf16"], every_dtype()["bf16"].float())


def test_load_into_fills_a_meta_module_without_a_second_copy(
    clean_cloud: StorageEmulator, tmp_path: Path, gcs_env: dict[str, str]
) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 8))
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    clean_cloud.seed_gcs(BUCKET, {"into/model.safetensors": tmp_path / "model.safetensors"})
    with torch.device("meta"):
        empty = torch.nn.Sequential(
            torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 8)
        )
    tensors, _ = __import__("asyncio").run(
        load_async(f"gs://{BUCKET}/into/model.safetensors", config=SMALL)
    )
    storages = {t.untyped_storage().data_ptr() for t in tensors.values()}
    report = load_into(empty, f"gs://{BUCKET}/into/model.safetensors", config=SMALL)
    assert report.tensors == 4
    x = torch.randn(3, 64)
    assert torch.equal(empty(x), model(x))
    # The parameters are views into the loaded buffer: one storage, no copies.
    ptrs = {p.untyped_storage().data_ptr() for p in empty.parameters()}
    assert len(ptrs) == 1 and len(storages) == 1


def test_load_into_a_mismatched_module_is_a_clear_error(tmp_path: Path) -> None:
    save_file({"weight": torch.zeros(2, 2)}, tmp_path / "m.safetensors")
    with pytest.raises(InvalidCheckpoint, match="does not fit the module"):
        load_into(torch.nn.Linear(3, 3), str(tmp_path / "m.safetensors"))


def test_cache_dir_gets_a_verified_copy_and_the_next_load_reads_it(
    clean_cloud: StorageEmulator, tmp_path: Path, gcs_env: dict[str, str]
) -> None:
    write_sharded(tmp_path / "ckpt", shards=2)
    objects = {f"cached/{p.name}": p for p in (tmp_path / "ckpt").iterdir()}
    clean_cloud.seed_gcs(BUCKET, objects)
    cache = tmp_path / "nvme"
    url = f"gs://{BUCKET}/cached/"
    first, r1 = __import__("asyncio").run(load_async(url, cache_dir=cache, config=SMALL))
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        assert (cache / name).read_bytes() == (tmp_path / "ckpt" / name).read_bytes()
    assert r1.bytes_from_cache == 0 and r1.bytes_transferred > 0
    second, r2 = __import__("asyncio").run(load_async(url, cache_dir=cache, config=SMALL))
    assert r2.bytes_transferred == 0 and r2.bytes_from_cache == r1.bytes_total
    for name in first:
        assert same(first[name], second[name])


def test_cuda_without_a_gpu_is_refused_clearly(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal path does not apply")
    save_file({"w": torch.zeros(2)}, tmp_path / "m.safetensors")
    with pytest.raises(UsageError, match="CUDA is not available"):
        load(str(tmp_path / "m.safetensors"), device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_cuda_load_is_bit_identical(tmp_path: Path) -> None:
    save_file(every_dtype(), tmp_path / "m.safetensors")
    ref = load_file(tmp_path / "m.safetensors")
    got = load(str(tmp_path / "m.safetensors"), device="cuda")
    for name in ref:
        assert got[name].is_cuda and same(got[name].cpu(), ref[name])


def _raw_file(path: Path, header: bytes, data: bytes) -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


@pytest.mark.parametrize(
    ("header", "data", "needle"),
    [
        (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', b"\0" * 4, "truncated"),
        (b"{not json", b"", "JSON"),
        (b'{"a":{"dtype":"Q7","shape":[1],"data_offsets":[0,1]}}', b"\0", "Q7"),
        (b'{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}', b"\0" * 8, "shape"),
        # zero elements, but a dimension no int64 holds (torch overflowed: exit 1)
        (
            b'{"a":{"dtype":"F32","shape":[0,9223372036854775808],"data_offsets":[0,0]}}',
            b"",
            "overflows",
        ),
        (
            b'{"a":{"dtype":"U8","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}}',
            b"",
            "overflows",
        ),
    ],
)
def test_malformed_files_are_refused_not_half_loaded(
    tmp_path: Path, header: bytes, data: bytes, needle: str
) -> None:
    _raw_file(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(InvalidCheckpoint, match=needle):
        load(str(tmp_path / "bad.safetensors"))


def test_cli_exits_10_with_one_line_on_a_shape_that_overflows(tmp_path: Path) -> None:
    header = b'{"a":{"dtype":"F32","shape":[0,18446744073709551616],"data_offsets":[0,0]}}'
    _raw_file(tmp_path / "huge.safetensors", header, b"")
    res = run_cli(["load", str(tmp_path / "huge.safetensors")])
    assert res.code == InvalidCheckpoint.exit_code, res.stderr
    assert "overflows 64-bit sizes" in error_line(res.stderr)


def test_absurd_header_length_is_refused(tmp_path: Path) -> None:
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(InvalidCheckpoint):
        load(str(tmp_path / "bad.safetensors"))


def test_index_naming_a_missing_shard_is_refused(
    clean_cloud: StorageEmulator, tmp_path: Path, gcs_env: dict[str, str]
) -> None:
    write_sharded(tmp_path / "ckpt", shards=2)
    objects = {
        f"missing/{p.name}": p
        for p in (tmp_path / "ckpt").iterdir()
        if p.name != "model-00002-of-00002.safetensors"
    }
    clean_cloud.seed_gcs(BUCKET, objects)
    with pytest.raises(InvalidCheckpoint, match="missing"):
        load(f"gs://{BUCKET}/missing/", config=SMALL)


def test_duplicate_tensor_across_shards_is_refused(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(2)}, tmp_path / "a.safetensors")
    save_file({"w": torch.ones(2)}, tmp_path / "b.safetensors")
    with pytest.raises(InvalidCheckpoint, match="two shards"):
        load(str(tmp_path))


def test_cli_load_reports_tensors_and_exits_10_on_a_bad_file(tmp_path: Path) -> None:
    save_file(every_dtype(), tmp_path / "m.safetensors")
    res = run_cli(["load", str(tmp_path / "m.safetensors"), "--json"])
    assert res.code == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["tensors"] == len(every_dtype()) and report["device"] == "cpu"
    _raw_file(tmp_path / "bad.safetensors", b"{oops", b"")
    res = run_cli(["load", str(tmp_path / "bad.safetensors")])
    assert res.code == InvalidCheckpoint.exit_code
    assert "JSON" in error_line(res.stderr)


def test_load_takes_the_tensors_from_a_peer_and_stays_bit_identical(
    clean_cloud: StorageEmulator, tmp_path: Path, gcs_env: dict[str, str]
) -> None:
    import signal

    from spotstart import fetch
    from spotstart.fetch.peers import PeerSpec
    from spotstart.weights.loader import load_async as _load_async
    from tests.conftest import spawn_cli

    tensors = write_sharded(tmp_path / "ckpt")
    objects = {f"load-peer/{p.name}": p for p in (tmp_path / "ckpt").iterdir()}
    clean_cloud.seed_gcs(BUCKET, objects)
    url = f"gs://{BUCKET}/load-peer/"
    fetch(url, tmp_path / "node-a", SMALL)
    proc = spawn_cli(["serve-peers", str(tmp_path / "node-a"), "--listen", "127.0.0.1:0", "--json"])
    try:
        assert proc.stdout is not None
        address = json.loads(proc.stdout.readline())["listen"]
        import asyncio
        import dataclasses

        config = dataclasses.replace(SMALL, peers=PeerSpec((address,)))
        got, report = asyncio.run(_load_async(url, config=config))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)
    assert set(got) == set(tensors)
    for name, t in tensors.items():
        assert same(got[name], t), name
    shard_bytes = sum(p.stat().st_size for p in (tmp_path / "ckpt").glob("model-*.safetensors"))
    assert report.bytes_from_peers > 0.9 * shard_bytes and not report.peers_dropped
