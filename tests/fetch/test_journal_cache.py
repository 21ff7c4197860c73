"""The part file's journal and the destination's cache index."""

from __future__ import annotations

import os
from pathlib import Path

from spotstart.fetch.cache import CacheIndex
from spotstart.fetch.journal import JournalHeader, PartFile


def header(size: int = 100, version: str = "v1") -> JournalHeader:
    return JournalHeader("gs://b/k", size, version, 10)


def test_committed_chunks_survive_a_reopen_and_a_torn_last_line(tmp_path: Path) -> None:
    part = PartFile(tmp_path / "f", header(), fsync=False)
    assert part.open() == {}
    os.pwrite(part.fd, b"x" * 10, 0)
    part.commit({0: 0xDEAD, 3: 0xBEEF})
    part.close()
    with open(part.journal_path, "a") as f:
        f.write("7 0000")  # a crash mid-line
    again = PartFile(tmp_path / "f", header(), fsync=False)
    done = again.open()
    assert done == {0: 0xDEAD, 3: 0xBEEF}
    again.close()


def test_a_different_version_starts_over(tmp_path: Path) -> None:
    part = PartFile(tmp_path / "f", header(), fsync=False)
    part.open()
    part.commit({1: 1})
    part.close()
    other = PartFile(tmp_path / "f", header(version="v2"), fsync=False)
    assert other.open() == {}
    other.close()


def test_finish_renames_atomically_and_removes_the_journal(tmp_path: Path) -> None:
    part = PartFile(tmp_path / "d" / "f", header(size=3), fsync=True)
    part.open()
    os.pwrite(part.fd, b"abc", 0)
    part.finish()
    assert (tmp_path / "d" / "f").read_bytes() == b"abc"
    assert not part.part.exists() and not part.journal_path.exists()


def test_discard_leaves_nothing(tmp_path: Path) -> None:
    part = PartFile(tmp_path / "f", header(), fsync=False)
    part.open()
    part.discard()
    assert list(tmp_path.iterdir()) == []


def test_cache_index_matches_only_same_source_version_size_and_untouched_file(
    tmp_path: Path,
) -> None:
    f = tmp_path / "a"
    f.write_bytes(b"12345")
    idx = CacheIndex(tmp_path)
    idx.record("a", "gs://b/a", "g1", 5, f)
    idx.save()
    fresh = CacheIndex(tmp_path)
    assert fresh.is_current("a", "gs://b/a", "g1", 5, f)
    assert not fresh.is_current("a", "gs://b/a", "g2", 5, f)
    assert not fresh.is_current("a", "s3://b/a", "g1", 5, f)
    f.write_bytes(b"123456")
    assert not fresh.is_current("a", "gs://b/a", "g1", 5, f)


def test_corrupt_cache_index_is_ignored(tmp_path: Path) -> None:
    (tmp_path / ".spotstart").mkdir()
    (tmp_path / ".spotstart" / "index.json").write_text("{not json")
    assert CacheIndex(tmp_path).entries == {}
