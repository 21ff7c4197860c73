"""The pure planning core: chunk plans, chunk sizes, key selection, concurrency, retries."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spotstart.fetch.plan import (
    DEFAULT_CHUNK,
    MIN_CHUNK,
    ConcurrencyController,
    RetryPolicy,
    choose_chunk_bytes,
    plan_chunks,
    safe_relative_path,
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
        safe_relative_path(bad)


def test_safe_relative_path_normalises_harmless_forms() -> None:
    assert safe_relative_path("/a//b/./c") == "a/b/c"


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
    assert not p.should_retry(p.max_attempts)
    assert p.should_retry(p.max_attempts - 1)
