"""The replicas the router sends to: where they are (a list, or a DNS name re-resolved), whether
each is ready (its guard's ``/readyz``), how many requests each holds, and the choice of one:
least outstanding requests among the ready, with a preference for the replica that served the
same prompt prefix last (its prefix cache holds it) while it is not much busier.

The choice is pure (:meth:`ReplicaSet.choose`); polling and resolving are the I/O around it."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

__all__ = ["PrefixAffinity", "Replica", "ReplicaSet", "ReplicaSource", "parse_replicas"]

log = logging.getLogger("spotstart.route")


@dataclass(eq=False)
class Replica:
    """One replica (a guard's address). ``ready`` is the last poll's answer, turned false at
    once by a refused connection, a 503 or the guard's drain comment."""

    host: str
    port: int
    ready: bool = False
    outstanding: int = 0
    draining_seen: bool = False
    gone: bool = False  # no longer in the DNS answer: finishes what it holds, gets nothing new
    failures: int = field(default=0)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"http://{self.address}"


@dataclass(frozen=True)
class ReplicaSource:
    """Where the replicas come from: fixed addresses, or ``dns:NAME:PORT`` (every address the
    name resolves to, re-resolved every ``dns_interval_s``)."""

    addresses: tuple[tuple[str, int], ...] = ()
    dns_name: str | None = None
    dns_port: int = 0


def _port(text: str, spec: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{spec!r}: the port must be 1-65535")
    return int(text)


def parse_replicas(spec: str) -> ReplicaSource:
    """``HOST:PORT,HOST:PORT,...`` (IPv6 as ``[::1]:8080``) or ``dns:NAME:PORT``.

    >>> parse_replicas("10.0.0.1:8080,10.0.0.2:8080").addresses
    (('10.0.0.1', 8080), ('10.0.0.2', 8080))
    >>> parse_replicas("dns:llm-guards.serving.svc:8080").dns_name
    'llm-guards.serving.svc'
    """
    spec = spec.strip()
    if spec.startswith("dns:"):
        name, sep, port = spec[4:].rpartition(":")
        if not sep or not name or any(c in name for c in "/[]@ "):
            raise ValueError(f"{spec!r}: expected dns:NAME:PORT")
        return ReplicaSource(dns_name=name, dns_port=_port(port, spec))
    out: list[tuple[str, int]] = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        if item.startswith("["):
            host, sep, port = item[1:].partition("]:")
        else:
            host, sep, port = item.rpartition(":")
        if not sep or not host or any(c in host for c in "/@ []"):
            raise ValueError(f"{item!r}: expected HOST:PORT")
        out.append((host, _port(port, item)))
    if not out:
        raise ValueError(f"{spec!r}: no replica")
    return ReplicaSource(addresses=tuple(dict.fromkeys(out)))


class PrefixAffinity:
    """A bounded LRU of prompt-prefix hash -> the replica address that served it last."""

    def __init__(self, max_entries: int = 4096) -> None:
        self.max_entries = max_entries
        self._map: collections.OrderedDict[bytes, str] = collections.OrderedDict()

    @staticmethod
    def key(prefix: bytes) -> bytes:
        return hashlib.sha256(prefix).digest()[:16]

    def get(self, key: bytes) -> str | None:
        address = self._map.get(key)
        if address is not None:
            self._map.move_to_end(key)
        return address

    def put(self, key: bytes, address: str) -> None:
        self._map[key] = address
        self._map.move_to_end(key)
        while len(self._map) > self.max_entries:
            self._map.popitem(last=False)

    def __len__(self) -> int:
        return len(self._map)


class ReplicaSet:
    """The replicas, their state and the choice. ``affinity_slack`` is how many more
    outstanding requests the prefix's replica may hold than the least busy and still be
    chosen."""

    def __init__(self, affinity_slack: int = 2, affinity_entries: int = 4096) -> None:
        self.replicas: dict[str, Replica] = {}
        self.affinity = PrefixAffinity(affinity_entries)
        self.affinity_slack = affinity_slack
        self.changed = asyncio.Event()  # set whenever a replica turns ready

    def set_addresses(self, addresses: Iterable[tuple[str, int]]) -> None:
        wanted = {Replica(h, p).address: (h, p) for h, p in addresses}
        for address, (host, port) in wanted.items():
            replica = self.replicas.get(address)
            if replica is None:
                self.replicas[address] = Replica(host, port)
            else:
                replica.gone = False
        for address, replica in list(self.replicas.items()):
            if address not in wanted:
                replica.gone = True
                replica.ready = False
                if replica.outstanding == 0:
                    del self.replicas[address]

    def ready(self) -> list[Replica]:
        return [r for r in self.replicas.values() if r.ready and not r.gone]

    def choose(
        self, prefix_key: bytes | None, exclude: AbstractSet[str] = frozenset()
    ) -> Replica | None:
        """The ready replica to send to, or None. Least outstanding; ties by address order (a
        stable choice two routers side by side make alike is fine: each counts its own)."""
        candidates = [r for r in self.ready() if r.address not in exclude]
        if not candidates:
            return None
        best = min(candidates, key=lambda r: r.outstanding)
        if prefix_key is not None:
            address = self.affinity.get(prefix_key)
            preferred = self.replicas.get(address) if address else None
            if (
                preferred is not None
                and preferred in candidates
                and preferred.outstanding <= best.outstanding + self.affinity_slack
            ):
                best = preferred
            self.affinity.put(prefix_key, best.address)
        return best

    def mark(self, replica: Replica, ready: bool) -> None:
        if ready and not replica.gone:
            if not replica.ready:
                replica.ready = True
                replica.draining_seen = False
                self.changed.set()
        else:
            replica.ready = False

    def release(self, replica: Replica) -> None:
        replica.outstanding -= 1
        if replica.gone and replica.outstanding == 0:
            self.replicas.pop(replica.address, None)

    async def wait_ready(self, timeout_s: float, exclude: AbstractSet[str] = frozenset()) -> bool:
        """Wait up to ``timeout_s`` for a ready replica outside ``exclude``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not any(r.address not in exclude for r in self.ready()):
            left = deadline - loop.time()
            if left <= 0:
                return False
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(left, 0.5))
        return True


async def resolve(name: str, port: int) -> list[tuple[str, int]]:
    """Every address ``name`` resolves to (A and AAAA), in a stable order."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        name, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return sorted({(str(info[4][0]), port) for info in infos})


async def keep_resolving(
    replicas: ReplicaSet,
    source: ReplicaSource,
    interval_s: float,
    resolver: Callable[[str, int], Awaitable[list[tuple[str, int]]]] = resolve,
) -> None:
    """Re-resolve ``source``'s name every ``interval_s``; a failed lookup keeps the last set
    (a DNS hiccup must not empty the router)."""
    assert source.dns_name is not None
    while True:
        try:
            addresses = await resolver(source.dns_name, source.dns_port)
        except OSError as exc:
            log.warning("dns:%s: cannot resolve (%s); keeping the last set", source.dns_name, exc)
        else:
            if addresses:
                replicas.set_addresses(addresses)
        await asyncio.sleep(interval_s)
