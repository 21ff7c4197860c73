"""Object names are untrusted: each lands on a path of its own inside DEST, never on one of
spotstart's working files, or the whole set is refused before any byte moves."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spotstart import FetchConfig, fetch
from spotstart.errors import LocalIOError, NotFound, UsageError
from spotstart.fetch import Concurrency, NullProgress
from spotstart.fetch.engine import Fetcher
from spotstart.fetch.layout import NAME_MAX_BYTES, STATE_DIR, place
from spotstart.fetch.plan import select_keys
from spotstart.store import StorageURL
from spotstart.store.memory import MemorySource
from tests.conftest import Store, error_line, run_cli

SMALL = FetchConfig(chunk_bytes=1 << 20, concurrency=Concurrency(streams=4))


def files_outside_state(root: Path) -> dict[str, bytes]:
    if not root.exists():
        return {}
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.relative_to(root).parts[0] != STATE_DIR
    }


# (fake-gcs-server and s3rver keep objects as files and cannot hold some of these names)
@pytest.mark.parametrize("store", ["seaweedfs", "moto", "gcp-storage-emulator"], indirect=True)
def test_names_like_our_working_files_are_just_objects(store: Store, tmp_path: Path) -> None:
    # Before: m.bin.spotstart.part was taken for m.bin's part file (wrong bytes, exit 0) and
    # x.spotstart.journal for x's journal. Now our files live where no name reaches.
    p = f"work-{store.name}"
    objects = {
        "m.bin": b"model" * 50_000,
        "m.bin.spotstart.part": b"not a part file" * 1000,
        "m.bin.spotstart.journal": b'{"source": "evil"}\n0 deadbeef\n',
        "x.spotstart.journal": b"journal-looking object",
        "spotstart/index.json": b'{"files": {}}',
        "a" * 250: b"a 250-character name",
    }
    store.seed({f"{p}/{k}": v for k, v in objects.items()})
    fetch(store.url(f"{p}/"), tmp_path, SMALL)
    assert files_outside_state(tmp_path) == objects
    again = fetch(store.url(f"{p}/"), tmp_path, SMALL)
    assert again.files_cached == len(objects)


BAD_NAMES = [
    ({".spotstart/index.json": b"{}", "ok.bin": b"x"}, "spotstart keeps its own files"),
    ({"x": b"file", "x/y": b"under it"}, "needs x/ to be a directory"),
    ({"b" * (NAME_MAX_BYTES + 1): b"x", "ok.bin": b"x"}, "longer than 255 bytes"),
    ({"d/../../escape": b"x", "ok.bin": b"x"}, "escape DEST"),
]


# moto keeps every key as given; gcp-storage-emulator too, except that it falls over on '..'
@pytest.mark.parametrize(
    ("store", "names", "needle"),
    [("moto", n, w) for n, w in BAD_NAMES]
    + [("gcp-storage-emulator", n, w) for n, w in BAD_NAMES if "escape" not in w],
    indirect=["store"],
)
def test_unrepresentable_or_colliding_names_are_refused_before_any_byte(
    store: Store, tmp_path: Path, names: dict[str, bytes], needle: str
) -> None:
    p = f"bad-{store.name}-{hashlib.sha1(repr(names).encode()).hexdigest()[:8]}"
    store.seed({f"{p}/{k}": v for k, v in names.items()})
    res = run_cli(["fetch", store.url(f"{p}/"), str(tmp_path / "d")], store.env)
    assert res.code == UsageError.exit_code, res.stderr
    assert needle in error_line(res.stderr) and "nothing was fetched" in res.stderr
    assert files_outside_state(tmp_path / "d") == {}
    assert not (tmp_path / "d" / STATE_DIR / "parts").exists()


def test_a_directory_in_dest_where_a_file_goes_is_refused_up_front(tmp_path: Path) -> None:
    dest = tmp_path / "d"
    (dest / "a.bin").mkdir(parents=True)
    source = MemorySource({"m/a.bin": b"x" * 10, "m/b.bin": b"y" * 10})
    fetcher = Fetcher(source, StorageURL("gs", "bkt", "m/"), dest, SMALL, NullProgress())
    with pytest.raises(LocalIOError, match="exists and is a directory"):
        asyncio.run(fetcher.run())
    assert files_outside_state(dest) == {}


NAME = st.lists(
    st.sampled_from(["a", "b", ".", "..", "", ".spotstart", "é", "x" * 254, "y" * 256, "c.part"]),
    min_size=1,
    max_size=4,
).map("/".join)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(NAME, min_size=1, max_size=6, unique=True))
def test_any_name_set_is_fetched_one_to_one_or_refused_whole(
    names: list[str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    objects = {f"m/{n}": hashlib.sha256(n.encode()).digest() * 3 for n in names}
    dest = tmp_path_factory.mktemp("names")
    fetcher = Fetcher(
        MemorySource(objects), StorageURL("gs", "bkt", "m/"), dest, SMALL, NullProgress()
    )
    selected = select_keys(sorted(objects), "m/", (), ())  # "m/a/" is a directory marker
    try:
        placements = place(selected)
    except ValueError:
        placements = None
    try:
        asyncio.run(fetcher.run())
    except NotFound:
        assert selected == []  # only directory markers: nothing to fetch
        return
    except UsageError:
        assert placements is None  # refused exactly when the names cannot be placed
        assert files_outside_state(dest) == {}  # and nothing was written
        return
    assert placements is not None
    got = files_outside_state(dest)
    want = {p.rel: objects[p.key] for p in placements}
    assert got == want  # every object at its own path, right bytes, nothing else
    for rel in got:
        assert (dest / rel).resolve().is_relative_to(dest.resolve())
