"""Pure planning and decision logic of a fetch: chunk plans, chunk size, the concurrency
controller and the retry/backoff policy. No I/O, no clocks read: time is passed in."""

from __future__ import annotations

import fnmatch
import random
from collections.abc import Sequence
from dataclasses import dataclass

MiB = 1 << 20
DEFAULT_CHUNK = 16 * MiB
MIN_CHUNK = 4 * MiB


@dataclass(frozen=True)
class Chunk:
    """Bytes ``[start, start+length)`` of one object; ``index`` is its place in the plan."""

    index: int
    start: int
    length: int


def choose_chunk_bytes(size: int, concurrency: int, requested: int | None = None) -> int:
    """Chunk size for an object of ``size`` bytes.

    >>> choose_chunk_bytes(4 << 30, 8) // MiB
    16
    >>> choose_chunk_bytes(40 * MiB, 8) // MiB
    5
    """
    if requested is not None:
        if requested <= 0:
            raise ValueError("chunk_bytes must be positive")
        return requested
    # Small objects: split so one file alone still uses every stream, but never below 4 MiB
    # (below that the 30+ ms first-byte latency dominates a 50 MB/s stream).
    per_stream = -(-size // max(1, concurrency))
    return max(MIN_CHUNK, min(DEFAULT_CHUNK, per_stream))


def plan_chunks(size: int, chunk_bytes: int, boundaries: Sequence[int] = ()) -> list[Chunk]:
    """Cover ``[0, size)`` with chunks of at most ``chunk_bytes``, none straddling one of
    ``boundaries`` (offsets where a multipart upload's parts meet, so per-part checksums can be
    combined from per-chunk ones). A zero-byte object has no chunks.

    >>> [(c.start, c.length) for c in plan_chunks(10, 4, boundaries=(5,))]
    [(0, 4), (4, 1), (5, 4), (9, 1)]
    """
    if size < 0 or chunk_bytes <= 0:
        raise ValueError("size must be >= 0 and chunk_bytes > 0")
    cuts = sorted({b for b in boundaries if 0 < b < size} | {size})
    out: list[Chunk] = []
    start = 0
    for end in cuts:
        for at in range(start, end, chunk_bytes):
            out.append(Chunk(len(out), at, min(chunk_bytes, end - at)))
        start = end
    return out


def part_boundaries(parts: Sequence[int]) -> tuple[int, ...]:
    """Offsets where consecutive parts of the given sizes meet.

    >>> part_boundaries((5, 5, 2))
    (5, 10)
    """
    out, at = [], 0
    for n in parts[:-1]:
        at += n
        out.append(at)
    return tuple(out)


def select_keys(
    keys: list[str], prefix: str, include: tuple[str, ...], exclude: tuple[str, ...]
) -> list[tuple[str, str]]:
    """(key, path relative to the prefix) for each key the globs admit. Globs match the
    relative path or its base name (``*.json`` matches ``sub/config.json``), like rsync."""
    base = prefix if prefix.endswith("/") or not prefix else prefix + "/"
    out = []
    for key in keys:
        rel = key[len(base) :] if key.startswith(base) else key[len(prefix) :].lstrip("/")
        if not rel or key.endswith("/"):
            continue  # directory placeholder objects
        name = rel.rsplit("/", 1)[-1]

        def hit(pats: tuple[str, ...], rel: str = rel, name: str = name) -> bool:
            return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(name, p) for p in pats)

        if include and not hit(include):
            continue
        if exclude and hit(exclude):
            continue
        out.append((key, rel))
    return out


class ConcurrencyController:
    """Grows the number of streams while throughput grows (by half each step), stops when a
    step gains less than ``growth_threshold``, halves on throttling. Fed (time, bytes) by the
    scheduler every probe interval; never reads a clock."""

    def __init__(
        self,
        initial: int,
        maximum: int,
        *,
        growth_threshold: float = 0.08,
        interval_s: float = 0.5,
        fixed: bool = False,
    ) -> None:
        self.target = max(1, min(initial, maximum))
        self.maximum = maximum
        self.growth_threshold = growth_threshold
        self.interval_s = interval_s
        self.fixed = fixed
        self._growing = not fixed
        self._last_t: float | None = None
        self._last_bytes = 0
        self._rate_at_last_step = 0.0
        self._rates: list[float] = []

    def observe(self, now_s: float, bytes_done: int) -> int:
        """Account progress; returns the new target concurrency."""
        if self._last_t is None:
            self._last_t, self._last_bytes = now_s, bytes_done
            return self.target
        dt = now_s - self._last_t
        if dt < self.interval_s:
            return self.target
        rate = (bytes_done - self._last_bytes) / dt
        self._last_t, self._last_bytes = now_s, bytes_done
        self._rates.append(rate)
        if not self._growing or len(self._rates) < 2:
            return self.target
        # Judge a step on the best of the last two windows: one window is noisy.
        current = max(self._rates[-2:])
        if current > self._rate_at_last_step * (1 + self.growth_threshold):
            self._rate_at_last_step = current
            if self.target >= self.maximum:
                self._growing = False
            else:
                self.target = min(self.maximum, self.target + max(1, self.target // 2))
                self._rates.clear()
        else:
            self._growing = False
        return self.target

    def throttled(self) -> int:
        """A 429/503 was seen: back off multiplicatively and stop growing."""
        if not self.fixed:
            # Halve, but never below 4 streams (5-7 go to 4, not to 2-3).
            self.target = max(4, self.target // 2) if self.target > 4 else self.target
            self._growing = False
        return self.target


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff with full jitter (AWS architecture blog, "Exponential
    Backoff And Jitter"); a server's Retry-After wins when it asks for longer."""

    max_attempts: int = 8
    base_s: float = 0.2
    cap_s: float = 10.0

    def delay_s(
        self, attempt: int, rng: random.Random, retry_after_s: float | None = None
    ) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (``attempt`` counts from 1)."""
        ceiling = min(self.cap_s, self.base_s * (2 ** (attempt - 1)))
        delay = rng.uniform(0, ceiling)
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, self.cap_s * 6))
        return delay
