"""The peer server resolves every file beneath DIR, every component: a symlinked parent
directory, a symlinked state directory or a symlinked index never lets a byte from outside
DIR out, with openat2 and with the component walk a kernel without it falls back to. A file
moving from its part file into place is served across the rename."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from spotstart import safefs
from spotstart.fetch.peer_server import PeerServer
from tests.fetch.peer_dirs import Served, add_arriving, add_complete, range_of

SECRET = b"not for peers; " * 4096


@pytest.fixture(params=["openat2", "walk"])
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "walk":

        def no_openat2(*_: object) -> int:
            raise OSError(38, "Function not implemented")  # ENOSYS: an old kernel

        monkeypatch.setattr(safefs, "_openat2", no_openat2)
        monkeypatch.setattr(safefs, "_have", None)
    elif safefs.resolver() != "openat2":
        pytest.skip("this kernel (or its seccomp filter) has no openat2")
    yield request.param
    assert safefs.resolver() == request.param


async def _ask(port: int, served: Served) -> tuple[int, bytes, list[str]]:
    """(status of a range request for ``served``, its body, the ids the inventory lists)."""
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as s:
        async with s.get(base + "/v1/inventory") as r:
            ids = [o["id"] for o in (await r.json())["objects"]]
        url = f"{base}/v1/objects/{served.oid}"
        async with s.get(url, headers=range_of(served, 0, len(served.data))) as r:
            return r.status, await r.read(), ids


def _serve(root: Path, served: Served) -> tuple[int, bytes, list[str]]:
    async def go() -> tuple[int, bytes, list[str]]:
        server = PeerServer(root)
        port = await server.start("127.0.0.1", 0)
        try:
            return await _ask(port, served)
        finally:
            await server.close()

    return asyncio.run(go())


def test_a_symlinked_parent_directory_under_dir_serves_nothing_outside_it(
    tmp_path: Path, resolver: str
) -> None:
    root, outside = tmp_path / "dir", tmp_path / "outside"
    outside.mkdir()
    root.mkdir()
    (root / "sub").symlink_to(outside, target_is_directory=True)
    # The index names sub/secret.bin with the outside file's own size and mtime, as anyone
    # who can stat it could write.
    served = add_complete(root, "sub/secret.bin", SECRET, at=outside / "secret.bin")
    status, body, ids = _serve(root, served)
    assert status == 404
    assert SECRET[:64] not in body
    assert served.oid not in ids


def test_a_symlinked_state_directory_or_index_is_never_read(tmp_path: Path, resolver: str) -> None:
    # DIR/.spotstart is a link to a directory an attacker filled: its index names a file
    # inside DIR that the attacker chose, and its journals a part file outside.
    root, planted = tmp_path / "dir", tmp_path / "planted"
    root.mkdir()
    served = add_complete(planted, "model.bin", SECRET)
    os.replace(planted / "model.bin", root / "model.bin")
    (root / ".spotstart").symlink_to(planted / ".spotstart", target_is_directory=True)
    arriving, _ = add_arriving(planted, "other.bin", SECRET[:4096], 1024)
    (root / ".spotstart" / "parts").exists()  # the planted journal is there, through the link
    assert _serve(root, served)[0] == 404
    status, body, ids = _serve(root, arriving)
    assert status == 404 and SECRET[:64] not in body and ids == []

    # The same with only the index a link (to an index listing DIR's own file).
    (root / ".spotstart").unlink()
    (root / ".spotstart").mkdir()
    (root / ".spotstart" / "index.json").symlink_to(planted / ".spotstart" / "index.json")
    assert _serve(root, served)[0] == 404

    # And a real index: served (the refusals above were the links, not the files).
    (root / ".spotstart" / "index.json").unlink()
    os.replace(planted / ".spotstart" / "index.json", root / ".spotstart" / "index.json")
    status, body, _ = _serve(root, served)
    assert status == 206 and body == SECRET


def test_a_part_file_behind_a_symlinked_parts_directory_is_not_served(
    tmp_path: Path, resolver: str
) -> None:
    root, outside = tmp_path / "dir", tmp_path / "outside"
    arriving, _ = add_arriving(outside, "x.bin", SECRET[:8192], 4096)
    (root / ".spotstart").mkdir(parents=True)
    (root / ".spotstart" / "parts").symlink_to(outside / ".spotstart" / "parts")
    status, body, ids = _serve(root, arriving)
    assert status == 404 and SECRET[:64] not in body and ids == []


def test_a_file_moving_from_its_part_file_into_place_is_served_across_the_rename(
    tmp_path: Path,
) -> None:
    """The fetch renames the part file into place and removes the journal; the cache index
    that lists the file is saved later (at most once a second, or at the end). A peer asking
    in between used to get 404."""
    root = tmp_path / "dir"
    data = os.urandom(3 * 4096 + 5)
    arriving, part = add_arriving(root, "m/model.bin", data, 4096)

    async def go() -> list[tuple[int, bytes]]:
        server = PeerServer(root)
        port = await server.start("127.0.0.1", 0)
        out = []
        try:
            out.append((await _ask(port, arriving))[:2])  # from the part file
            (root / "m").mkdir()
            os.replace(part, root / "m" / "model.bin")  # into place ...
            part.with_suffix(".journal").unlink()  # ... journal gone, index not yet saved
            assert server.index is not None
            scans = server.index.scans
            while server.index.scans < scans + 2:  # the index has seen the journal go
                await server.index.table(max_age_s=0)
            out.append((await _ask(port, arriving))[:2])
            add_complete(root, "m/model.bin", data, at=root / "m" / "model.bin")  # index saved
            out.append((await _ask(port, arriving))[:2])
            (root / "m" / "model.bin").unlink()  # evicted, and out of the index
            (root / ".spotstart" / "index.json").write_text(json.dumps({"files": {}}))
            await server.index.table(max_age_s=0)
            out.append((await _ask(port, arriving))[:2])
        finally:
            await server.close()
        return out

    got = asyncio.run(go())
    assert got[:3] == [(206, data)] * 3
    assert got[3][0] == 404
