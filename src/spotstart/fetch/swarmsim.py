"""A fleet of nodes fetching one model with peers, simulated: the decisions are the real
fetch's own (:mod:`spotstart.fetch.swarm`: :class:`~spotstart.fetch.swarm.ChunkPicker`,
:func:`~spotstart.fetch.swarm.sample_peers`, :class:`~spotstart.fetch.swarm.PollBackoff`,
:class:`~spotstart.fetch.swarm.HashRing`, :class:`~spotstart.fetch.swarm.TokenBucket`); the
clock and the network are this module's. Pure: no sockets, no clock reads; seeded.

The model (``bench/peers/sim.py`` prints its table):

- Nodes arrive evenly over ``spread_s`` (node 0 at 0 s, the last at ``spread_s``); each has
  ``streams`` chunk fetches at once, a downlink and an uplink; the origin has one egress cap
  for the zone (and optionally a cap per connection).
- Network: fluid flows. A transfer's rate is min(its receiver's downlink / the receiver's
  active transfers, its sender's uplink / the sender's active uploads, the origin's cap /
  active origin transfers, the per-connection cap), re-evaluated every ``dt_s`` (the flows
  are stepped; every other event is exact); a peer's uploads together also go through its
  :class:`TokenBucket` (the serving pace; the new design only). A request starts after a
  round trip (``rtt_s`` to a peer, ``origin_rtt_s`` to the origin). Shares are per
  endpoint, not max-min: a flow held back elsewhere leaves its share unused.
- Discovery: the fleet's name resolves to the nodes arrived by the last whole ``dns_s``
  (a node always counts itself in). Inventories (new design): every ``poll_base_s`` a
  node chooses whom to poll as PeerSet does (the kept ones, topped up by
  :func:`sample_peers`, the least useful swapped every ``resample_s``) and asks each
  polled peer whose :class:`PollBackoff` is due; the answer is what the peer held at that
  moment (stale until the next poll). Bytes: a first or full answer ``200 + objects x 150 +
  entries x 20``, a delta ``200 + changed objects x 150 + new entries x 20``, a 304
  ``200``; each chunk request's head ``300`` per entry (one entry = one real chunk of
  ``entry_chunk_bytes``: a coarse simulated chunk stands for many real ones, and its
  control bytes are counted as theirs). A peer answering ``peer_max_active`` requests
  answers 503: the asker leaves it for ``busy_s`` and takes that chunk from the origin
  (as the scheduler does when a peer fails).
- Today's design (``design="today"``): every node asks every arrived peer for its whole
  inventory every second (modelled as one fleet-wide snapshot a second), chunks in file
  order from a holder if any (the least loaded, ties to the first listed) else the origin,
  no single-flight, no serving pace.
- A chunk is served only once it has landed whole; peers never fail and never lie here
  (the real fetch's deadlines, drops and digest checks are not modelled); control bytes are
  counted, not sent through the links.
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from spotstart.fetch.swarm import (
    MAX_RING_POINTS,
    ChunkPicker,
    HashRing,
    Pick,
    PollBackoff,
    TokenBucket,
    sample_peers,
)

Design = Literal["swarm", "today"]

HEAD_BYTES = 200  # an inventory answer's status line and headers; a 304 is only this
OBJECT_BYTES = 150  # an inventory entry's fixed part
ENTRY_BYTES = 20  # one chunk CRC in an inventory
REQUEST_BYTES = 300  # one chunk request's head (and its answer's)


@dataclass(frozen=True)
class SimConfig:
    nodes: int
    model_bytes: int = 140 * 10**9
    chunk_bytes: int = 1 << 30
    objects: int = 30
    streams: int = 8
    downlink: float = 2.5e9  # bytes/s per node
    uplink: float = 2.5e9
    origin_rate: float = 10e9  # the zone's egress from the origin, all nodes together
    origin_conn_rate: float | None = None  # one origin connection's cap
    serve_rate: float | None = None  # a peer's TokenBucket pace (--serve-max-rate; new design)
    serve_burst: float = 4 << 20
    spread_s: float = 60.0
    design: Design = "swarm"
    sample: int = 8
    resample_s: float = 15.0
    poll_base_s: float = 1.0
    poll_max_s: float = 8.0
    wait_s: float = 10.0
    window: int = 256
    dns_s: float = 1.0
    peer_max_active: int = 64  # PeerServer's max_active: beyond it 503, Retry-After 1
    busy_s: float = 1.0
    # A proposed change, not today's code (off by default): "retry": a chunk a peer refused
    # (503) is offered again (another holder, its owner, or the wait) instead of taken from
    # the origin. (Owner first, the other proposal, is now ChunkPicker's own order.)
    on_busy: Literal["origin", "retry"] = "origin"
    rtt_s: float = 0.001
    origin_rtt_s: float = 0.03
    node_overhead_s: float = 0.0  # a node's fixed cost beside its bytes (start, checks)
    dt_s: float | None = None  # flow step; default: a twentieth of a chunk at one stream's share
    entry_chunk_bytes: int = 16 << 20
    seed: int = 0
    max_time_s: float = 1e6

    def chunk_count(self) -> int:
        return max(1, math.ceil(self.model_bytes / self.chunk_bytes))

    def step_s(self) -> float:
        if self.dt_s is not None:
            return self.dt_s
        per_stream = min(self.downlink / self.streams, self.origin_rate)
        return max(1e-3, min(0.25, self.chunk_bytes / per_stream / 20))


@dataclass
class SimResult:
    config: SimConfig
    arrive_s: list[float]
    ready_s: list[float]  # since the first node's arrival, per node in arrival order
    origin_bytes: int
    peer_bytes: int
    control_bytes: list[int]  # per node: inventories received + request heads
    inventories: int = 0
    not_modified: int = 0
    refused: int = 0  # peer requests answered 503 (taken from the origin instead)
    events: int = 0
    # chunk requests by reason: "peer", the origin as the chunk's "owner" on the ring, the
    # origin after "waited" wait_s for its owner, the origin after a peer answered "busy"
    why: dict[str, int] = field(default_factory=dict)

    @property
    def origin_x_model(self) -> float:
        return self.origin_bytes / self.config.model_bytes

    def ready_pct(self, q: float) -> float:
        """Nearest-rank percentile of ready times."""
        xs = sorted(self.ready_s)
        return xs[max(0, min(len(xs) - 1, math.ceil(q / 100 * len(xs)) - 1))]

    @property
    def finished(self) -> int:
        return sum(1 for r in self.ready_s if r != math.inf)

    @property
    def last_ready_s(self) -> float:
        return max(self.ready_s)

    @property
    def control_per_node(self) -> float:
        return sum(self.control_bytes) / len(self.control_bytes)

    @property
    def control_ratio(self) -> float:
        data = self.origin_bytes + self.peer_bytes
        if not data:
            return math.inf if sum(self.control_bytes) else 0.0  # nothing landed yet
        return sum(self.control_bytes) / data

    def row(self) -> dict[str, object]:
        return {
            "nodes": self.config.nodes,
            "design": self.config.design,
            "origin_x_model": round(self.origin_x_model, 3),
            "p50_ready_s": round(self.ready_pct(50), 2),
            "p99_ready_s": round(self.ready_pct(99), 2),
            "last_ready_s": round(self.last_ready_s, 2),
            "control_per_node_bytes": round(self.control_per_node),
            "control_over_data": self.control_ratio,
            "inventories": self.inventories,
            "not_modified": self.not_modified,
            "refused": self.refused,
            "finished": self.finished,
            "requests": dict(sorted(self.why.items())),
        }


class _Picker(ChunkPicker[int]):
    """A node's picker; :meth:`ChunkPicker.set_ring` takes the ring built once for the whole
    fleet (building one per node costs ``vnodes x N`` hashes each: quadratic at N = 1,024)."""


class _Flow:
    __slots__ = ("dst", "key", "last", "left", "size", "src")

    def __init__(self, dst: int, src: int, key: int, size: int, start: float) -> None:
        self.dst, self.src, self.key = dst, src, key
        self.left = float(size)
        self.size = size
        self.last = start


@dataclass
class _Node:
    idx: int
    addr: str
    arrive: float
    picker: _Picker
    log: list[int] = field(default_factory=list)  # landed chunks, in order
    objects_held: set[int] = field(default_factory=set)
    entries_held: int = 0
    busy: int = 0
    serving: int = 0  # requests it is answering now
    busy_until: dict[int, float] = field(default_factory=dict)  # peer -> its 503's end
    in_flight: dict[int, int] = field(default_factory=dict)  # peer -> our requests to it
    given: dict[int, int] = field(default_factory=dict)  # peer -> bytes it gave us
    ready: float | None = None
    control: int = 0
    wake_at: float = math.inf
    bucket: TokenBucket | None = None
    # new design: the polled peers and what each last said
    polled: list[int] = field(default_factory=list)
    seen: dict[int, int] = field(default_factory=dict)  # peer -> length of its log seen
    backoff: dict[int, PollBackoff] = field(default_factory=dict)
    ask_at: dict[int, float] = field(default_factory=dict)
    view: dict[int, set[int]] = field(default_factory=dict)  # chunk -> polled holders
    resample_at: float | None = None


class Sim:
    def __init__(self, cfg: SimConfig) -> None:
        if cfg.nodes < 1 or cfg.streams < 1:
            raise ValueError("nodes and streams must be at least 1")
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.C = cfg.chunk_count()
        self.size = [cfg.chunk_bytes] * self.C
        self.size[-1] = cfg.model_bytes - cfg.chunk_bytes * (self.C - 1)
        self.obj = [i * cfg.objects // self.C for i in range(self.C)]
        self.entries = [max(1, math.ceil(s / cfg.entry_chunk_bytes)) for s in self.size]
        self.dt = cfg.step_s()
        n = cfg.nodes
        arrive = [0.0 if n == 1 else i * cfg.spread_s / (n - 1) for i in range(n)]
        self.addrs = [f"10.{i // 65536}.{i // 256 % 256}.{i % 256}:8471" for i in range(n)]
        self.index = {a: i for i, a in enumerate(self.addrs)}
        today = cfg.design == "today"
        self.nodes: list[_Node] = []
        for i in range(n):
            picker = _Picker(
                self.addrs[i],
                range(self.C),
                self._ring_key,
                wait_s=cfg.wait_s,
                window=1 if today else cfg.window,
                rng=random.Random(self.rng.random()),
            )
            node = _Node(i, self.addrs[i], arrive[i], picker)
            if not today and cfg.serve_rate is not None:
                burst = max(cfg.serve_burst, cfg.serve_rate * self.dt)
                node.bucket = TokenBucket(cfg.serve_rate, burst, 0.0)
            self.nodes.append(node)
        self.flows: list[_Flow] = []
        self.heap: list[tuple[float, int, str, int, int]] = []
        self.seq = 0
        self.arrivals = arrive
        self.fleet = range(0)  # the nodes the name resolved to at the last refresh
        self.arrived = 0
        self.rings: dict[tuple[int, int], HashRing] = {}
        self.origin_bytes = 0
        self.peer_bytes = 0
        self.inventories = 0
        self.not_modified = 0
        self.refused = 0
        self.why: dict[str, int] = {}  # chunk requests by reason: peer, owner, waited, busy
        self.left = n
        # today's design: the fleet-wide snapshot of holders, taken once a second
        self.glog: list[tuple[int, int]] = []
        self.gseen = 0
        self.gholders: list[list[int]] = [[] for _ in range(self.C)]
        self.inv_total = 0  # every arrived node's whole inventory, in bytes

    def _ring_key(self, key: int) -> str:
        return f"o{self.obj[key]}:{key}"

    def _push(self, t: float, kind: str, a: int = 0, b: int = 0) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, a, b))

    def run(self) -> SimResult:
        for node in self.nodes:
            self._push(node.arrive, "arrive", node.idx)
        self._push(self.dt, "tick")
        events = 0
        while self.heap and self.left:
            t, _, kind, a, _b = heapq.heappop(self.heap)
            if t > self.cfg.max_time_s:
                break  # unfinished nodes' ready time stays inf
            events += 1
            if kind == "tick":
                self._tick(t)
                self._push(t + self.dt, "tick")
            elif kind == "arrive":
                self._arrive(self.nodes[a], t)
            elif kind == "refresh":
                self._refresh(self.nodes[a], t)
            elif kind == "wake":
                node = self.nodes[a]
                if node.wake_at == t:
                    node.wake_at = math.inf
                    self._start(node, t)
        return SimResult(
            self.cfg,
            [n.arrive for n in self.nodes],
            [n.ready if n.ready is not None else math.inf for n in self.nodes],
            self.origin_bytes,
            self.peer_bytes,
            [n.control for n in self.nodes],
            self.inventories,
            self.not_modified,
            self.refused,
            events,
            dict(self.why),
        )

    # discovery and inventories

    def _ring(self, node: _Node, t: float) -> HashRing:
        """The fleet as the name resolved at the last whole ``dns_s`` (every node arrived by
        then), ourselves included (as set_fleet does); one ring per answer, shared."""
        seen = bisect.bisect_right(self.arrivals, math.floor(t / self.cfg.dns_s) * self.cfg.dns_s)
        self.fleet = range(seen)
        ring = self.rings.get((seen, -1))
        if ring is None:
            ring = self.rings[(seen, -1)] = HashRing(self.addrs[i] for i in self.fleet)
        if node.idx < seen:
            return ring
        mine = self.rings.get((seen, node.idx))
        if mine is None:
            # the fleet's ring and our own points merged: the same ring as
            # HashRing(fleet + [me]) without hashing the fleet again
            # as many points as HashRing(fleet + [me]) gives each node (fewer past 256)
            vnodes = max(1, min(64, MAX_RING_POINTS // (len(ring.nodes) + 1)))
            me = HashRing([node.addr], vnodes=vnodes)
            mine = HashRing.__new__(HashRing)
            mine.nodes = ring.nodes | me.nodes
            points = sorted(
                [
                    *zip(ring._keys, ring._owners, strict=True),
                    *zip(me._keys, me._owners, strict=True),
                ]
            )
            mine._keys = [k for k, _ in points]
            mine._owners = [o for _, o in points]
            self.rings[(seen, node.idx)] = mine
        return mine

    def _arrive(self, node: _Node, t: float) -> None:
        self.arrived = max(self.arrived, node.idx + 1)
        self.inv_total += HEAD_BYTES
        self._refresh(node, t)
        self._start(node, t)

    def _refresh(self, node: _Node, t: float) -> None:
        if node.ready is not None:
            return
        self._push(t + self.cfg.poll_base_s, "refresh", node.idx)
        if self.cfg.design == "today":
            self._poll_everyone(node, t)
            return
        node.picker.set_ring(self._ring(node, t))
        self._choose_polled(node, t)
        changed = False
        for p in node.polled:
            if node.ask_at.get(p, 0.0) <= t:
                changed |= self._poll(node, p, t)
        if changed or node.busy < self.cfg.streams:
            self._start(node, t)

    def _usefulness(self, node: _Node, p: int) -> tuple[bool, int, bool]:
        given = node.given.get(p, 0)
        return (given > 0, given, node.seen.get(p, 0) > 0)

    def _choose_polled(self, node: _Node, t: float) -> None:
        k = max(1, self.cfg.sample)
        keep = list(node.polled)
        if node.resample_at is None:
            node.resample_at = t + self.cfg.resample_s
        elif t >= node.resample_at:
            node.resample_at = t + self.cfg.resample_s
            others = len(self.fleet) - (node.idx in self.fleet) - len(keep)
            if keep and len(keep) >= k and others > 0:
                keep.remove(min(keep, key=lambda p: self._usefulness(node, p)))
        if len(keep) >= k:
            chosen = keep[:k]
        else:
            addrs = [self.addrs[i] for i in self.fleet]
            keep_a = [self.addrs[i] for i in keep]
            picked = sample_peers(addrs, keep_a, k, self.rng, exclude=(node.addr,))
            chosen = [self.index[a] for a in picked]
        for p in set(node.polled) - set(chosen):
            self._forget(node, p)
        node.polled = chosen

    def _forget(self, node: _Node, p: int) -> None:
        seen = node.seen.pop(p, 0)
        log = self.nodes[p].log
        for key in log[:seen]:
            holders = node.view.get(key)
            if holders is not None:
                holders.discard(p)
        node.ask_at.pop(p, None)
        node.backoff.pop(p, None)

    def _inventory_bytes(self, objects: int, entries: int) -> int:
        return HEAD_BYTES + objects * OBJECT_BYTES + entries * ENTRY_BYTES

    def _poll(self, node: _Node, p: int, t: float) -> bool:
        peer = self.nodes[p]
        old = node.seen.get(p)
        new = len(peer.log)
        fresh = peer.log[old or 0 : new]
        if old is None:
            node.control += self._inventory_bytes(len(peer.objects_held), peer.entries_held)
        elif new == old:
            node.control += HEAD_BYTES
            self.not_modified += 1
        else:
            objs = {self.obj[k] for k in fresh}
            node.control += self._inventory_bytes(len(objs), sum(self.entries[k] for k in fresh))
        self.inventories += 1
        node.seen[p] = new
        for key in fresh:
            node.view.setdefault(key, set()).add(p)
        backoff = node.backoff.get(p)
        if backoff is None:
            backoff = node.backoff[p] = PollBackoff(self.cfg.poll_base_s, self.cfg.poll_max_s)
        changed = bool(fresh)
        node.ask_at[p] = t + backoff.next(changed)
        return changed

    def _poll_everyone(self, node: _Node, t: float) -> None:
        # today: the fleet's inventories as of the last whole second, every one in full
        for key, holder in self.glog[self.gseen :]:
            bisect.insort(self.gholders[key], holder)
        self.gseen = len(self.glog)
        own = self._inventory_bytes(len(node.objects_held), node.entries_held)
        node.control += self.inv_total - own
        self.inventories += self.arrived - 1
        self._start(node, t)

    # picks and transfers

    def _holders(self, node: _Node, t: float) -> Callable[[int], int]:
        busy = node.busy_until
        for p in [p for p, until in busy.items() if until <= t]:
            del busy[p]
        if self.cfg.design == "today":
            g = self.gholders
            if not busy:
                return lambda key: len(g[key])
            return lambda key: sum(1 for p in g[key] if p not in busy)
        view = node.view
        if not busy:
            return lambda key: len(view.get(key, ()))
        return lambda key: sum(1 for p in view.get(key, ()) if p not in busy)

    def _peer_for(self, node: _Node, key: int) -> int | None:
        flight, busy = node.in_flight, node.busy_until
        if self.cfg.design == "today":
            best, load = None, math.inf
            for p in self.gholders[key]:  # the first listed among the least loaded
                n = flight.get(p, 0)
                if n < load and p not in busy:
                    best, load = p, n
                    if n == 0:
                        break
            return best
        holders = [p for p in node.view.get(key, ()) if p not in busy]
        if not holders:
            return None
        least = min(flight.get(p, 0) for p in holders)
        return self.rng.choice(sorted(p for p in holders if flight.get(p, 0) == least))

    def _start(self, node: _Node, t: float) -> None:
        if node.ready is not None or t < node.arrive:
            return
        holders = self._holders(node, t)
        while node.busy < self.cfg.streams:
            pick = node.picker.next(t, holders)
            if pick is None:
                return
            if not isinstance(pick, Pick):
                if pick < node.wake_at:
                    node.wake_at = pick
                    self._push(pick, "wake", node.idx)
                return
            key = pick.key
            src = self._peer_for(node, key) if pick.source == "peer" else None
            if src is not None and self.nodes[src].serving >= self.cfg.peer_max_active:
                # 503 Retry-After: the peer left alone for a while; the chunk from the
                # origin (as the scheduler does when a peer fails)
                node.control += REQUEST_BYTES
                node.busy_until[src] = t + self.cfg.busy_s
                self.refused += 1
                holders = self._holders(node, t)
                if self.cfg.on_busy == "retry":
                    node.picker.put_back(key)
                    continue
                src = None
                why = "busy"
            elif pick.source == "peer":
                why = "peer"
            elif self.cfg.design == "today" or node.picker.owns(key):
                why = "owner"  # today: every node is its own ring
            else:
                why = "waited"
            self.why[why] = self.why.get(why, 0) + 1
            node.busy += 1
            node.control += REQUEST_BYTES * self.entries[key]
            if src is None:
                self.flows.append(
                    _Flow(node.idx, -1, key, self.size[key], t + self.cfg.origin_rtt_s)
                )
            else:
                node.in_flight[src] = node.in_flight.get(src, 0) + 1
                self.nodes[src].serving += 1
                self.flows.append(_Flow(node.idx, src, key, self.size[key], t + self.cfg.rtt_s))

    def _tick(self, t: float) -> None:
        cfg = self.cfg
        active = [f for f in self.flows if f.last < t]
        if not active:
            return
        down: dict[int, int] = {}
        up: dict[int, int] = {}
        n_origin = 0
        for f in active:
            down[f.dst] = down.get(f.dst, 0) + 1
            if f.src < 0:
                n_origin += 1
            else:
                up[f.src] = up.get(f.src, 0) + 1
        origin_share = cfg.origin_rate / n_origin if n_origin else 0.0
        if cfg.origin_conn_rate is not None:
            origin_share = min(origin_share, cfg.origin_conn_rate)
        rates: list[float] = []
        want: dict[int, float] = {}
        for f in active:
            r = cfg.downlink / down[f.dst]
            if f.src < 0:
                r = min(r, origin_share)
            else:
                r = min(r, cfg.uplink / up[f.src])
                want[f.src] = want.get(f.src, 0.0) + r * (t - f.last)
            rates.append(r)
        scale: dict[int, float] = {}
        for src, w in want.items():
            bucket = self.nodes[src].bucket
            if bucket is None:
                continue
            delay = bucket.take(math.ceil(w), t)
            if delay > 0:
                frac = self.dt / (self.dt + delay)
                bucket.tokens += w * (1 - frac)  # what it did not send this step
                scale[src] = frac
        landed: list[tuple[float, _Flow]] = []
        for f, r in zip(active, rates, strict=True):
            if f.src >= 0 and f.src in scale:
                r *= scale[f.src]
            span = t - f.last
            if r * span >= f.left:
                landed.append((f.last + f.left / r, f))
                f.left = 0.0
            else:
                f.left -= r * span
                f.last = t
        if not landed:
            return
        self.flows = [f for f in self.flows if f.left > 0]
        landed.sort(key=lambda x: x[0])
        for when, f in landed:
            self._land(f, when)

    def _land(self, f: _Flow, t: float) -> None:
        node = self.nodes[f.dst]
        node.busy -= 1
        if f.src < 0:
            self.origin_bytes += f.size
        else:
            self.peer_bytes += f.size
            node.in_flight[f.src] -= 1
            self.nodes[f.src].serving -= 1
            node.given[f.src] = node.given.get(f.src, 0) + f.size
        node.picker.done(f.key)
        node.log.append(f.key)
        if self.obj[f.key] not in node.objects_held:
            node.objects_held.add(self.obj[f.key])
            self.inv_total += OBJECT_BYTES
        node.entries_held += self.entries[f.key]
        self.inv_total += ENTRY_BYTES * self.entries[f.key]
        self.glog.append((f.key, node.idx))
        if len(node.log) == self.C:
            node.ready = t + self.cfg.node_overhead_s
            self.left -= 1
            return
        self._start(node, t)


def simulate(cfg: SimConfig) -> SimResult:
    return Sim(cfg).run()


def simulate_many(cfgs: Iterable[SimConfig]) -> list[SimResult]:
    return [simulate(c) for c in cfgs]
