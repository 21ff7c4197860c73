"""load's cache directory: a link planted at its state directory or at a shard's name never
receives a byte (the copy is created beneath the cache directory with no link followed)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402

from spotstart.emulate.storage import StorageEmulator  # noqa: E402
from spotstart.errors import UnsafePath  # noqa: E402
from spotstart.weights.loader import load_async  # noqa: E402
from tests.conftest import BUCKET  # noqa: E402
from tests.weights.test_loader import SMALL  # noqa: E402


@pytest.mark.parametrize("plant", [".spotstart", "m.safetensors"])
def test_a_link_planted_in_the_cache_dir_is_never_written_through(
    clean_cloud: StorageEmulator, tmp_path: Path, gcs_env: dict[str, str], plant: str
) -> None:
    save_file({"w": torch.arange(4096, dtype=torch.float32)}, tmp_path / "m.safetensors")
    clean_cloud.seed_gcs(BUCKET, {"links/m.safetensors": tmp_path / "m.safetensors"})
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"precious")
    cache = tmp_path / "cache"
    cache.mkdir()
    url = f"gs://{BUCKET}/links/"
    if plant == ".spotstart":
        os.symlink(outside, cache / plant)
        with pytest.raises(UnsafePath, match="symlink"):
            asyncio.run(load_async(url, cache_dir=cache, config=SMALL))
    else:  # the link at the shard's name is replaced by the verified copy
        os.symlink(outside / "victim", cache / plant)
        tensors, _ = asyncio.run(load_async(url, cache_dir=cache, config=SMALL))
        assert torch.equal(tensors["w"], torch.arange(4096, dtype=torch.float32))
        assert not (cache / plant).is_symlink()
        assert (cache / plant).read_bytes() == (tmp_path / "m.safetensors").read_bytes()
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]
    assert (outside / "victim").read_bytes() == b"precious"
