"""How a fleet of nodes shares one model: the decisions of peer fetch, with no I/O and no
clock of their own (time is passed in), so that the real fetch (:mod:`spotstart.fetch.peers`,
:mod:`spotstart.fetch.scheduler`, :mod:`spotstart.fetch.peer_server`) and the fleet
simulation (``bench/peers/sim.py``) run the same code.

- :class:`PollBackoff`: how long until a peer's inventory is asked for again (doubling while
  it does not change, back to the base when it does).
- :func:`sample_peers`: the bounded set of peers one node polls, out of every address the
  fleet's name resolves to: the ones still useful kept, the rest drawn at random, so that
  control traffic per node does not grow with the fleet.
- :class:`HashRing`: which node of the fleet fetches a chunk from the origin first
  (single-flight): consistent hashing of chunk keys onto node addresses, each node placed at
  ``vnodes`` points (64: the busiest node owns ~1.2-1.5x the mean share), so a node joining
  or leaving moves only its share of chunks.
- :class:`ChunkPicker`: which chunk a free stream takes next and from where: first the
  chunks of this node's share of the ring that no known peer holds yet, from the origin
  (every other node waits on them: owners first cut the waits that run out, measured in the
  simulation: origin 1.93x -> 1.33x the model at N = 16, 12.8x -> 2.1x at N = 64); then
  chunks some known peer holds, the rarest first (BitTorrent's rarest-first: the fleet
  gains new holders of scarce chunks fastest); a chunk owned by another node is left to it
  for up to ``wait_s`` and taken from the origin after that (an owner that is slow, dead or
  unknown costs a bounded wait).
- :class:`TokenBucket`: the pace of what a peer serves (its uplink is shared with its own
  fetch and with every node asking it).
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import random
from collections.abc import Callable, Collection, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass
class PollBackoff:
    """Seconds until the next inventory request to one peer: ``base_s`` after a change,
    doubled after each answer that changed nothing, at most ``max_s``.

    >>> b = PollBackoff(1.0, 8.0)
    >>> [b.next(changed) for changed in (True, False, False, False, False, True)]
    [1.0, 2.0, 4.0, 8.0, 8.0, 1.0]
    """

    base_s: float = 1.0
    max_s: float = 8.0
    current_s: float = 0.0

    def next(self, changed: bool) -> float:
        if changed or self.current_s <= 0:
            self.current_s = self.base_s
        else:
            self.current_s = min(self.max_s, self.current_s * 2)
        return self.current_s


def sample_peers(
    addresses: Sequence[str],
    keep: Collection[str],
    k: int,
    rng: random.Random,
    exclude: Collection[str] = (),
) -> list[str]:
    """At most ``k`` peers to poll: those of ``keep`` still among ``addresses`` (and not in
    ``exclude``: dropped, ourselves), then others drawn uniformly at random. Each node draws
    its own, so the fleet's polls spread over every node instead of all landing on the first
    addresses a name resolves to.

    >>> sample_peers(["a", "b", "c", "d"], keep=["c"], k=2, rng=random.Random(1))[0]
    'c'
    """
    present = set(addresses)
    out = [a for a in dict.fromkeys(keep) if a in present and a not in exclude][:k]
    chosen = set(out)
    rest = [a for a in dict.fromkeys(addresses) if a not in chosen and a not in exclude]
    out.extend(rng.sample(rest, min(len(rest), k - len(out))))
    return out


def _point(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


@functools.lru_cache(maxsize=8192)
def _node_points(node: str, vnodes: int) -> tuple[int, ...]:
    """A node's points on the ring (cached: a fleet that changes by one node re-hashes one)."""
    return tuple(_point(f"{node}#{v}") for v in range(vnodes))


MAX_RING_POINTS = 1 << 14  # 64 points per node up to 256 nodes, fewer beyond


class HashRing:
    """Consistent hashing of keys onto ``nodes`` (addresses), ``vnodes`` points per node.

    >>> ring = HashRing(["10.0.0.1:8471", "10.0.0.2:8471"])
    >>> ring.owner("a\\x000") in ("10.0.0.1:8471", "10.0.0.2:8471")
    True
    >>> HashRing([]).owner("x") is None
    True
    """

    def __init__(self, nodes: Iterable[str], vnodes: int = 64) -> None:
        self.nodes = frozenset(nodes)
        # At most MAX_RING_POINTS points whatever the fleet's size: the ring is built on the
        # fetch's event loop each time the fleet changes (a peer dropped, a name resolving
        # anew), and 4,096 nodes x 64 points cost ~1-1.6 s of CPU a build. Past 256 nodes
        # each node's share is a few chunks of a model, so fewer points per node do.
        vnodes = max(1, min(vnodes, MAX_RING_POINTS // max(1, len(self.nodes))))
        points = sorted((p, n) for n in self.nodes for p in _node_points(n, vnodes))
        self._keys = [p for p, _ in points]
        self._owners = [n for _, n in points]

    def owner(self, key: str) -> str | None:
        if not self._keys:
            return None
        i = bisect.bisect(self._keys, _point(key)) % len(self._keys)
        return self._owners[i]


Source = Literal["peer", "origin"]


@dataclass(frozen=True)
class Pick(Generic[K]):
    """Take chunk ``key`` from ``source``."""

    key: K
    source: Source


class ChunkPicker(Generic[K]):
    """The order of one node's chunks. ``keys``: every chunk still to fetch, in file order;
    ``ring_key(key)``: the chunk's name on the ring (the same on every node: object id and
    chunk index). A stream asks :meth:`next`; a chunk handed out is the caller's until it
    calls :meth:`done` (landed) or :meth:`put_back` (failed: offered again).

    ``window``: how many remaining chunks (from the front, in file order) one pick looks at:
    bounds the cost of a pick (each looks up its holders) whatever the model's size.

    ``max_stall_s`` (default twice ``wait_s``): the most time, all such stalls of the run
    together, that :meth:`next` has nothing to hand out and then hands out a chunk whose
    wait ran out (its owner never delivered: the stall was wasted); after that nothing more
    is left to anyone. A stall that ends with a chunk some peer came to hold is the swarm
    working, and costs nothing. Each chunk's wait starts when it enters the window, so a
    fleet of many owners that never fetch (a name resolving to thousands of hosts) would
    otherwise cost a wait per window of chunks, one after another."""

    def __init__(
        self,
        me: str,
        keys: Iterable[K],
        ring_key: Callable[[K], str],
        *,
        wait_s: float = 10.0,
        window: int = 256,
        rng: random.Random | None = None,
        max_stall_s: float | None = None,
    ) -> None:
        self.me = me
        self.ring_key = ring_key
        self.wait_s = wait_s
        self.max_stall_s = 2 * wait_s if max_stall_s is None else max_stall_s
        self.stalled_s = 0.0  # wasted stalls: ended by a wait that ran out, together
        self._stalled_at: float | None = None  # when the current stall began
        self.window = window
        self.rng = rng or random.Random()
        self._todo: dict[K, None] = dict.fromkeys(keys)  # insertion order: file order
        self._deferred: dict[K, float] = {}  # chunk -> when it was first left to its owner
        self._ring = HashRing([me])
        self._owners: dict[K, str | None] = {}

    def __len__(self) -> int:
        return len(self._todo)

    def add(self, keys: Iterable[K]) -> None:
        """More chunks to fetch, behind those already there (file order)."""
        self._todo.update(dict.fromkeys(keys))

    def set_fleet(self, nodes: Iterable[str]) -> bool:
        """The nodes that share the origin's work (every address the fleet's name resolves
        to, ourselves included); True when that changed the ring (an unchanged set keeps the
        cached owners)."""
        fleet = frozenset(nodes) | {self.me}
        return fleet != self._ring.nodes and self.set_ring(HashRing(fleet))

    def set_ring(self, ring: HashRing) -> bool:
        """A ring built elsewhere (one shared by many pickers: the simulation); True when its
        nodes differ from the current ring's (the cached owners are then dropped)."""
        if ring is self._ring or ring.nodes == self._ring.nodes:
            return False
        self._ring = ring
        self._owners = {}
        return True

    def owner(self, key: K) -> str | None:
        """The node whose share of the origin's reads ``key`` is (cached per ring)."""
        if key not in self._owners:
            self._owners[key] = self._ring.owner(self.ring_key(key))
        return self._owners[key]

    def owns(self, key: K) -> bool:
        """Whether ``key`` is ours to read from the origin without waiting (a subclass may
        widen this: chunks the swarm does not order, owners not worth waiting for)."""
        return self.owner(key) == self.me

    def next(self, now: float, holders: Callable[[K], int]) -> Pick[K] | float | None:
        """The next chunk and its source; else the time (``now`` + some seconds) at which a
        chunk left to its owner falls to us, or None when nothing is left to hand out."""
        if not self._todo:
            return None
        front = []
        for i, key in enumerate(self._todo):
            if i >= self.window:
                break
            front.append(key)
        rarest: list[K] = []
        fewest = 0
        for key in front:
            n = holders(key)
            if n <= 0:
                if self.owns(key):  # our share, held by no one yet: the fleet waits on it
                    return self._take(key, "origin", now)
                continue
            if not rarest or n < fewest:
                rarest, fewest = [key], n
            elif n == fewest:
                rarest.append(key)
        if rarest:
            return self._take(self.rng.choice(rarest), "peer", now)
        stalled = self.stalled_s + (now - self._stalled_at if self._stalled_at is not None else 0)
        if stalled >= self.max_stall_s:  # waited enough this run: nothing is left to others
            return self._take(front[0], "origin", now, wasted=True)
        wake = now + self.max_stall_s - stalled
        for key in front:
            if self.owns(key):
                return self._take(key, "origin", now)
            since = self._deferred.setdefault(key, now)
            due = since + self.wait_s
            if now >= due:
                return self._take(key, "origin", now, wasted=True)
            wake = min(wake, due)
        if self._stalled_at is None:
            self._stalled_at = now
        return wake

    def _take(
        self, key: K, source: Source, now: float | None = None, wasted: bool = False
    ) -> Pick[K]:
        del self._todo[key]
        self._deferred.pop(key, None)
        if self._stalled_at is not None and now is not None:  # a stall ends
            if wasted:
                self.stalled_s += max(0.0, now - self._stalled_at)
            self._stalled_at = None
        return Pick(key, source)

    def put_back(self, key: K) -> None:
        """A chunk whose fetch failed: offered again (at the front: it is late already)."""
        self._todo = {key: None, **self._todo}

    def done(self, key: K) -> None:
        """A chunk that landed (for symmetry with put_back: nothing to do)."""


class TokenBucket:
    """``rate`` bytes per second with bursts of ``burst`` bytes; the caller passes the time.

    >>> b = TokenBucket(rate=100.0, burst=100.0, now=0.0)
    >>> b.take(100, now=0.0), b.take(50, now=0.0), b.take(50, now=1.0)
    (0.0, 0.5, 0.0)
    """

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.at = now

    def take(self, n: int, now: float) -> float:
        """Take ``n`` bytes' worth; the seconds to wait before sending them (tokens may go
        negative: the debt is what later senders wait behind)."""
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate
