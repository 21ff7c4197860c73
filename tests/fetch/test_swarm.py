"""The pure decisions of peer fetch at fleet scale (:mod:`spotstart.fetch.swarm`): poll backoff,
the bounded peer sample, the hash ring, the chunk picker and the token bucket. No sockets, no
clock: time is passed in, randomness seeded."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spotstart.fetch.swarm import (
    ChunkPicker,
    HashRing,
    Pick,
    PollBackoff,
    TokenBucket,
    sample_peers,
)

OID = "ab" * 32


def _nodes(n: int) -> list[str]:
    return [f"10.0.{i // 250}.{i % 250}:8471" for i in range(n)]


# -- PollBackoff ------------------------------------------------------------------------------


def test_backoff_doubles_while_nothing_changes_and_returns_to_the_base_on_a_change() -> None:
    b = PollBackoff(0.5, 4.0)
    assert b.next(False) == 0.5  # the first ask: the base, whatever it says
    assert [b.next(False) for _ in range(5)] == [1.0, 2.0, 4.0, 4.0, 4.0]
    assert b.next(True) == 0.5
    assert b.next(False) == 1.0


@given(
    base=st.floats(0.01, 10.0),
    extra=st.floats(0.0, 100.0),
    changes=st.lists(st.booleans(), max_size=60),
)
def test_backoff_stays_between_its_base_and_its_max(
    base: float, extra: float, changes: list[bool]
) -> None:
    b = PollBackoff(base, base + extra)
    for changed in changes:
        s = b.next(changed)
        assert base <= s <= base + extra
        if changed:
            assert s == base


# -- sample_peers -----------------------------------------------------------------------------


def test_a_sample_keeps_the_useful_peers_and_never_the_excluded_or_the_gone() -> None:
    addresses = _nodes(50)
    keep = [addresses[7], "10.9.9.9:1", addresses[3], addresses[9]]  # one no longer found
    got = sample_peers(addresses, keep, 6, random.Random(5), exclude={addresses[9]})
    assert got[:2] == [addresses[7], addresses[3]]
    assert len(got) == 6 == len(set(got))
    assert "10.9.9.9:1" not in got and addresses[9] not in got
    assert set(got) <= set(addresses)


def test_a_sample_is_bounded_whatever_the_fleet_and_takes_all_of_a_small_one() -> None:
    rng = random.Random(1)
    assert len(sample_peers(_nodes(4096), [], 8, rng)) == 8
    assert sorted(sample_peers(_nodes(5), [], 8, rng)) == sorted(_nodes(5))
    assert sample_peers(_nodes(5), _nodes(5), 2, rng) == _nodes(2)  # keep alone fills it
    assert sample_peers([], ["x"], 8, rng) == []


def test_samples_drawn_by_many_nodes_spread_over_the_whole_fleet() -> None:
    """Each node draws its own: the fleet's polls land evenly, not on the first addresses a
    name resolves to (256 nodes, 8 each: every peer is polled by ~8 others)."""
    fleet = _nodes(256)
    counts: Counter[str] = Counter()
    for i, me in enumerate(fleet):
        counts.update(sample_peers(fleet, [], 8, random.Random(i), exclude={me}))
    assert set(counts) == set(fleet) or len(counts) > 0.99 * len(fleet)
    assert max(counts.values()) <= 24  # mean 8; the first addresses get no more than others
    assert sum(counts[a] for a in fleet[:8]) <= 3 * 8 * 8


# -- HashRing ---------------------------------------------------------------------------------


def _keys(n: int) -> list[str]:
    return [f"{OID}:{i}" for i in range(n)]


@pytest.mark.parametrize("n", [4, 16, 64])
def test_the_ring_shares_keys_out_evenly(n: int) -> None:
    ring = HashRing(_nodes(n))
    keys = _keys(20_000)
    share = Counter(ring.owner(k) for k in keys)
    mean = len(keys) / n
    assert set(share) == set(_nodes(n))
    assert 0.5 * mean <= min(share.values()) and max(share.values()) <= 1.6 * mean


@pytest.mark.parametrize("n", [4, 16, 64])
def test_a_node_joining_takes_only_its_share_and_the_others_keep_theirs(n: int) -> None:
    keys = _keys(20_000)
    before, after = HashRing(_nodes(n)), HashRing([*_nodes(n), "10.9.9.9:8471"])
    moved = [k for k in keys if before.owner(k) != after.owner(k)]
    assert all(after.owner(k) == "10.9.9.9:8471" for k in moved)
    assert 0.4 / (n + 1) <= len(moved) / len(keys) <= 1.6 / (n + 1)


def test_a_node_leaving_moves_only_its_own_keys() -> None:
    keys = _keys(10_000)
    nodes = _nodes(16)
    before, after = HashRing(nodes), HashRing(nodes[1:])
    for k in keys:
        if before.owner(k) != nodes[0]:
            assert after.owner(k) == before.owner(k)


def test_every_node_computes_the_same_owner_whatever_order_it_learnt_the_fleet_in() -> None:
    nodes = _nodes(32)
    shuffled = nodes[:]
    random.Random(3).shuffle(shuffled)
    a, b = HashRing(nodes), HashRing(shuffled)
    assert all(a.owner(k) == b.owner(k) for k in _keys(2000))
    assert HashRing([]).owner("x") is None


# -- ChunkPicker ------------------------------------------------------------------------------


def _picker(me: str, keys: list[int], **kw: object) -> ChunkPicker[int]:
    return ChunkPicker(me, keys, lambda k: f"{OID}:{k}", rng=random.Random(0), **kw)  # type: ignore[arg-type]


def test_our_unheld_share_first_then_chunks_peers_hold_the_rarest_first() -> None:
    holders = {0: 0, 1: 3, 2: 1, 3: 2, 4: 1, 5: 0}
    p = _picker("me:1", list(holders))
    # first what nobody holds of our share (alone on the ring: all ours), from the origin:
    # every other node waits on it
    assert [p.next(0.0, holders.__getitem__) for _ in range(2)] == [
        Pick(0, "origin"),
        Pick(5, "origin"),
    ]
    got = [p.next(0.0, holders.__getitem__) for _ in range(4)]
    assert all(isinstance(g, Pick) and g.source == "peer" for g in got)
    keys = [g.key for g in got if isinstance(g, Pick)]
    assert sorted(keys[:2]) == [2, 4] and keys[2:] == [3, 1]
    assert p.next(0.0, holders.__getitem__) is None and len(p) == 0


def test_equally_rare_chunks_are_taken_in_a_random_order_so_nodes_spread() -> None:
    firsts = set()
    for seed in range(20):
        p = ChunkPicker("me:1", range(10), str, rng=random.Random(seed))
        g = p.next(0.0, lambda k: 1)
        assert isinstance(g, Pick)
        firsts.add(g.key)
    assert len(firsts) >= 5


def test_a_chunk_owned_by_another_node_is_left_to_it_then_falls_to_us_after_wait_s() -> None:
    me, other = "10.0.0.1:8471", "10.0.0.2:8471"
    ring = HashRing([me, other])
    keys = list(range(200))
    theirs = [k for k in keys if ring.owner(f"{OID}:{k}") == other]
    ours = [k for k in keys if ring.owner(f"{OID}:{k}") == me]
    assert theirs and ours
    p = _picker(me, keys, wait_s=10.0)
    p.set_fleet([other])  # ourselves added
    none = lambda k: 0  # noqa: E731
    got = [p.next(100.0, none) for _ in ours]
    assert got == [Pick(k, "origin") for k in ours]  # ours first, in file order
    assert p.next(100.0, none) == 110.0  # the rest is theirs: wait for it (or its holders)
    assert p.next(109.9, none) == 110.0
    # the owner got one: it is ours to take from that peer at once
    first = p.next(105.0, lambda k: int(k == theirs[3]))
    assert first == Pick(theirs[3], "peer")
    rest = [k for k in theirs if k != theirs[3]]
    assert [p.next(110.0, none) for _ in rest] == [Pick(k, "origin") for k in rest]
    assert p.next(110.0, none) is None


def test_a_chunk_put_back_is_offered_again_first() -> None:
    p = _picker("me:1", [0, 1, 2])
    none = lambda k: 0  # noqa: E731
    assert p.next(0.0, none) == Pick(0, "origin")
    assert p.next(0.0, none) == Pick(1, "origin")
    p.put_back(0)
    p.done(1)
    assert len(p) == 2
    assert p.next(0.0, none) == Pick(0, "origin")
    assert p.next(0.0, none) == Pick(2, "origin")


def test_one_pick_looks_at_no_more_than_its_window() -> None:
    """A 140 GB model's 8,750 chunks: one pick asks holders of ``window`` of them, not all;
    a rarer chunk beyond the window waits its turn."""
    asked: list[int] = []

    def holders(k: int) -> int:
        asked.append(k)
        return 1 if k == 9000 else 2

    p = _picker("me:1", list(range(10_000)), window=256)
    g = p.next(0.0, holders)
    assert isinstance(g, Pick) and g.source == "peer" and g.key < 256
    assert len(asked) == 256 and max(asked) == 255


def test_an_unchanged_fleet_keeps_the_owners_and_a_new_one_recomputes_them() -> None:
    me = "10.0.0.1:8471"
    p = _picker(me, list(range(100)))
    assert all(p.owns(k) for k in range(100))  # alone
    p.set_fleet(_nodes(8))
    owned = [p.owns(k) for k in range(100)]
    assert 0 < sum(owned) < 100
    p.set_fleet(reversed(_nodes(8)))
    assert [p.owns(k) for k in range(100)] == owned


# -- TokenBucket ------------------------------------------------------------------------------


def test_a_bucket_lets_a_burst_through_then_paces_at_its_rate() -> None:
    b = TokenBucket(rate=1000.0, burst=500.0, now=0.0)
    assert b.take(500, 0.0) == 0.0
    assert b.take(250, 0.0) == pytest.approx(0.25)
    assert b.take(250, 0.0) == pytest.approx(0.5)  # behind the debt before it
    assert b.take(100, 10.0) == 0.0  # refilled, at most to the burst
    assert b.tokens == pytest.approx(400.0)


def test_a_sender_that_waits_as_told_sends_at_the_rate() -> None:
    b = TokenBucket(rate=1e6, burst=1e5, now=0.0)
    now, sent = 0.0, 0
    while now < 10.0:
        now += b.take(1 << 16, now)
        sent += 1 << 16
    assert sent == pytest.approx(1e6 * 10.0 + 1e5, rel=0.02)


@pytest.mark.parametrize("rate,burst", [(0.0, 1.0), (1.0, 0.0), (-1.0, 1.0)])
def test_a_bucket_without_a_positive_rate_and_burst_is_refused(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst, 0.0)
