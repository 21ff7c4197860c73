"""Red team of the layer reader and the merged tree with hostile layers: archives that read
differently to us and to extractors (old GNU sparse extension headers), headers that cost
work for every later member (global pax records), decompression bombs (a zstd frame asking
for a 2 GiB window, 1 GiB of zeros in a few KiB), hardlink chains, deep trees and more
members than the tree should hold. Python's tarfile (which reads old GNU sparse maps as GNU
tar and Go's archive/tar do) is the oracle for what an extractor sees."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import pytest

from spotstart.errors import IntegrityError, InvalidImage, UnsupportedImage
from spotstart.image import tree as tree_module
from spotstart.image.digest import Digest
from spotstart.image.layer import LayerStats, layer_members
from spotstart.image.sources import TarArchive, resolve_docker_archive
from spotstart.image.tarscan import BLOCK, TarScanner
from spotstart.image.tree import MergedTree


def _scan(data: bytes, piece: int = 777) -> list[str]:
    scanner = TarScanner()
    names = []
    for i in range(0, len(data), piece):
        names += [e.name for e in scanner.feed(data[i : i + piece])]
    scanner.close()
    return names


def _checksummed(header: bytearray) -> bytes:
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def _member(name: str, data: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    pad = -len(data) % BLOCK
    return info.tobuf(tarfile.GNU_FORMAT) + data + b"\0" * pad


def _old_gnu_sparse(name: str, data: bytes, regions: int) -> bytes:
    """An old GNU sparse member ('S') whose map needs one extension header (more than the 4
    entries the header holds), its data stored after that extension header."""
    header = bytearray(tarfile.TarInfo(name).tobuf(tarfile.GNU_FORMAT)[:BLOCK])
    header[156:157] = b"S"
    header[124:136] = b"%011o\0" % len(data)
    step = len(data) // regions
    entries = [(i * 4096, step) for i in range(regions)]
    for i, (offset, size) in enumerate(entries[:4]):  # the header's 4 map entries at 386
        header[386 + 24 * i : 386 + 24 * i + 24] = b"%011o\0%011o\0" % (offset, size)
    header[482] = 1  # isextended: an extension header follows
    header[483:495] = b"%011o\0" % (regions * 4096)  # realsize
    ext = bytearray(BLOCK)
    for i, (offset, size) in enumerate(entries[4:]):
        ext[24 * i : 24 * i + 24] = b"%011o\0%011o\0" % (offset, size)
    return _checksummed(header) + bytes(ext) + data + b"\0" * (-len(data) % BLOCK)


def test_an_old_gnu_sparse_member_hides_nothing_in_its_data() -> None:
    """The last block of a sparse member's data is a valid tar header ("injected"). Read as
    extractors read it (extension header, then data), it is data; skipping the data from
    right after the header (as before) read it as a member no extractor sees, and its size
    swallowed the real member that follows."""
    fake = _checksummed(bytearray(tarfile.TarInfo("injected").tobuf(tarfile.GNU_FORMAT)))
    fake = bytearray(fake)
    fake[124:136] = b"%011o\0" % BLOCK  # its "data": the next real header, hidden
    data = b"x" * (4 * BLOCK) + _checksummed(fake)
    archive = (
        _old_gnu_sparse("sparse", data, regions=6)
        + _member("real", b"weights" * 100)
        + b"\0" * (2 * BLOCK)
    )
    with tarfile.open(fileobj=io.BytesIO(archive)) as tf:
        oracle = [m.name for m in tf]
    assert oracle == ["sparse", "real"]
    assert _scan(archive) == oracle


def test_a_sparse_member_outside_the_gnu_format_is_invalid() -> None:
    header = bytearray(tarfile.TarInfo("s").tobuf(tarfile.USTAR_FORMAT)[:BLOCK])
    header[156:157] = b"S"
    with pytest.raises(InvalidImage, match="GNU"):
        _scan(_checksummed(header) + b"\0" * (2 * BLOCK))


def _meta(kind: bytes, payload: bytes) -> bytes:
    info = tarfile.TarInfo("././@meta")
    info.type, info.size = kind, len(payload)
    return info.tobuf(tarfile.GNU_FORMAT) + payload + b"\0" * (-len(payload) % BLOCK)


def test_a_global_pax_header_renames_nothing() -> None:
    """`g` with path=decoy: Go's archive/tar applies a global header to no member and
    containerd skips it, so the image holds f0..f9. Applied (as before), every member was
    "decoy" to the audit alone: the files an extractor writes hidden from the report. 100
    global headers of 20,000 keys each were also all kept, and copied for every member."""
    archive = _meta(b"g", _pax_record("path", "decoy"))
    for g in range(100):
        archive += _meta(b"g", b"".join(_pax_record(f"k{g}.{i}", "v") for i in range(20_000)))
    archive += b"".join(_member(f"f{i}", b"w" * i) for i in range(10)) + b"\0" * (2 * BLOCK)
    assert _scan(archive, piece=1 << 20) == [f"f{i}" for i in range(10)]


def test_a_gnu_long_name_wins_over_a_pax_path_as_in_go() -> None:
    """A member with both: Go (containerd) names it by the GNU long name (reader.go merges
    the pax records, then sets the long name). Before, the audit named it by the pax path."""
    real = "usr/lib/" + "m" * 120 + ".safetensors"
    archive = (
        _meta(b"L", real.encode() + b"\0")
        + _meta(b"x", _pax_record("path", "tmp/harmless.txt"))
        + _member("short", b"weights")
        + b"\0" * (2 * BLOCK)
    )
    assert _scan(archive) == [real]


def test_a_size_field_with_a_leading_nul_is_read_as_go_reads_it() -> None:
    """Size "\\0" + "0000001000": Go trims NULs at both ends (512 bytes of data, which here
    hold a valid header); cut at the first NUL (as tarfile does, and this reader did) it is
    0, and the data was read as a member containerd never extracts."""
    injected = tarfile.TarInfo("injected").tobuf(tarfile.GNU_FORMAT)
    header = bytearray(tarfile.TarInfo("carrier").tobuf(tarfile.GNU_FORMAT))
    header[124:136] = b"\0" + b"%010o\0" % len(injected)
    archive = _checksummed(header) + injected + _member("real", b"w") + b"\0" * (2 * BLOCK)
    assert _scan(archive) == ["carrier", "real"]


@pytest.mark.parametrize("size", [b"0000001000x\0", b"00000 01000\0", b"+0000001000\0"])
def test_a_size_field_go_refuses_is_invalid(size: bytes) -> None:
    header = bytearray(tarfile.TarInfo("f").tobuf(tarfile.GNU_FORMAT))
    header[124:136] = size
    with pytest.raises(InvalidImage, match="octal"):
        _scan(_checksummed(header) + b"\0" * (4 * BLOCK))


def test_a_star_header_prefix_ends_where_star_says() -> None:
    """star's format (ustar magic, "tar\\0" at 508) has a 131-byte prefix, then times; Go
    joins only those 131 bytes to the name. Reading 155 named a member differently."""
    header = bytearray(tarfile.TarInfo("name").tobuf(tarfile.USTAR_FORMAT))
    header[345:476] = b"d" * 131  # the whole prefix, no NUL to end it
    header[476:488] = b"01234567012\0"  # star's atime: not part of the name
    header[508:512] = b"tar\0"
    archive = _checksummed(header) + b"\0" * (2 * BLOCK)
    assert _scan(archive) == ["d" * 131 + "/name"]


def test_a_regular_member_named_like_a_directory_keeps_its_data() -> None:
    """Type '0' named "w/" with 512 bytes of data (a valid header): a file to Go, whose
    trailing-slash rule is V7's type NUL only. Read as a directory (no data), its data was
    read as a member containerd never extracts."""
    injected = tarfile.TarInfo("injected").tobuf(tarfile.GNU_FORMAT)
    carrier = tarfile.TarInfo("w/")
    carrier.size = len(injected)
    archive = carrier.tobuf(tarfile.GNU_FORMAT) + injected + _member("real", b"x") + b"\0" * 1024
    assert _scan(archive) == ["w/", "real"]


def _pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode()
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return str(n).encode() + body


def _zstd_rle(blocks: int, window_log: int = 17) -> bytes:
    """A zstd frame by hand: no content size, ``blocks`` RLE blocks of 128 KiB of zeros
    (4 bytes each: the ratio is 32,768)."""
    out = bytearray(b"\x28\xb5\x2f\xfd" + bytes([0, (window_log - 10) << 3]))
    for i in range(blocks):
        out += struct.pack("<I", ((128 << 10) << 3) | (1 << 1) | (i == blocks - 1))[:3] + b"\0"
    return bytes(out)


def _members(blob: bytes, diff_id: Digest | None = None) -> tuple[list[str], LayerStats]:
    stats = LayerStats()
    digest = Digest("sha256", hashlib.sha256(blob).hexdigest())
    names = [
        e.name
        for e in layer_members(
            lambda: io.BytesIO(blob),
            digest=digest,
            size=len(blob),
            diff_id=diff_id,
            what="hostile layer",
            stats=stats,
        )
    ]
    return names, stats


def test_a_zstd_frame_asking_for_a_2_gib_window_is_invalid_not_allocated() -> None:
    with pytest.raises(InvalidImage, match="zstd"):
        _members(_zstd_rle(1, window_log=31))


def test_a_zstd_bomb_is_streamed_and_checked_against_its_diff_id() -> None:
    """1 GiB of zeros from 32 KiB: inflated 4 MiB at a time (memory bounded), every byte
    counted and hashed; a diff_id that does not match is an IntegrityError."""
    bomb = _zstd_rle(8192)
    assert len(bomb) < 40 << 10
    with pytest.raises(IntegrityError, match="diff_id"):
        _members(bomb, diff_id=Digest("sha256", "0" * 64))
    names, stats = _members(bomb)
    assert names == [] and stats.bytes_uncompressed == 1 << 30


def test_hardlink_chains_and_deep_trees_are_read_without_recursion() -> None:
    tree = MergedTree()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(_info("f0", size=5), io.BytesIO(b"bytes"))
        for i in range(1, 5000):
            tf.addfile(_info(f"f{i}", link=f"f{i - 1}"))
        deep = "/".join(["d"] * 2000)  # 3,999 bytes: within PATH_MAX
        tf.addfile(_info(deep, size=3), io.BytesIO(b"abc"))
        tf.addfile(_info(deep + "/" + "e" * 200, size=0))  # over PATH_MAX
    gz = zlib.compressobj(9, zlib.DEFLATED, 31)
    blob = gz.compress(buf.getvalue()) + gz.flush()
    stats = LayerStats()
    for e in layer_members(
        lambda: io.BytesIO(blob), digest=None, size=None, diff_id=None, what="x", stats=stats
    ):
        tree.add(0, e)
    assert tree.inodes[0].links == 5000
    assert tree.notes.unextractable == 1
    node = tree.lookup(deep)
    assert node is not None and node.kind == "file"


def _info(name: str, *, size: int = 0, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    if link:
        info.type, info.linkname = tarfile.LNKTYPE, link
    return info


def test_more_members_than_the_tree_holds_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Members, not bytes, are what the tree's memory grows with (~450 B each): a 60 MiB
    gzip layer of empty files held 10 million (4.5 GB) before the bound."""
    monkeypatch.setattr(tree_module, "MAX_MEMBERS", 1000)
    tree = MergedTree()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for i in range(1001):
            tf.addfile(_info(f"d/{i}"))
    scanner = TarScanner()
    entries = scanner.feed(buf.getvalue())
    with pytest.raises(UnsupportedImage, match="over 1,000 members"):
        for layer, e in enumerate(entries):
            tree.add(layer // 600, e)


@pytest.mark.parametrize(
    ("tags", "ref"),
    [([1, "x:1"], ""), ("app:v1-evil", "app:v1"), ([["a"]], "a"), ({"a": 1}, "a")],
)
def test_docker_archive_repo_tags_that_are_not_a_list_of_strings_are_invalid(
    tmp_path: Path, tags: object, ref: str
) -> None:
    """RepoTags [1, "x:1"]: the tags shown when none is named were sorted (TypeError, exit
    1); a string matched a tag by substring ("app:v1" chose "app:v1-evil")."""
    entries = [{"Config": "c.json", "Layers": [], "RepoTags": tags}] * 2
    path = tmp_path / "image.tar"
    with tarfile.open(path, "w") as tf:
        data = json.dumps(entries).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    archive = TarArchive(path)
    try:
        with pytest.raises(InvalidImage, match="RepoTags"):
            resolve_docker_archive(archive, ref=ref)
    finally:
        archive.close()


@pytest.mark.parametrize("history", [42, -1.5, True, "abc", {"a": 1}, [1, "x", None]])
def test_an_image_config_whose_history_is_no_list_of_entries_is_read(history: object) -> None:
    """history: 42 was a TypeError (exit 1); history is informational: it is ignored."""
    from spotstart.image import oci

    doc = {"rootfs": {"type": "layers", "diff_ids": []}, "history": history}
    assert oci.parse_config(doc, "config").history == ()
