"""The guard's Prometheus metrics, on a registry of its own (several guards can live in one test
process). Request counters are read from the DrainController, and the watchers' metadata faults
and restarts from their ``faults``, at scrape time, so there is one bookkeeping only;
histograms are observed by the proxy."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Set
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from spotstart.guard.drain import DrainController

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# notice-to-unready is in-process bookkeeping (microseconds to a few ms): fine buckets
_UNREADY_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _ControllerCollector(Collector):
    def __init__(self, controller: DrainController) -> None:
        self._controller = controller

    def collect(self) -> Iterable[Metric]:
        c = self._controller.counters
        for name, value, doc in (
            ("accepted", c.accepted, "requests accepted and forwarded upstream"),
            ("drained", c.drained, "accepted requests that completed after a notice"),
            (
                "rejected",
                c.rejected,
                "requests answered 503 + Retry-After that the server never started (draining, "
                "or the server shutting down or not accepting connections)",
            ),
            ("dropped", c.dropped, "in-flight requests cut at the drain deadline"),
            ("failed", c.failed, "accepted requests ended by an upstream or client error"),
            (
                "aborted",
                c.aborted,
                "accepted requests the server ended with finish_reason abort (lost: a stream "
                "passed on as the server ended it, a non-streaming answer turned into a 503)",
            ),
            ("lost", c.lost, "accepted requests not finished: dropped + aborted"),
        ):
            yield CounterMetricFamily(f"spotstart_guard_requests_{name}", doc, value=value)
        yield GaugeMetricFamily(
            "spotstart_guard_in_flight", "requests being served now", value=c.in_flight
        )
        yield GaugeMetricFamily(
            "spotstart_guard_ready",
            "1 while /readyz answers 200",
            value=int(self._controller.ready),
        )
        yield GaugeMetricFamily(
            "spotstart_guard_upstream_shutting_down",
            "1 once the server refused a request because it is shutting down (new requests "
            "are answered 503, not forwarded)",
            value=int(self._controller.upstream_shutting_down),
        )


class WatcherFaults(Protocol):
    """What the metrics read of a watcher's fault counts (``watchers._common.Faults``)."""

    @property
    def by_endpoint(self) -> Mapping[str, int]: ...

    @property
    def crashes(self) -> int: ...


# (source, its fault counts), one per watcher, read at each scrape
FaultSources = Callable[[], Iterable[tuple[str, WatcherFaults]]]


class _WatcherCollector(Collector):
    def __init__(self, sources: FaultSources) -> None:
        self._sources = sources

    def collect(self) -> Iterable[Metric]:
        faults = CounterMetricFamily(
            "spotstart_guard_metadata_faults",
            "metadata answers that failed or could not be read (errors, timeouts, garbage), "
            "by watcher and endpoint; each retried, none taken as a notice",
            labels=["source", "endpoint"],
        )
        restarts = CounterMetricFamily(
            "spotstart_guard_watcher_restarts",
            "times a notice watcher crashed or stopped (a bug) and was started again",
            labels=["source"],
        )
        for source, counts in self._sources():
            for endpoint, n in sorted(counts.by_endpoint.items()):
                faults.add_metric([source, endpoint], n)
            restarts.add_metric([source], counts.crashes)
        yield faults
        yield restarts


class _Total(Protocol):
    @property
    def total(self) -> int: ...


class ListenerCounts(Protocol):
    """What the metrics read of the guard port's listener (``listen.BoundedListener``)."""

    @property
    def connections(self) -> Set[object]: ...
    @property
    def evicted(self) -> int: ...
    @property
    def refused(self) -> int: ...
    @property
    def shed(self) -> int: ...
    @property
    def head_timeouts(self) -> int: ...
    @property
    def accept_errors(self) -> _Total: ...


class _ListenerCollector(Collector):
    def __init__(self, metrics: GuardMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        listener = self._metrics.listener
        if listener is None:
            return
        yield GaugeMetricFamily(
            "spotstart_guard_connections_open",
            "connections open on the guard's port",
            value=len(listener.connections),
        )
        closed = CounterMetricFamily(
            "spotstart_guard_connections_closed",
            "connections the guard's port closed to stay up: evicted (idle or an unfinished "
            "head, to make room at the cap), refused (503 at the cap, every connection in a "
            "request), shed (out of descriptors), head_timeout (no complete head in time)",
            labels=["reason"],
        )
        for reason, n in (
            ("evicted", listener.evicted),
            ("refused", listener.refused),
            ("shed", listener.shed),
            ("head_timeout", listener.head_timeouts),
        ):
            closed.add_metric([reason], n)
        yield closed
        yield CounterMetricFamily(
            "spotstart_guard_accept_errors",
            "accept() failures on the guard's port (EMFILE...), logged once per interval",
            value=listener.accept_errors.total,
        )


class GuardMetrics:
    """Every metric of one guard; ``render()`` is the /metrics body. ``watcher_faults`` gives
    each watcher's fault counts at scrape time."""

    def __init__(
        self, controller: DrainController, watcher_faults: FaultSources = lambda: ()
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_ControllerCollector(controller))
        self.registry.register(_WatcherCollector(watcher_faults))
        self.listener: ListenerCounts | None = None  # set by the proxy once it listens
        self.registry.register(_ListenerCollector(self))
        self.notices = Counter(
            "spotstart_guard_notices",
            "preemption notices received",
            ["source", "kind", "action"],
            registry=self.registry,
        )
        self.notice_to_unready = Histogram(
            "spotstart_guard_notice_to_unready_seconds",
            "time from a watcher receiving a notice to the guard reporting unready",
            buckets=_UNREADY_BUCKETS,
            registry=self.registry,
        )
        self.upstream_latency = Histogram(
            "spotstart_guard_upstream_latency_seconds",
            "time from forwarding a request to receiving the upstream's response headers",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.streams_announced = Counter(
            "spotstart_guard_streams_announced",
            "streams of requests carrying X-Spotstart-Continue (a router in front) told of a "
            "drain by an SSE comment (': spotstart-drain deadline_ms=...')",
            registry=self.registry,
        )
        self.streams_cut_early = Counter(
            "spotstart_guard_streams_cut_early",
            "such streams cut --continue-grace after a notice, before the drain deadline, so "
            "that the router continues them elsewhere in time (counted dropped too)",
            registry=self.registry,
        )
        self.upstream_health_checks = Counter(
            "spotstart_guard_upstream_health_checks",
            "upstream health polls by result",
            ["result"],
            registry=self.registry,
        )

        # --engine-cache: one restore before the server starts, at most one publish after
        self.engine_cache_restores = Counter(
            "spotstart_guard_engine_cache_restores",
            "engine cache restores before the server started, by outcome (hit: the server "
            "started warm; miss, failed, skipped: cold)",
            ["outcome"],
            registry=self.registry,
        )
        self.engine_cache_restore_seconds = Gauge(
            "spotstart_guard_engine_cache_restore_seconds",
            "how long the engine cache restore delayed the server's start",
            registry=self.registry,
        )
        self.engine_cache_restore_bytes = Gauge(
            "spotstart_guard_engine_cache_restore_bytes",
            "bytes of engine cache restored (0 on a miss)",
            registry=self.registry,
        )
        self.engine_cache_publishes = Counter(
            "spotstart_guard_engine_cache_publishes",
            "engine cache publishes after the server's first ready, by outcome (published, "
            "exists: another replica was first, failed, skipped, cancelled: by a notice)",
            ["outcome"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
