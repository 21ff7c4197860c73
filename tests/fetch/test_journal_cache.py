"""The part file's journal and the destination's cache index."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
    assert [p for p in tmp_path.rglob("*") if not p.is_dir()] == []


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


def test_a_line_torn_by_a_crash_is_not_spliced_onto_the_next_record(tmp_path: Path) -> None:
    part = PartFile(tmp_path / "f", header(size=200), fsync=False)
    part.open()
    part.commit({0: 0xAAAAAAAA})
    part.close()
    with open(part.journal_path, "a") as f:
        f.write("1")  # the first byte of "12 ...": the process died here
    resumed = PartFile(tmp_path / "f", header(size=200), fsync=False)
    assert resumed.open() == {0: 0xAAAAAAAA}
    resumed.commit({5: 0x0BADF00D})
    resumed.close()
    # Not "15 0badf00d": chunk 15 was never written and must not be trusted.
    again = PartFile(tmp_path / "f", header(size=200), fsync=False)
    assert again.open() == {0: 0xAAAAAAAA, 5: 0x0BADF00D}
    again.close()


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    before=st.dictionaries(st.integers(0, 999), st.integers(0, 2**32 - 1), max_size=20),
    after=st.dictionaries(st.integers(0, 999), st.integers(0, 2**32 - 1), max_size=20),
    torn=st.tuples(st.integers(0, 999), st.integers(0, 2**32 - 1), st.integers(0, 10)),
)
def test_resume_after_any_torn_write_trusts_exactly_the_committed_chunks(
    tmp_path_factory: pytest.TempPathFactory,
    before: dict[int, int],
    after: dict[int, int],
    torn: tuple[int, int, int],
) -> None:
    d = tmp_path_factory.mktemp("j")
    part = PartFile(d / "f", header(size=10_000), fsync=False)
    part.open()
    part.commit(before)
    part.close()
    index, crc, cut = torn
    line = f"{index} {crc:08x}\n"
    with open(part.journal_path, "a") as f:
        f.write(line[: min(cut, len(line) - 1)])  # any strict prefix of a record
    resumed = PartFile(d / "f", header(size=10_000), fsync=False)
    assert resumed.open() == before
    resumed.commit(after)
    resumed.close()
    again = PartFile(d / "f", header(size=10_000), fsync=False)
    assert again.open() == {**before, **after}
    again.close()


def test_journal_of_a_part_file_with_the_wrong_size_starts_over(tmp_path: Path) -> None:
    part = PartFile(tmp_path / "f", header(size=100), fsync=False)
    part.open()
    part.commit({0: 1, 1: 2})
    part.close()
    os.truncate(part.part, 50)  # the part file is not what the journal describes
    again = PartFile(tmp_path / "f", header(size=100), fsync=False)
    assert again.open() == {}
    assert again.part.stat().st_size == 100
    again.close()


def test_cache_entries_survive_a_reload_and_a_missing_file_is_not_current(
    tmp_path: Path,
) -> None:
    for name in ("a", "b"):
        (tmp_path / name).write_bytes(name.encode())
    idx = CacheIndex(tmp_path)
    idx.record("a", "s3://b/a", "e1", 1, tmp_path / "a")
    idx.record("b", "s3://b/b", "e2", 1, tmp_path / "b")
    idx.save()
    (tmp_path / "b").unlink()
    fresh = CacheIndex(tmp_path)
    assert set(fresh.entries) == {"a", "b"}
    assert fresh.is_current("a", "s3://b/a", "e1", 1, tmp_path / "a")
    assert not fresh.is_current("b", "s3://b/b", "e2", 1, tmp_path / "b")
    assert not list((tmp_path / ".spotstart").glob("*.tmp"))


def test_state_files_naming_a_url_with_a_query_are_readable_by_us_alone(tmp_path: Path) -> None:
    """A presigned URL's query string is a credential: the journal and the index that record
    it are 0600; plain URLs stay readable by all, as the files in DEST are."""
    signed = JournalHeader("https://h/m.bin?X-Amz-Signature=SECRET", 100, "v1", 10)
    part = PartFile(tmp_path / "s", signed, fsync=False)
    part.open()
    assert os.stat(part.journal_path).st_mode & 0o777 == 0o600
    part.close()
    plain = PartFile(tmp_path / "p", header(), fsync=False)
    plain.open()
    assert os.stat(plain.journal_path).st_mode & 0o777 == 0o644
    plain.close()
    index = CacheIndex(tmp_path)
    (tmp_path / "p2").write_bytes(b"x")
    index.record("p2", "gs://b/p2", "v1", 1, tmp_path / "p2")
    index.save()
    assert os.stat(index.path).st_mode & 0o777 == 0o644
    (tmp_path / "s2").write_bytes(b"x")
    index.record("s2", "https://h/s2?sig=SECRET", "v1", 1, tmp_path / "s2")
    index.save()
    assert os.stat(index.path).st_mode & 0o777 == 0o600


def test_a_presigned_url_fetched_leaves_no_world_readable_copy_of_its_signature(
    tmp_path: Path, nginx: object
) -> None:
    import spotstart

    endpoint = nginx.endpoint  # type: ignore[attr-defined]
    nginx.seed({"signed/m.bin": os.urandom(3 << 20)})  # type: ignore[attr-defined]
    dest = tmp_path / "dest"
    spotstart.fetch(f"{endpoint}/signed/m.bin?X-Amz-Signature=SECRET", str(dest))
    holding = [
        p for p in (dest / ".spotstart").rglob("*") if p.is_file() and b"SECRET" in p.read_bytes()
    ]
    assert holding  # the index records the URL it was fetched from
    for path in holding:
        assert os.stat(path).st_mode & 0o077 == 0, path
