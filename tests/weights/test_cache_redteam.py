"""load's cache directory, attacked between the index's check and the open: a user who can
write where a cached shard lies swaps it, once it was judged current, for a link to bytes of
theirs, a FIFO, or a file of theirs of the same size. Each is refused in one line (exit 8),
never loaded and never waited on. The swap runs right after the real check (a wrapper
around CacheIndex.is_current): the race window, made certain."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402

from spotstart.emulate.storage import StorageEmulator  # noqa: E402
from spotstart.errors import LocalIOError, UnsafePath  # noqa: E402
from spotstart.fetch import FetchConfig, NullProgress  # noqa: E402
from spotstart.fetch.cache import CacheIndex  # noqa: E402
from spotstart.fetch.config import Concurrency  # noqa: E402
from spotstart.weights.loader import load_async  # noqa: E402
from tests.conftest import BUCKET  # noqa: E402
from tests.weights.test_loader import SMALL  # noqa: E402

pytestmark = pytest.mark.timeout(120)  # a FIFO opened without O_NONBLOCK hung here


@pytest.mark.parametrize("swap", ["link", "fifo", "theirs"])
@pytest.mark.parametrize("tp", [None, (0, 1)])
def test_a_cached_shard_swapped_after_its_check_is_refused_never_loaded(
    clean_cloud: StorageEmulator,
    tmp_path: Path,
    gcs_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    swap: str,
    tp: tuple[int, int] | None,
) -> None:
    if swap == "theirs" and os.geteuid() != 0:
        pytest.skip("another user's file needs root to make")
    real = torch.arange(4096, dtype=torch.float32)
    save_file({"w": real}, tmp_path / "m.safetensors")
    save_file({"w": torch.full((4096,), 666.0)}, tmp_path / "forged.safetensors")
    clean_cloud.seed_gcs(BUCKET, {"swap/m.safetensors": tmp_path / "m.safetensors"})
    cache = tmp_path / "cache"
    url = f"gs://{BUCKET}/swap/"
    tensors, _ = asyncio.run(load_async(url, cache_dir=cache, config=SMALL))
    assert torch.equal(tensors["w"], real)
    shard = cache / "m.safetensors"
    forged = tmp_path / "forged.safetensors"
    assert forged.stat().st_size == shard.stat().st_size

    check = CacheIndex.is_current

    def then_swap(self: CacheIndex, rel: str, *args: object) -> bool:
        current = check(self, rel, *args)  # type: ignore[arg-type]
        if current and rel == "m.safetensors":
            shard.unlink()
            if swap == "link":
                os.symlink(forged, shard)
            elif swap == "fifo":
                os.mkfifo(shard)
            else:
                os.rename(forged, shard)
                os.chown(shard, 65534, 65534)
                os.utime(shard)
        return current

    monkeypatch.setattr(CacheIndex, "is_current", then_swap)
    with pytest.raises(UnsafePath, match="changed as it was opened"):
        asyncio.run(load_async(url, cache_dir=cache, config=SMALL, tp=tp))


def test_the_cache_directory_swapped_for_a_link_mid_load_redirects_no_shard(
    clean_cloud: StorageEmulator, tmp_path: Path, gcs_env: dict[str, str]
) -> None:
    """The cache directory (resolved once) moved away after the first shard and a link to a
    directory of someone's choice put at its name: each later shard opened the path again and
    was written through the link."""
    objects = {}
    for i in range(6):
        save_file({f"w{i}": torch.full((1024,), float(i))}, tmp_path / f"s{i}.safetensors")
        objects[f"mid/s{i}.safetensors"] = tmp_path / f"s{i}.safetensors"
    clean_cloud.seed_gcs(BUCKET, objects)
    shared = tmp_path / "shared"
    shared.mkdir()
    cache, moved, outside = shared / "cache", shared / "moved", tmp_path / "outside"
    outside.mkdir()
    swapped: list[str] = []

    class Swapper(NullProgress):
        def on_file_done(self, rel: str, *, cached: bool) -> None:
            if not swapped:
                os.rename(cache, moved)
                os.symlink(outside, cache)
                swapped.append(rel)

    cfg = FetchConfig(chunk_bytes=1 << 20, concurrency=Concurrency(streams=1))
    with contextlib.suppress(UnsafePath, LocalIOError):
        asyncio.run(
            load_async(f"gs://{BUCKET}/mid/", cache_dir=cache, config=cfg, progress=Swapper())
        )
    assert swapped
    assert list(outside.iterdir()) == []
