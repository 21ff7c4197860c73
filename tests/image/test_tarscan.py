"""The header-only tar reader against Python's tarfile on generated archives (ustar, GNU and
pax; long names and link targets; any chunking), and against broken streams."""

from __future__ import annotations

import io
import tarfile

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spotstart.errors import InvalidImage
from spotstart.image.tarscan import TarScanner

_name = st.text(alphabet="abcdefghij_.-é", min_size=1, max_size=40)
_path = st.lists(_name, min_size=1, max_size=8).map("/".join).filter(lambda p: p not in (".", ".."))
_member = st.tuples(
    _path, st.sampled_from(["file", "dir", "symlink", "hardlink"]), st.integers(0, 3000), _path
)


def _archive(members: list[tuple[str, str, int, str]], fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, kind, size, target in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = size
                tf.addfile(info, io.BytesIO(b"x" * size))
            else:
                info.type = {
                    "dir": tarfile.DIRTYPE,
                    "symlink": tarfile.SYMTYPE,
                    "hardlink": tarfile.LNKTYPE,
                }[kind]
                info.linkname = target if kind != "dir" else ""
                tf.addfile(info)
    return buf.getvalue()


def _scan(data: bytes, cuts: list[int]) -> list[tuple[str, str, int, str]]:
    scanner = TarScanner()
    out = []
    pos = 0
    for cut in [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]:
        out += scanner.feed(data[pos:cut])
        pos = cut
    scanner.close()
    assert scanner.ended
    return [(e.name, e.kind, e.size, e.linkname) for e in out]


@given(
    members=st.lists(_member, max_size=12),
    fmt=st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]),
    cuts=st.lists(st.integers(0, 1 << 20), max_size=6),
)
def test_reads_what_tarfile_reads_in_any_chunking(
    members: list[tuple[str, str, int, str]], fmt: int, cuts: list[int]
) -> None:
    # long names (> 100 bytes) take the GNU ././@LongLink or pax path records
    members = [
        (("deep/" * 30) + n if i % 3 == 0 else n, k, s, t) for i, (n, k, s, t) in enumerate(members)
    ]
    data = _archive(members, fmt)
    expected = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        for m in tf.getmembers():
            kind = (
                "dir"
                if m.isdir()
                else "symlink"
                if m.issym()
                else "hardlink"
                if m.islnk()
                else "file"
            )
            expected.append((m.name, kind, m.size if kind == "file" else 0, m.linkname))
    assert _scan(data, cuts) == expected


def test_a_stream_cut_inside_a_member_is_truncated() -> None:
    data = _archive([("a.bin", "file", 5000, "")], tarfile.PAX_FORMAT)
    scanner = TarScanner()
    scanner.feed(data[:2000])
    with pytest.raises(InvalidImage, match="truncated"):
        scanner.close()


def test_a_corrupt_header_is_refused() -> None:
    data = bytearray(_archive([("a.bin", "file", 10, "")], tarfile.USTAR_FORMAT))
    data[5] ^= 0xFF
    with pytest.raises(InvalidImage, match="checksum"):
        TarScanner().feed(bytes(data))
