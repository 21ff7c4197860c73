"""Tensor-parallel slices: the pure plan against numpy's own split for any shape, dimension
and world, then `load(..., tp=(rank, world))` on an unmodified Llama-shaped checkpoint from
GCS and from a local file: every rank's slices put back together are the full tensors, each
rank holds ~1/world of the bytes, and column-parallel tensors are read one range per rank."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spotstart.errors import UsageError
from spotstart.weights.format import TensorSpec
from spotstart.weights.tp import coalesce, default_split, plan, slice_tensor

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402

from spotstart.emulate.storage import StorageEmulator  # noqa: E402
from spotstart.weights.loader import load, load_async  # noqa: E402
from tests.conftest import BUCKET, run_cli  # noqa: E402


@given(
    dims=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    world=st.sampled_from([1, 2, 3, 4]),
    dim_pick=st.integers(0, 2),
    gap=st.sampled_from([0, 7, 1 << 20]),
    max_read=st.sampled_from([5, 64, 16 << 20]),
)
def test_the_plan_reads_exactly_what_numpy_split_gives(
    dims: list[int], world: int, dim_pick: int, gap: int, max_read: int
) -> None:
    dim = dim_pick % len(dims)
    shape = list(dims)
    shape[dim] *= world  # divisible by construction
    full = np.arange(int(np.prod(shape)), dtype=np.int16).reshape(shape)
    file = bytes(40) + full.tobytes()  # the tensor at offset 40 of a "file"
    spec = TensorSpec("w", "I16", tuple(shape), 0, full.nbytes, data_start=40)
    for rank in range(world):
        sl = slice_tensor(0, spec, rank, world, dim)
        out = np.zeros(sl.nbytes, dtype=np.uint8)
        for r in coalesce([sl], max_gap=gap, max_read=max_read):
            data = np.frombuffer(file[r.start : r.start + r.length], dtype=np.uint8)
            for p in r.pieces:
                out[p.dst : p.dst + p.length] = data[p.src - r.start : p.src - r.start + p.length]
        got = out.view(np.int16).reshape(sl.shape)
        assert np.array_equal(got, np.split(full, world, axis=dim)[rank])


def test_a_dimension_that_does_not_divide_is_refused() -> None:
    spec = TensorSpec("model.layers.0.self_attn.q_proj.weight", "BF16", (10, 4), 0, 80)
    with pytest.raises(UsageError, match="does not divide"):
        plan([spec], 0, 4)
    with pytest.raises(UsageError, match="rank"):
        plan([spec], 4, 4)


def test_vllm_llama_layout() -> None:
    assert default_split("model.layers.3.self_attn.q_proj.weight", (8, 8)) == 0
    assert default_split("model.layers.3.mlp.down_proj.weight", (8, 8)) == 1
    assert default_split("model.layers.3.self_attn.o_proj.weight", (8, 8)) == 1
    assert default_split("model.embed_tokens.weight", (8, 8)) == 0
    assert default_split("model.layers.3.input_layernorm.weight", (8,)) is None
    assert default_split("model.norm.weight", (8,)) is None


def llama_like(
    layers: int = 2, hidden: int = 256, inter: int = 512, vocab: int = 1024
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    out = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g).bfloat16()}
    for i in range(layers):
        p = f"model.layers.{i}"
        for name, shape in (
            ("self_attn.q_proj.weight", (hidden, hidden)),
            ("self_attn.k_proj.weight", (hidden // 2, hidden)),
            ("self_attn.v_proj.weight", (hidden // 2, hidden)),
            ("self_attn.o_proj.weight", (hidden, hidden)),
            ("mlp.gate_proj.weight", (inter, hidden)),
            ("mlp.up_proj.weight", (inter, hidden)),
            ("mlp.down_proj.weight", (hidden, inter)),
            ("input_layernorm.weight", (hidden,)),
        ):
            out[f"{p}.{name}"] = torch.randn(*shape, generator=g).bfloat16()
    out["model.norm.weight"] = torch.randn(hidden, generator=g).bfloat16()
    out["lm_head.weight"] = torch.randn(vocab, hidden, generator=g).bfloat16()
    return out


WORLD = 4


def _check_ranks(full: dict[str, torch.Tensor], ranks: list[dict[str, torch.Tensor]]) -> None:
    for name, tensor in full.items():
        dim = default_split(name, tuple(tensor.shape))
        if dim is None:
            assert all(torch.equal(r[name], tensor) for r in ranks), name
        else:
            assert torch.equal(torch.cat([r[name] for r in ranks], dim=dim), tensor), name


@pytest.mark.parametrize("where", ["gcs", "file"])
def test_each_rank_loads_its_slices_of_an_unmodified_checkpoint(
    where: str, cloud: StorageEmulator, gcs_env: dict[str, str], tmp_path: Path
) -> None:
    full = llama_like()
    path = tmp_path / "model.safetensors"
    save_file(full, str(path))
    size = path.stat().st_size
    if where == "gcs":
        cloud.seed_gcs(BUCKET, {"tp/model.safetensors": path.read_bytes()})
        src = f"gs://{BUCKET}/tp/model.safetensors"
    else:
        src = f"file://{path}"
    ranks, reports = [], []
    for rank in range(WORLD):
        tensors, report = asyncio.run(load_async(src, tp=(rank, WORLD)))
        ranks.append(tensors)
        reports.append(report)
    _check_ranks(full, ranks)
    split_bytes = sum(
        t.nbytes for n, t in full.items() if default_split(n, tuple(t.shape)) is not None
    )
    whole_bytes = sum(t.nbytes for n, t in full.items() if default_split(n, tuple(t.shape)) is None)
    for report in reports:
        assert report.tp.endswith(f"/{WORLD}")
        assert report.bytes_rank == split_bytes // WORLD + whole_bytes  # memory: the rank's share
        read = report.bytes_transferred if where == "gcs" else report.bytes_from_cache
        # row-parallel rows are read through their gaps (one request beats a request a row);
        # everything else is read exactly once
        assert report.bytes_rank <= read < size


def test_load_cli_takes_a_rank(
    cloud: StorageEmulator, gcs_env: dict[str, str], tmp_path: Path
) -> None:
    path = tmp_path / "model.safetensors"
    save_file(llama_like(layers=1), str(path))
    result = run_cli(["load", f"file://{path}", "--tp", "1/4", "--json"])
    assert result.code == 0, result.stderr
    assert '"tp": "1/4"' in result.stdout
    bad = run_cli(["load", f"file://{path}", "--tp", "4/4"])
    assert bad.code == 2


def test_sync_load_with_tp(tmp_path: Path) -> None:
    full = llama_like(layers=1)
    save_file(full, str(tmp_path / "m.safetensors"))
    ranks = [load(f"file://{tmp_path / 'm.safetensors'}", tp=(r, 2)) for r in range(2)]
    _check_ranks(full, ranks)
