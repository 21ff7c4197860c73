"""Pack and extract: a deterministic archive that restores byte for byte, and hostile archives
(paths leaving the cache, links, devices, FIFOs, setuid modes, size lies, a zip bomb, members
that differ from the manifest) refused before a byte lands outside a fresh staging directory."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import stat
import tarfile
from collections.abc import Iterable
from pathlib import Path

import pytest
import zstandard

from spotstart.enginecache import EngineCacheConfig, engine_env
from spotstart.enginecache.archive import ArchiveRefused, FileEntry, extract, pack
from spotstart.enginecache.dirs import tmp_inductor
from spotstart.errors import LocalIOError


def _tree(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _cache(tmp_path: Path) -> EngineCacheConfig:
    cfg = EngineCacheConfig("file:///x", tmp_path / "root")
    engine_env(cfg, [])
    r = cfg.root
    (r / "vllm" / "torch_compile_cache" / "abc").mkdir(parents=True)
    (r / "vllm" / "torch_compile_cache" / "abc" / "graph.py").write_text("def f(): pass\n" * 50)
    (r / "inductor" / "fxgraph").mkdir(parents=True)
    (r / "inductor" / "fxgraph" / "entry").write_bytes(os.urandom(70_000))
    (r / "triton" / "k.so").write_bytes(os.urandom(5000))
    (r / "triton" / "k.so").chmod(0o755)
    hdr = r / tmp_inductor() / "precompiled_headers"
    hdr.mkdir(parents=True)
    (hdr / "h.gch").write_bytes(b"header" * 100)
    return cfg


def test_round_trip_is_byte_for_byte_and_the_archive_is_deterministic(tmp_path: Path) -> None:
    cfg = _cache(tmp_path)
    before = {k: v for k, v in _tree(cfg.root).items() if not k.startswith(("packed", "archives"))}
    one = pack(cfg.root, max_bytes=1 << 30, max_files=100)
    os.utime(cfg.root / "triton" / "k.so", (1, 1))  # other times, same bytes: same archive
    os.unlink(one.path)
    two = pack(cfg.root, max_bytes=1 << 30, max_files=100)
    assert one.sha256 == two.sha256
    assert [f.path for f in two.files] == sorted(f.path for f in two.files)
    assert "tmp/torchinductor/precompiled_headers/h.gch" in {f.path for f in two.files}
    with tarfile.open(
        fileobj=io.BytesIO(zstandard.decompress(two.path.read_bytes(), max_output_size=1 << 30))
    ) as t:
        for m in t.getmembers():
            assert (m.uid, m.gid, m.mtime, m.uname, m.gname) == (0, 0, 0, "", "")
            assert m.isreg() and m.mode & ~0o755 == 0
    files = {f.path: f for f in two.files}
    dest = tmp_path / "dest"
    dest.mkdir(mode=0o700)
    with open(two.path, "rb") as f:
        got_bytes, got_files = extract(f, files, dest, "stage")
    assert got_files == len(files) and got_bytes == sum(f.size for f in two.files)
    assert _tree(dest / "stage") == before
    assert (dest / "stage" / "triton" / "k.so").stat().st_mode & 0o777 == 0o755


def test_pack_skips_links_fifos_sockets_locks_and_temp_files_and_counts_them(
    tmp_path: Path,
) -> None:
    cfg = _cache(tmp_path)
    r = cfg.root
    (r / "vllm" / "evil").symlink_to("/etc/passwd")
    (r / "vllm" / "evildir").symlink_to("/etc")
    os.mkfifo(r / "inductor" / "fifo")
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(r / "triton" / "s"))
        (r / "triton" / "k.so.tmp.pid_12_34").write_bytes(b"half")
        (r / "inductor" / "fxgraph" / "entry.lock").write_bytes(b"")
        (r / "inductor" / "fxgraph" / ".123.456.tmp").write_bytes(b"x")
        p = pack(r, max_bytes=1 << 30, max_files=100)
    finally:
        s.close()
    assert p.skipped == {"symlinks": 2, "special": 2, "temp_or_lock": 3}
    names = {f.path for f in p.files}
    assert not any("evil" in n or "fifo" in n or n.endswith(("lock", "tmp")) for n in names)


def test_pack_bounds_bytes_and_files(tmp_path: Path) -> None:
    cfg = _cache(tmp_path)
    with pytest.raises(LocalIOError, match="max_files"):
        pack(cfg.root, max_bytes=1 << 30, max_files=2)
    with pytest.raises(LocalIOError, match="max_bytes"):
        pack(cfg.root, max_bytes=10_000, max_files=100)
    assert [p for p in (cfg.root / "packed").iterdir()] == []  # nothing left behind


# ---- hostile archives -------------------------------------------------------------------


def _archive(
    members: Iterable[tuple[tarfile.TarInfo, bytes | None]], fmt: int = tarfile.PAX_FORMAT
) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for info, data in members:
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    return zstandard.ZstdCompressor().compress(buf.getvalue())


def _reg(
    name: str, data: bytes, mode: int = 0o644, size: int | None = None
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data) if size is None else size
    info.mode = mode
    return info, data


def _entry(name: str, data: bytes, mode: int = 0o644) -> FileEntry:
    return FileEntry(name, len(data), hashlib.sha256(data).hexdigest(), mode)


def _extract(tmp_path: Path, blob: bytes, files: list[FileEntry]) -> tuple[int, int]:
    dest = tmp_path / "dest"
    dest.mkdir(mode=0o700, exist_ok=True)
    return extract(io.BytesIO(blob), {f.path: f for f in files}, dest, "stage")


def _nothing_outside(tmp_path: Path) -> None:
    assert not (tmp_path / "escaped").exists()
    assert not Path("/tmp/escaped-by-enginecache").exists()


@pytest.mark.parametrize(
    "name",
    [
        "../escaped",
        "vllm/../../escaped",
        "/tmp/escaped-by-enginecache",
        "vllm//x",
        "vllm/./x",
        "vllm\\..\\x",
        "elsewhere/x",  # not beneath a cache directory
        "tmp/other/x",  # tmp: only inductor's directory
        "vllm/" + "d/" * 70 + "x",
        "vllm/" + "n" * 300,
    ],
)
def test_a_member_path_that_leaves_the_cache_is_refused(tmp_path: Path, name: str) -> None:
    data = b"payload"
    with pytest.raises(ArchiveRefused):
        _extract(tmp_path, _archive([_reg(name, data)]), [_entry(name, data)])
    _nothing_outside(tmp_path)


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "chardev", "blockdev", "fifo", "dir"])
def test_links_devices_fifos_and_directories_are_refused(tmp_path: Path, kind: str) -> None:
    info = tarfile.TarInfo("vllm/x")
    info.type = {
        "symlink": tarfile.SYMTYPE,
        "hardlink": tarfile.LNKTYPE,
        "chardev": tarfile.CHRTYPE,
        "blockdev": tarfile.BLKTYPE,
        "fifo": tarfile.FIFOTYPE,
        "dir": tarfile.DIRTYPE,
    }[kind]
    info.linkname = "/etc/passwd"
    with pytest.raises(ArchiveRefused, match="not a regular file"):
        _extract(tmp_path, _archive([(info, None)]), [_entry("vllm/x", b"")])
    assert not (tmp_path / "dest" / "stage" / "vllm" / "x").exists()


def test_setuid_setgid_sticky_and_world_write_bits_are_masked(tmp_path: Path) -> None:
    data = b"#!/bin/sh\n"
    _extract(
        tmp_path,
        _archive([_reg("triton/run", data, mode=0o7777)]),
        [_entry("triton/run", data, 0o7777)],
    )
    st = (tmp_path / "dest" / "stage" / "triton" / "run").stat()
    assert stat.S_IMODE(st.st_mode) == 0o755
    assert st.st_uid == os.geteuid()  # never chowned to the archive's uid, even as root


def test_files_are_ours_whatever_uid_the_archive_names(tmp_path: Path) -> None:
    info, data = _reg("vllm/x", b"abc")
    info.uid, info.gid, info.uname = 4242, 4242, "mallory"
    _extract(tmp_path, _archive([(info, data)]), [_entry("vllm/x", data)])
    st = (tmp_path / "dest" / "stage" / "vllm" / "x").stat()
    assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())


def test_a_size_that_differs_from_the_manifest_is_refused(tmp_path: Path) -> None:
    data = b"0123456789"
    entry = FileEntry("vllm/x", 5, hashlib.sha256(data[:5]).hexdigest(), 0o644)
    with pytest.raises(ArchiveRefused, match="manifest says 5"):
        _extract(tmp_path, _archive([_reg("vllm/x", data)]), [entry])


def test_a_header_that_claims_more_than_the_data_is_refused(tmp_path: Path) -> None:
    info, data = _reg("vllm/x", b"short", size=5)
    blob = _archive([(info, data)])
    raw = zstandard.decompress(blob, max_output_size=1 << 20)
    # rewrite the size field to 4 KiB: the archive ends before the data does
    hdr = bytearray(raw[:512])
    hdr[124:136] = b"%011o\0" % 4096
    hdr[148:156] = b" " * 8
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    lie = zstandard.ZstdCompressor().compress(bytes(hdr) + raw[512:1024])
    entry = FileEntry("vllm/x", 4096, hashlib.sha256(b"").hexdigest(), 0o644)
    with pytest.raises(ArchiveRefused):
        _extract(tmp_path, lie, [entry])


def test_a_wrong_sha256_is_refused(tmp_path: Path) -> None:
    data = b"compiled code"
    entry = FileEntry("vllm/x", len(data), hashlib.sha256(b"other code!!!").hexdigest(), 0o644)
    with pytest.raises(ArchiveRefused, match="sha256"):
        _extract(tmp_path, _archive([_reg("vllm/x", data)]), [entry])


def test_members_must_be_exactly_the_manifests_set(tmp_path: Path) -> None:
    a, b = b"a", b"b"
    with pytest.raises(ArchiveRefused, match="not in the manifest"):
        _extract(tmp_path, _archive([_reg("vllm/a", a), _reg("vllm/b", b)]), [_entry("vllm/a", a)])
    with pytest.raises(ArchiveRefused, match="not in the archive"):
        _extract(
            tmp_path / "2",
            _archive([_reg("vllm/a", a)]),
            [_entry("vllm/a", a), _entry("vllm/b", b)],
        )
    with pytest.raises(ArchiveRefused, match="twice"):
        _extract(
            tmp_path / "3", _archive([_reg("vllm/a", a), _reg("vllm/a", a)]), [_entry("vllm/a", a)]
        )


@pytest.fixture(autouse=True)
def _dirs(tmp_path: Path) -> None:
    for d in ("2", "3"):
        (tmp_path / d).mkdir()


def test_a_zip_bomb_stops_decompressing_past_the_bound(tmp_path: Path) -> None:
    """A pax header whose data is 64 MiB of 'a' (tarfile reads a pax header whole): a few
    KiB compressed; decompression stops a little past what the manifest lists."""
    info, data = _reg("vllm/x", b"small")
    info.pax_headers = {"comment": "a" * (64 << 20)}
    blob = _archive([(info, data)])
    assert len(blob) < 1 << 20
    with pytest.raises(ArchiveRefused, match="zip bomb"):
        _extract(tmp_path, blob, [_entry("vllm/x", data)])


def test_garbage_and_truncated_archives_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ArchiveRefused):
        _extract(tmp_path, b"not zstd at all", [_entry("vllm/x", b"x")])
    good = _archive([_reg("vllm/x", b"x" * 100_000)])
    with pytest.raises(ArchiveRefused):
        _extract(tmp_path / "2", good[: len(good) // 2], [_entry("vllm/x", b"x" * 100_000)])


def test_a_planted_staging_directory_is_never_extracted_into(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir(mode=0o700)
    (dest / "stage").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError):
        extract(
            io.BytesIO(_archive([_reg("vllm/x", b"x")])),
            {"vllm/x": _entry("vllm/x", b"x")},
            dest,
            "stage",
        )
    assert not (tmp_path / "elsewhere").exists()
