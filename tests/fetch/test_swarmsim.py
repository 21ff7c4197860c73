"""The fleet simulation (spotstart.fetch.swarmsim): small seeded runs of the real fetch's
decisions (swarm.ChunkPicker, sample_peers, PollBackoff, HashRing, TokenBucket) on a
simulated clock and network. Times asserted are simulated seconds, never wall-clock."""

from __future__ import annotations

import dataclasses

import pytest

from spotstart.fetch.swarmsim import SimConfig, simulate

# A 2 GB model in 64 MiB chunks (30 chunks in 2 objects), 500 MB/s links, the origin 1 GB/s.
SMALL = SimConfig(
    nodes=1,
    model_bytes=2_000_000_000,
    chunk_bytes=64 << 20,
    objects=2,
    downlink=500e6,
    uplink=500e6,
    origin_rate=1e9,
    serve_rate=250e6,
    spread_s=5.0,
)


def test_one_node_alone_takes_everything_from_the_origin_once() -> None:
    for design in ("swarm", "today"):
        r = simulate(dataclasses.replace(SMALL, design=design))
        assert r.origin_bytes == SMALL.model_bytes
        assert r.peer_bytes == 0
        assert r.finished == 1
        # no faster than its downlink allows, and not absurdly slower
        assert (
            SMALL.model_bytes / SMALL.downlink
            <= r.last_ready_s
            < 2 * (SMALL.model_bytes / SMALL.downlink)
        )
        assert r.inventories == 0


def test_eight_nodes_together_take_the_model_from_the_origin_about_once() -> None:
    r = simulate(dataclasses.replace(SMALL, nodes=8, spread_s=0.0))
    assert r.finished == 8
    assert r.origin_bytes + r.peer_bytes == 8 * SMALL.model_bytes
    assert r.origin_bytes <= 1.5 * SMALL.model_bytes  # single-flight: far below 8x
    today = simulate(dataclasses.replace(SMALL, nodes=8, spread_s=0.0, design="today"))
    assert today.origin_bytes == 8 * SMALL.model_bytes  # nobody holds a chunk yet: all ask


def test_control_bytes_per_node_bounded_as_the_fleet_grows() -> None:
    coarse = dataclasses.replace(SMALL, chunk_bytes=250_000_000)  # 8 chunks: fast
    new = {n: simulate(dataclasses.replace(coarse, nodes=n)) for n in (16, 64)}
    today = {n: simulate(dataclasses.replace(coarse, nodes=n, design="today")) for n in (16, 64)}
    # the new design polls a bounded sample with deltas: per node about the same
    assert new[64].control_per_node <= 1.5 * new[16].control_per_node
    # today's polls every peer's whole inventory every second: grows with N
    assert today[64].control_per_node > 4 * today[16].control_per_node
    assert new[64].control_per_node < today[64].control_per_node / 10
    for r in new.values():
        assert r.control_ratio < 0.01
        assert r.finished == r.config.nodes


def test_todays_design_takes_more_from_the_origin_than_the_new_one() -> None:
    new = simulate(dataclasses.replace(SMALL, nodes=16))
    today = simulate(dataclasses.replace(SMALL, nodes=16, design="today"))
    assert new.finished == today.finished == 16
    assert today.origin_bytes > new.origin_bytes


def test_a_run_is_deterministic_for_its_seed() -> None:
    cfg = dataclasses.replace(SMALL, nodes=8)
    a, b = simulate(cfg), simulate(cfg)
    assert (a.ready_s, a.origin_bytes, a.control_bytes) == (
        b.ready_s,
        b.origin_bytes,
        b.control_bytes,
    )


def test_a_saturated_peer_answers_busy_and_the_chunk_comes_from_the_origin() -> None:
    # every node's 8 streams onto the first node, which answers only 2 at once
    cfg = dataclasses.replace(SMALL, nodes=4, peer_max_active=2, spread_s=30.0)
    r = simulate(cfg)
    assert r.refused > 0
    assert r.finished == 4
    assert r.origin_bytes + r.peer_bytes == 4 * SMALL.model_bytes


def test_bad_configs_are_refused() -> None:
    with pytest.raises(ValueError):
        simulate(dataclasses.replace(SMALL, nodes=0))


def test_single_flight_wait_keeps_chunks_off_the_origin() -> None:
    # wait_s=0: a chunk owned by another node is taken from the origin at once
    kept = simulate(dataclasses.replace(SMALL, nodes=16))
    none = simulate(dataclasses.replace(SMALL, nodes=16, wait_s=0.0))
    assert none.why.get("waited", 0) > 10 * kept.why.get("waited", 0)
    assert none.origin_bytes > 1.5 * kept.origin_bytes


def test_proposed_retry_on_busy_takes_nothing_from_the_origin_for_a_503() -> None:
    # wait_s=0 makes holders busy enough for 503s (the owner-first default leaves none here)
    today = simulate(dataclasses.replace(SMALL, nodes=16, wait_s=0.0))
    proposed = simulate(dataclasses.replace(SMALL, nodes=16, wait_s=0.0, on_busy="retry"))
    assert today.why.get("busy", 0) > 0
    assert "busy" not in proposed.why
    assert proposed.origin_bytes < today.origin_bytes
    assert proposed.finished == 16
