"""Local files and directories as a source: versions follow size and mtime, so a file rewritten
while it is read is noticed."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from spotstart.errors import NotFound, ObjectChanged
from spotstart.store.local import LocalSource


def read_all(src: LocalSource, key: str) -> bytes:
    async def go() -> bytes:
        info = await src.stat(key)
        out: list[bytes] = []

        async def sink(piece: bytes) -> None:
            out.append(piece)

        await src.read(info, 0, info.size, sink)
        return b"".join(out)

    return asyncio.run(go())


def test_tree_is_listed_with_relative_keys(tmp_path: Path) -> None:
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a").write_bytes(b"a")
    (tmp_path / "d" / "sub" / "b").write_bytes(b"bb")
    src = LocalSource(str(tmp_path))
    infos = asyncio.run(src.list("d"))
    assert [(i.key, i.size) for i in infos] == [("d/a", 1), ("d/sub/b", 2)]
    assert read_all(src, "d/sub/b") == b"bb"


def test_file_rewritten_after_stat_is_object_changed(tmp_path: Path) -> None:
    f = tmp_path / "w"
    f.write_bytes(b"x" * 100)
    src = LocalSource(str(tmp_path))

    async def go() -> None:
        info = await src.stat("w")
        f.write_bytes(b"y" * 101)
        os.utime(f, ns=(1, 1))

        async def sink(piece: bytes) -> None:
            return None

        await src.read(info, 0, info.size, sink)

    with pytest.raises(ObjectChanged, match="changed while being read"):
        asyncio.run(go())


def test_missing_paths_and_directories_are_not_objects(tmp_path: Path) -> None:
    src = LocalSource(str(tmp_path))
    with pytest.raises(NotFound):
        asyncio.run(src.stat("nope"))
    with pytest.raises(NotFound, match="is a directory"):
        asyncio.run(src.stat(""))
    with pytest.raises(NotFound):
        asyncio.run(src.list("nope"))
