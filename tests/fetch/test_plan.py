"""The pure planning core: chunk plans, chunk sizes, key selection, concurrency, retries."""

from __future__ import annotations

import fnmatch
import posixpath
import random
from pathlib import PurePosixPath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spotstart.fetch.layout import normalize
from spotstart.fetch.plan import (
    DEFAULT_CHUNK,
    MIN_CHUNK,
    ConcurrencyController,
    RetryPolicy,
    choose_chunk_bytes,
    part_boundaries,
    plan_chunks,
    select_keys,
)


@given(size=st.integers(0, 1 << 40), chunk=st.integers(1, 1 << 30))
def test_plan_chunks_covers_every_byte_exactly_once(size: int, chunk: int) -> None:
    if size // chunk > 10_000:
        chunk = size // 10_000 + 1
    chunks = plan_chunks(size, chunk)
    pos = 0
    for i, c in enumerate(chunks):
        assert c.index == i
        assert c.start == pos
        assert 0 < c.length <= chunk
        pos += c.length
    assert pos == size


@given(
    size=st.integers(0, 1 << 20),
    chunk=st.integers(1, 1 << 18),
    cuts=st.lists(st.integers(-5, (1 << 20) + 5), max_size=8),
)
def test_aligned_plan_covers_every_byte_and_never_straddles_a_part_boundary(
    size: int, chunk: int, cuts: list[int]
) -> None:
    chunks = plan_chunks(size, max(chunk, size // 2000 + 1), boundaries=cuts)
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert sum(c.length for c in chunks) == size
    pos = 0
    for c in chunks:
        assert c.start == pos and c.length > 0
        assert not any(c.start < b < c.start + c.length for b in cuts)
        pos += c.length


def test_part_boundaries_are_cumulative_part_ends() -> None:
    assert part_boundaries((8, 8, 3)) == (8, 16)
    assert part_boundaries((5,)) == ()
    assert [(c.start, c.length) for c in plan_chunks(19, 6, part_boundaries((8, 8, 3)))] == [
        (0, 6),
        (6, 2),
        (8, 6),
        (14, 2),
        (16, 3),
    ]


def test_plan_chunks_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        plan_chunks(10, 0)
    with pytest.raises(ValueError):
        plan_chunks(-1, 10)


@given(size=st.integers(0, 1 << 40), conc=st.integers(1, 256))
def test_auto_chunk_size_stays_within_bounds(size: int, conc: int) -> None:
    assert MIN_CHUNK <= choose_chunk_bytes(size, conc) <= DEFAULT_CHUNK


def test_small_objects_get_smaller_chunks_so_one_file_uses_every_stream() -> None:
    assert choose_chunk_bytes(64 << 20, 16) == 4 << 20
    assert choose_chunk_bytes(4 << 30, 16) == DEFAULT_CHUNK
    assert choose_chunk_bytes(4 << 30, 16, requested=1 << 20) == 1 << 20


def test_select_keys_applies_globs_to_relative_paths_and_base_names() -> None:
    keys = ["m/a.safetensors", "m/sub/b.safetensors", "m/config.json", "m/README.md", "m/dir/"]
    got = select_keys(keys, "m/", ("*.safetensors", "*.json"), ())
    assert got == [
        ("m/a.safetensors", "a.safetensors"),
        ("m/sub/b.safetensors", "sub/b.safetensors"),
        ("m/config.json", "config.json"),
    ]
    got = select_keys(keys, "m/", (), ("sub/*", "*.md"))
    assert [rel for _, rel in got] == ["a.safetensors", "config.json"]


@pytest.mark.parametrize("bad", ["../x", "a/../../x", "", "/", "./.."])
def test_keys_that_would_escape_dest_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        normalize(bad)


def test_normalize_drops_harmless_empty_and_dot_segments() -> None:
    assert normalize("/a//b/./c") == "a/b/c"


def test_controller_grows_while_throughput_grows_and_stops_on_plateau() -> None:
    c = ConcurrencyController(8, 64, growth_threshold=0.08, interval_s=0.5)
    t, done = 0.0, 0
    c.observe(t, done)
    rate_per_stream = 50e6
    targets = []
    for _ in range(20):
        t += 0.5
        done += int(min(c.target * rate_per_stream, 600e6) * 0.5)  # link caps at 600 MB/s
        targets.append(c.observe(t, done))
    assert targets[-1] > 8  # grew past the start
    assert targets[-1] == targets[-5]  # and settled once more streams stopped paying
    assert targets[-1] <= 64


def test_controller_halves_on_throttling_and_stops_growing() -> None:
    c = ConcurrencyController(16, 64)
    assert c.throttled() == 8
    t, done = 0.0, 0
    for _ in range(10):
        t += 1
        done += int(1e9 * t)
        c.observe(t, done)
    assert c.target == 8


def test_fixed_concurrency_never_changes() -> None:
    c = ConcurrencyController(4, 4, fixed=True)
    for i in range(10):
        c.observe(float(i), i * 10**9 * (i + 1))
    assert c.throttled() == 4


@given(attempt=st.integers(1, 30), seed=st.integers(0, 1000))
def test_backoff_is_bounded_with_full_jitter(attempt: int, seed: int) -> None:
    p = RetryPolicy(max_attempts=8, base_s=0.2, cap_s=10.0)
    d = p.delay_s(attempt, random.Random(seed))
    assert 0 <= d <= min(10.0, 0.2 * 2 ** (attempt - 1))


def test_retry_after_is_honoured_but_bounded() -> None:
    p = RetryPolicy(base_s=0.1, cap_s=2.0)
    assert p.delay_s(1, random.Random(1), retry_after_s=5.0) == 5.0
    assert p.delay_s(1, random.Random(1), retry_after_s=1e6) == 12.0


@given(rel=st.text(alphabet="ab./\\", max_size=24))
def test_any_key_maps_inside_dest_or_is_refused(rel: str) -> None:
    try:
        out = normalize(rel)
    except ValueError:
        return
    parts = out.split("/")
    assert not out.startswith("/")
    assert all(p not in ("", ".", "..") for p in parts)
    dest = PurePosixPath("/dest")
    assert posixpath.normpath(dest / out).startswith("/dest/")


@pytest.mark.parametrize("bad", ["/../etc/passwd", "a/b/../../../c", "..", "./"])
def test_absolute_and_parent_escapes_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match=r"DEST|names no file"):
        normalize(bad)


KEY = st.text(alphabet="ab/.xyz", min_size=1, max_size=12)


@given(
    keys=st.lists(KEY, max_size=20, unique=True),
    include=st.lists(st.sampled_from(["*.x", "a*", "*/*", "b"]), max_size=2),
    exclude=st.lists(st.sampled_from(["*.y", "z*", "a/*"]), max_size=2),
)
def test_select_keys_keeps_only_admitted_keys_under_the_prefix(
    keys: list[str], include: list[str], exclude: list[str]
) -> None:
    prefix = "p/"
    full = [prefix + k for k in keys] + ["other/" + k for k in keys]
    got = select_keys([k for k in full if k.startswith(prefix)], prefix, tuple(include), ())
    got_ex = select_keys([k for k in full if k.startswith(prefix)], prefix, (), tuple(exclude))
    for key, rel in got + got_ex:
        assert key == prefix + rel and rel and not key.endswith("/")
    for _key, rel in got:
        name = rel.rsplit("/", 1)[-1]
        assert not include or any(
            fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(name, p) for p in include
        )
    for _key, rel in got_ex:
        name = rel.rsplit("/", 1)[-1]
        assert not any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(name, p) for p in exclude)
    # Nothing admitted is lost: without filters every non-directory key comes back.
    everything = select_keys([prefix + k for k in keys], prefix, (), ())
    assert [k for k, _ in everything] == [prefix + k for k in keys if not k.endswith("/")]


def test_directory_placeholders_and_the_prefix_itself_are_skipped() -> None:
    assert select_keys(["m/", "m/d/", "m/d/x"], "m/", (), ()) == [("m/d/x", "d/x")]


@given(
    steps=st.lists(
        st.tuples(st.floats(0.0, 2.0), st.integers(0, 10**9), st.booleans()), max_size=40
    ),
    initial=st.integers(1, 64),
    maximum=st.integers(1, 64),
)
def test_controller_target_stays_between_one_and_the_maximum(
    steps: list[tuple[float, int, bool]], initial: int, maximum: int
) -> None:
    c = ConcurrencyController(initial, maximum)
    t, done = 0.0, 0
    for dt, nbytes, throttle in steps:
        t += dt
        done += nbytes
        before = c.target
        now = c.throttled() if throttle else c.observe(t, done)
        assert 1 <= now <= maximum
        if throttle:
            assert now <= before


def test_controller_uses_injected_time_and_ignores_windows_shorter_than_the_interval() -> None:
    c = ConcurrencyController(8, 64, interval_s=0.5)
    c.observe(100.0, 0)
    assert c.observe(100.1, 10**12) == 8  # too short a window to judge
    assert c.observe(100.2, 2 * 10**12) == 8


@given(retry_after=st.floats(0, 1000), attempt=st.integers(1, 20), seed=st.integers(0, 99))
def test_retry_after_is_a_floor_capped_at_six_backoff_ceilings(
    retry_after: float, attempt: int, seed: int
) -> None:
    p = RetryPolicy(base_s=0.1, cap_s=2.0)
    d = p.delay_s(attempt, random.Random(seed), retry_after_s=retry_after)
    assert min(retry_after, 12.0) <= d <= max(min(retry_after, 12.0), 2.0)


@given(target=st.integers(1, 64), bursts=st.integers(1, 8))
def test_throttling_halves_down_to_a_floor_of_four_streams(target: int, bursts: int) -> None:
    c = ConcurrencyController(target, 64)
    for _ in range(bursts):
        before = c.target
        after = c.throttled()
        assert after == (before if before <= 4 else max(4, before // 2))
    assert c.target >= min(target, 4)
