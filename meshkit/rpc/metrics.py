"""Prometheus metrics for RPC, client and server side, as a middleware.

Metric families are created once per ``CollectorRegistry`` and labelled by
service and method, so several services (and clients) share one process.

Request counts and latency histograms are kept as plain numbers by each
:class:`MetricsMiddleware` (one event loop writes them) and summed into the
Prometheus families only when ``/metrics`` is scraped. prometheus-client's own
``Counter.inc`` and ``Histogram.observe`` take a lock per value (four per call),
which measured as a fifth of the smart client's per-call instructions.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ..errors import MeshkitError
from .context import CallContext
from .pipeline import HookStage

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

APP_ERROR = "APP_ERROR"  # an exception declared in the IDL


class MethodStats:
    """Counts of one (service, method): latency buckets (not cumulative), sum, codes.

    Successful calls are counted in ``ok`` (one attribute add per call instead of a
    dict update) and reported as code ``OK``; ``in_flight`` is a level, not a count.
    """

    __slots__ = ("buckets", "codes", "in_flight", "ok", "total")

    def __init__(self) -> None:
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.total = 0.0
        self.ok = 0
        self.codes: dict[str, int] = {}
        self.in_flight = 0

    def add(self, other: MethodStats) -> None:
        """Add ``other``'s counts (not its in-flight level)."""
        for i, n in enumerate(other.buckets):
            self.buckets[i] += n
        self.total += other.total
        self.ok += other.ok
        for code, n in other.codes.items():
            self.codes[code] = self.codes.get(code, 0) + n

    def code_counts(self) -> dict[str, int]:
        """Calls by status code, ``OK`` included."""
        codes = dict(self.codes)
        if self.ok:
            codes["OK"] = codes.get("OK", 0) + self.ok
        return codes


StatsTable = dict[tuple[str, str], MethodStats]


def _merge(into: StatsTable, table: StatsTable) -> None:
    for key, stats in table.items():
        mine = into.get(key)
        if mine is None:
            mine = into[key] = MethodStats()
        mine.add(stats)


class _CallCollector(Collector):
    """Sums every live middleware's table (and those of collected ones) at scrape time."""

    def __init__(self, prefix: str, who: str) -> None:
        self.prefix = prefix
        self.who = who
        self._lock = threading.Lock()
        self._live: weakref.WeakSet[Any] = weakref.WeakSet()
        self._retired: StatsTable = {}

    def adopt(self, owner: object, table: StatsTable) -> None:
        """Report ``table`` while ``owner`` lives; keep its counts after (counters never drop)."""
        with self._lock:
            self._live.add(owner)
        weakref.finalize(owner, self._retire, table)

    def _retire(self, table: StatsTable) -> None:
        with self._lock:
            _merge(self._retired, table)

    def describe(self) -> list[Metric]:
        return self._families()

    def _families(self) -> list[Metric]:
        return [
            CounterMetricFamily(
                f"{self.prefix}_requests",
                f"RPC calls by {self.who}, method and status code",
                labels=["service", "method", "code"],
            ),
            HistogramMetricFamily(
                f"{self.prefix}_latency_seconds",
                f"RPC latency by {self.who} and method",
                labels=["service", "method"],
            ),
        ]

    def snapshot(self) -> StatsTable:
        """The summed counts of every (service, method) seen so far."""
        totals: StatsTable = {}
        with self._lock:
            _merge(totals, self._retired)
            owners = list(self._live)
        for owner in owners:
            # dict() copies atomically under the GIL; the owner's loop may be writing.
            _merge(totals, dict(owner.table))
        return totals

    def in_flight(self, service: str) -> int:
        """Calls of ``service`` in flight now, over every live middleware."""
        with self._lock:
            owners = list(self._live)
        return sum(
            stats.in_flight
            for owner in owners
            for (name, _method), stats in list(owner.table.items())
            if name == service
        )

    def collect(self) -> Iterator[Metric]:
        requests, latency = self._families()
        assert isinstance(requests, CounterMetricFamily)
        assert isinstance(latency, HistogramMetricFamily)
        for (service, method), stats in sorted(self.snapshot().items()):
            for code, n in sorted(stats.code_counts().items()):
                requests.add_metric([service, method, code], n)
            cumulative = 0
            buckets = []
            for bound, n in zip((*LATENCY_BUCKETS, float("inf")), stats.buckets, strict=True):
                cumulative += n
                buckets.append((floatToGoString(bound), cumulative))
            latency.add_metric([service, method], buckets, stats.total)
        yield requests
        yield latency


class RpcMetrics:
    """The RPC metric family for one side (``server`` or ``client``) in one registry."""

    _lock = threading.Lock()
    # Keyed by the registry object itself (weakly): an id() could be reused by a new
    # registry after the old one is collected.
    _instances: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, RpcMetrics]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, registry: CollectorRegistry, side: str) -> None:
        prefix = f"meshkit_rpc_{side}"
        who = "called service" if side == "client" else "service"
        self.calls = _CallCollector(prefix, who)
        registry.register(self.calls)
        self.in_flight = Gauge(
            f"{prefix}_in_flight", f"RPC calls in flight by {who}", ["service"], registry=registry
        )
        # In-flight levels are plain ints on each MethodStats, summed at scrape time:
        # two lock round-trips per call saved on the hot path.
        self._tracked: set[str] = set()
        self.connections = Gauge(
            f"{prefix}_connections",
            f"Open RPC connections by {who}",
            ["service"],
            registry=registry,
        )

    def track_in_flight(self, service: str) -> None:
        """Expose the calls of ``service`` in flight as its in-flight gauge."""
        if service not in self._tracked:
            self._tracked.add(service)
            calls = self.calls
            self.in_flight.labels(service).set_function(lambda: calls.in_flight(service))

    @classmethod
    def get(cls, side: str, registry: CollectorRegistry | None = None) -> RpcMetrics:
        """The shared instance for ``side`` in ``registry`` (default: the global one)."""
        registry = REGISTRY if registry is None else registry
        with cls._lock:
            sides = cls._instances.setdefault(registry, {})
            metrics = sides.get(side)
            if metrics is None:
                metrics = sides[side] = cls(registry, side)
            return metrics


def status_label(exc: BaseException | None, ctx: CallContext) -> str:
    if exc is None:
        return APP_ERROR if ctx.extras.get("app_error") else "OK"
    if isinstance(exc, MeshkitError):
        return exc.code.value
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    return APP_ERROR if ctx.extras.get("app_error") else "INTERNAL"


class MetricsMiddleware(HookStage):
    """Count calls by status, record latency and track in-flight calls."""

    name = "metrics"

    def __init__(self, metrics: RpcMetrics, service: str | None = None) -> None:
        self.metrics = metrics
        self.service = service
        self.table: StatsTable = {}
        metrics.calls.adopt(self, self.table)

    def enter(self, ctx: CallContext) -> tuple[MethodStats, float]:
        key = (self.service or ctx.service, ctx.method)
        stats = self.table.get(key)
        if stats is None:
            self.metrics.track_in_flight(key[0])
            stats = self.table[key] = MethodStats()
        stats.in_flight += 1
        return stats, time.perf_counter()

    def exit(
        self, ctx: CallContext, token: tuple[MethodStats, float], error: BaseException | None
    ) -> None:
        stats, start = token
        elapsed = time.perf_counter() - start
        stats.in_flight -= 1
        stats.buckets[bisect_left(LATENCY_BUCKETS, elapsed)] += 1
        stats.total += elapsed
        if error is None and not (ctx.extras and "app_error" in ctx.extras):
            stats.ok += 1
            return
        code = status_label(error, ctx)
        codes = stats.codes
        codes[code] = codes.get(code, 0) + 1
