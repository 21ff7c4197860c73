"""A proven peer that misses a chunk's deadline (its uplink shared by a rollout's nodes) is
paused, not dropped for the run; an unproven one, or one that keeps missing, is dropped as
before (namespace bench before this: 15-22 honest peers dropped a run at paced uplinks, their
chunks then read from the origin)."""

from __future__ import annotations

from spotstart.errors import StallDetected, TransientError
from spotstart.fetch.peers import MAX_SLOW, SLOW_PAUSE_S, Peer, PeerSet, PeerSpec


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _set() -> tuple[PeerSet, Peer, list[str], Clock]:
    said: list[str] = []
    clock = Clock()
    peers = PeerSet(PeerSpec(("10.0.0.2:8471",)), said.append, clock=clock)
    peer = peers.peers.setdefault("10.0.0.2:8471", Peer("10.0.0.2:8471"))
    return peers, peer, said, clock


def _late() -> StallDetected:
    return StallDetected("peer 10.0.0.2:8471: 4194304 bytes not in within 5s")


def test_a_proven_peer_that_misses_a_deadline_is_paused_then_asked_again() -> None:
    peers, peer, said, clock = _set()
    peers.served(peer, "a" * 64, 4 << 20, 0.5)
    peers.failed(peer, "a" * 64, _late())
    assert peer.dropped is None
    assert peer.busy_until == clock.now + SLOW_PAUSE_S
    assert any("paused" in m for m in said)
    peers.served(peer, "a" * 64, 4 << 20, 0.5)  # a chunk between: the count starts again
    for _ in range(MAX_SLOW - 1):
        peers.failed(peer, "a" * 64, _late())
    assert peer.dropped is None


def test_misses_in_a_row_drop_it() -> None:
    peers, peer, _, _ = _set()
    peers.served(peer, "a" * 64, 4 << 20, 0.5)
    for _ in range(MAX_SLOW):
        peers.failed(peer, "a" * 64, _late())
    assert peer.dropped is not None and "not in within" in peer.dropped


def test_an_unproven_peer_that_misses_a_deadline_is_dropped_at_once() -> None:
    peers, peer, _, _ = _set()
    peers.failed(peer, "a" * 64, _late())
    assert peer.dropped is not None
    assert peers.unproven_failures == 1


def test_other_failures_of_a_proven_peer_still_drop_it() -> None:
    peers, peer, _, _ = _set()
    peers.served(peer, "a" * 64, 4 << 20, 0.5)
    peers.failed(peer, "a" * 64, TransientError("peer 10.0.0.2:8471: HTTP 500"))
    assert peer.dropped is not None
