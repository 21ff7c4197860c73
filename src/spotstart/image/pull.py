"""How long a pull takes, as a model with its assumptions written down (pure).

A node's runtime (containerd) downloads up to ``streams`` layers at once, one HTTP stream per
layer, each at most ``stream_mb_s`` and together at most ``bandwidth_mb_s``; it unpacks layers
one after another, in order, at ``unpack_mb_s`` of uncompressed bytes (gunzip on one core and
the file writes). Lazy pulling (image streaming, eStargz, SOCI, Nydus) starts the container
once the bytes read at startup are in: those, compressed, over the same streams.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MB = 1_000_000


@dataclass(frozen=True)
class PullModel:
    """Defaults: 1 GB/s NIC share, containerd's 3 concurrent downloads, 100 MB/s a stream
    (a registry or its blob CDN to one connection), 200 MB/s unpack (one core of gunzip
    and tar extraction to local SSD)."""

    bandwidth_mb_s: float = 1000.0
    streams: int = 3
    stream_mb_s: float = 100.0
    unpack_mb_s: float = 200.0


def download_done_s(sizes: Sequence[int], model: PullModel) -> list[float]:
    """When each layer's download ends, ``streams`` at a time sharing the bandwidth."""
    done = [0.0] * len(sizes)
    left = {i: float(s) for i, s in enumerate(sizes)}
    queue = list(range(len(sizes)))
    active: list[int] = []
    t = 0.0
    while queue or active:
        while queue and len(active) < model.streams:
            active.append(queue.pop(0))
        rate = min(model.stream_mb_s, model.bandwidth_mb_s / len(active)) * MB
        step = min(left[i] for i in active) / rate
        t += step
        for i in list(active):
            left[i] -= step * rate
            if left[i] <= 1e-6:
                done[i] = t
                active.remove(i)
    return done


def pull_seconds(compressed: Sequence[int], uncompressed: Sequence[int], model: PullModel) -> float:
    """A whole pull: downloads in parallel, unpacks in layer order as each is in."""
    done = download_done_s(compressed, model)
    end = 0.0
    for t, size in zip(done, uncompressed, strict=True):
        end = max(end, t) + size / (model.unpack_mb_s * MB)
    return end


def lazy_seconds(startup_compressed: int, model: PullModel) -> float:
    """The bytes a start reads, fetched over the runtime's streams before the process runs."""
    rate = min(model.bandwidth_mb_s, model.streams * model.stream_mb_s) * MB
    return startup_compressed / rate


def fetch_seconds(size: int, model: PullModel) -> float:
    """``spotstart fetch``: many ranged streams to local disk, limited by the bandwidth only."""
    return size / (model.bandwidth_mb_s * MB)
