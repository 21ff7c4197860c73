"""A link planted under every directory fetch writes to never receives a byte: DEST's state
directory, its parts directory, a part file's or journal's name, the index, a model
subdirectory, the final name. Each either fails with one line (exit 8) or goes on without
following the link; a victim outside DEST stays as it was. The in-process cases run with both
of safefs's resolvers (openat2 and the O_NOFOLLOW walk).

tmp_path is no sticky world-writable directory, so fs.protected_symlinks (which guards only
those) does not hide a followed link, as root (CI) or not."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from spotstart import FetchConfig, fetch
from spotstart.errors import UnsafePath
from spotstart.fetch.journal import JournalHeader, PartFile
from spotstart.fetch.layout import work_paths
from tests.conftest import error_line, run_cli
from tests.test_safefs import resolver  # noqa: F401 - the fixture both resolvers run under

MiB = 1 << 20
SMALL = FetchConfig(chunk_bytes=MiB)
TREE = {
    "m.safetensors": os.urandom(3 * MiB + 7),
    "sub/extra.bin": os.urandom(1000),
}


@pytest.fixture
def src(tmp_path: Path) -> Path:
    s = tmp_path / "src"
    for rel, data in TREE.items():
        (s / rel).parent.mkdir(parents=True, exist_ok=True)
        (s / rel).write_bytes(data)
    return s


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    o = tmp_path / "outside"
    o.mkdir()
    (o / "victim").write_bytes(b"precious")
    return o


def _untouched(outside: Path) -> None:
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]
    assert (outside / "victim").read_bytes() == b"precious"


def _fetched(dest: Path) -> None:
    for rel, data in TREE.items():
        got = (dest / rel).read_bytes()
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), rel


@pytest.mark.parametrize("where", [".spotstart", ".spotstart/parts"])
def test_a_state_directory_that_is_a_link_is_refused_in_one_line(
    resolver: str,  # noqa: F811
    tmp_path: Path,
    src: Path,
    outside: Path,
    where: str,
) -> None:
    dest = tmp_path / "dest"
    (dest / where).parent.mkdir(parents=True, exist_ok=True)
    os.symlink(outside, dest / where)
    with pytest.raises(UnsafePath, match="symlink"):
        fetch(str(src), dest, SMALL)
    _untouched(outside)


def test_the_cli_says_so_in_one_line_and_exits_8(tmp_path: Path, src: Path, outside: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    os.symlink(outside, dest / ".spotstart")
    res = run_cli(["fetch", str(src), str(dest)])
    assert res.code == UnsafePath.exit_code == 8, res.stderr
    line = error_line(res.stderr)
    assert ".spotstart" in line and "symlink" in line
    _untouched(outside)


def test_a_state_directory_others_can_write_is_refused(
    resolver: str,  # noqa: F811
    tmp_path: Path,
    src: Path,
) -> None:
    dest = tmp_path / "dest"
    (dest / ".spotstart").mkdir(parents=True)
    os.chmod(dest / ".spotstart", 0o777)
    with pytest.raises(UnsafePath, match="writable by group or others"):
        fetch(str(src), dest, SMALL)


def test_links_at_part_journal_and_index_names_are_replaced_never_followed(
    resolver: str,  # noqa: F811
    tmp_path: Path,
    src: Path,
    outside: Path,
) -> None:
    dest = tmp_path / "dest"
    (dest / ".spotstart" / "parts").mkdir(parents=True)
    for rel in TREE:
        for name in work_paths(dest, rel):
            os.symlink(outside / "victim", name)
    os.symlink(outside / "victim", dest / ".spotstart" / "index.json")
    report = fetch(str(src), dest, SMALL)
    assert report.bytes_total == sum(len(v) for v in TREE.values())
    _fetched(dest)
    _untouched(outside)
    assert not (dest / ".spotstart" / "index.json").is_symlink()
    assert fetch(str(src), dest, SMALL).bytes_cached == report.bytes_total  # the index holds


def test_a_link_at_the_final_name_is_replaced_by_the_file_not_written_through(
    resolver: str,  # noqa: F811
    tmp_path: Path,
    src: Path,
    outside: Path,
) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    os.symlink(outside / "victim", dest / "m.safetensors")
    fetch(str(src), dest, SMALL)
    _fetched(dest)
    assert not (dest / "m.safetensors").is_symlink()
    _untouched(outside)


def test_a_model_subdirectory_that_is_a_link_is_refused(
    resolver: str,  # noqa: F811
    tmp_path: Path,
    src: Path,
    outside: Path,
) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    os.symlink(outside, dest / "sub")
    res = run_cli(["fetch", str(src), str(dest)])
    assert res.code == 8 and "sub" in error_line(res.stderr), res.stderr
    # Planted after fetch checked DEST (a race): the part file itself refuses it.
    part = PartFile(
        dest / "sub" / "extra.bin",
        JournalHeader("file:///src/sub/extra.bin", 10, "v1", 10),
        fsync=False,
        work=work_paths(dest, "sub/extra.bin"),
    )
    with pytest.raises(UnsafePath, match="symlink"):
        part.open()
    _untouched(outside)


def test_a_directory_swapped_for_a_link_after_open_does_not_redirect_the_rename(
    resolver: str,  # noqa: F811
    tmp_path: Path,
    outside: Path,
) -> None:
    dest = tmp_path / "dest"
    final = dest / "sub" / "victim"
    part = PartFile(
        final, JournalHeader("x", 3, "v1", 3), fsync=True, work=work_paths(dest, "sub/victim")
    )
    part.open()
    os.pwrite(part.fd, b"new", 0)
    os.rename(dest / "sub", dest / "moved")
    os.symlink(outside, dest / "sub")
    part.finish()
    assert (dest / "moved" / "victim").read_bytes() == b"new"
    _untouched(outside)


def test_dest_itself_may_be_the_users_link_and_a_rerun_resumes_and_caches(
    resolver: str,  # noqa: F811
    tmp_path: Path,
    src: Path,
) -> None:
    real = tmp_path / "disk1"
    real.mkdir()
    os.symlink(real, tmp_path / "models")  # /nvme/models -> /mnt/disk1
    report = fetch(str(src), tmp_path / "models", SMALL)
    _fetched(real)
    again = fetch(str(src), tmp_path / "models", SMALL)
    assert again.bytes_cached == report.bytes_total
