"""The router's Prometheus metrics, on a registry of its own (several routers can live in one
test process). Per-replica gauges are read from the ReplicaSet at scrape time."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from spotstart.route.replicas import ReplicaSet

__all__ = ["CONTENT_TYPE", "RouteMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# A continuation is a new request's connect + prefill of prompt and generated text: tens of ms
# on a warm prefix cache, seconds for long contexts on a busy replica.
_CONTINUE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _ReplicaCollector(Collector):
    def __init__(self, replicas: ReplicaSet) -> None:
        self._replicas = replicas

    def collect(self) -> Iterable[Metric]:
        outstanding = GaugeMetricFamily(
            "spotstart_route_replica_outstanding",
            "requests the router holds on the replica now",
            labels=["replica"],
        )
        ready = GaugeMetricFamily(
            "spotstart_route_replica_ready", "1 while the replica is ready", labels=["replica"]
        )
        for replica in list(self._replicas.replicas.values()):
            outstanding.add_metric([replica.address], replica.outstanding)
            ready.add_metric([replica.address], int(replica.ready and not replica.gone))
        yield outstanding
        yield ready


class RouteMetrics:
    def __init__(self, replicas: ReplicaSet) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "spotstart_route_requests", "client requests received", ["kind"], registry=r
        )
        self.retried = Counter(
            "spotstart_route_retried",
            "upstream attempts that no replica started (refused, 503, 5xx), sent again",
            registry=r,
        )
        self.continued = Counter(
            "spotstart_route_continued",
            "streams continued on another replica (each continuation counted)",
            registry=r,
        )
        self.rerun = Counter(
            "spotstart_route_rerun",
            "non-streaming generations cut and run again whole on another replica",
            registry=r,
        )
        self.lost = Counter(
            "spotstart_route_lost",
            "requests no replica could finish within the bound (an error event or a 502)",
            registry=r,
        )
        self.time_to_continue = Histogram(
            "spotstart_route_time_to_continue_seconds",
            "from the cut (or the drain comment) to the continuation's first token",
            buckets=_CONTINUE_BUCKETS,
            registry=r,
        )
        self.extra_prefill_tokens = Counter(
            "spotstart_route_extra_prefill_tokens",
            "generated tokens sent again as prompt to continue streams",
            registry=r,
        )
        r.register(_ReplicaCollector(replicas))

    def render(self) -> bytes:
        return generate_latest(self.registry)
