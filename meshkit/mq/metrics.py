"""Prometheus metrics of Kafka workers and publishers (one family per registry).

Consumer lag per partition is what the platform scales workers on.

Per-message counts (handled, failed, handler latency, published) are plain numbers kept
by each worker and publisher (one event loop writes them) and summed into Prometheus
families only when ``/metrics`` is scraped: prometheus-client's ``Counter.inc`` and
``Histogram.observe`` take a lock per value, which measured as about a fifth of the
worker's Python time per message.
"""

from __future__ import annotations

import threading
import weakref
from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .._metrics import PerRegistry

HANDLER_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


class HandlerStats:
    """Counts of one (group, topic): handled, failed attempts, latency buckets and sum."""

    __slots__ = ("buckets", "failed", "processed", "total")

    def __init__(self) -> None:
        self.processed = 0
        self.failed = 0
        self.buckets = [0] * (len(HANDLER_BUCKETS) + 1)  # not cumulative; the last is +Inf
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        """One handler attempt took ``seconds``."""
        self.buckets[bisect_left(HANDLER_BUCKETS, seconds)] += 1
        self.total += seconds

    def add(self, other: HandlerStats) -> None:
        self.processed += other.processed
        self.failed += other.failed
        for i, n in enumerate(other.buckets):
            self.buckets[i] += n
        self.total += other.total


HandlerTable = dict[tuple[str, str], HandlerStats]


def _merge(into: HandlerTable, table: HandlerTable) -> None:
    for key, stats in table.items():
        mine = into.get(key)
        if mine is None:
            mine = into[key] = HandlerStats()
        mine.add(stats)


class _HandlerCollector(Collector):
    """Sums every live worker's table (and those of collected ones) at scrape time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: weakref.WeakSet[Any] = weakref.WeakSet()
        self._retired: HandlerTable = {}

    def adopt(self, owner: object, table: HandlerTable) -> None:
        """Report ``table`` while ``owner`` lives; keep its counts after (counters never drop)."""
        with self._lock:
            self._live.add(owner)
        weakref.finalize(owner, self._retire, table)

    def _retire(self, table: HandlerTable) -> None:
        with self._lock:
            _merge(self._retired, table)

    def describe(self) -> list[Metric]:
        return self._families()

    @staticmethod
    def _families() -> list[Metric]:
        return [
            CounterMetricFamily(
                "meshkit_mq_processed",
                "Messages whose handler finished without error",
                labels=["group", "topic"],
            ),
            CounterMetricFamily(
                "meshkit_mq_failed",
                "Handler attempts that raised (each attempt counts)",
                labels=["group", "topic"],
            ),
            HistogramMetricFamily(
                "meshkit_mq_handler_seconds",
                "Handler latency per attempt",
                labels=["group", "topic"],
            ),
        ]

    def snapshot(self) -> HandlerTable:
        totals: HandlerTable = {}
        with self._lock:
            _merge(totals, self._retired)
            owners = list(self._live)
        for owner in owners:
            # dict() copies atomically under the GIL; the owner's loop may be writing.
            _merge(totals, dict(owner.handler_stats))
        return totals

    def collect(self) -> Iterator[Metric]:
        processed, failed, latency = self._families()
        assert isinstance(processed, CounterMetricFamily)
        assert isinstance(failed, CounterMetricFamily)
        assert isinstance(latency, HistogramMetricFamily)
        for labels, stats in sorted(self.snapshot().items()):
            processed.add_metric(list(labels), stats.processed)
            failed.add_metric(list(labels), stats.failed)
            cumulative = 0
            buckets = []
            for bound, n in zip((*HANDLER_BUCKETS, float("inf")), stats.buckets, strict=True):
                cumulative += n
                buckets.append((floatToGoString(bound), cumulative))
            latency.add_metric(list(labels), buckets, stats.total)
        yield processed
        yield failed
        yield latency


class _PublishedCollector(Collector):
    """``meshkit_mq_published``: every live publisher's counts (and collected ones')."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: weakref.WeakSet[Any] = weakref.WeakSet()
        self._retired: dict[tuple[str, str], int] = {}

    def adopt(self, owner: object, counts: dict[tuple[str, str], int]) -> None:
        """Report ``counts`` ((topic, outcome) → n) while ``owner`` lives, and after."""
        with self._lock:
            self._live.add(owner)
        weakref.finalize(owner, self._retire, counts)

    def _retire(self, counts: dict[tuple[str, str], int]) -> None:
        with self._lock:
            for key, n in counts.items():
                self._retired[key] = self._retired.get(key, 0) + n

    @staticmethod
    def _family() -> CounterMetricFamily:
        return CounterMetricFamily(
            "meshkit_mq_published",
            "Messages acknowledged by the broker (outcome=ok) or failed (outcome=error)",
            labels=["topic", "outcome"],
        )

    def describe(self) -> list[Metric]:
        return [self._family()]

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            totals = dict(self._retired)
            owners = list(self._live)
        for owner in owners:
            for key, n in dict(owner.published_counts).items():
                totals[key] = totals.get(key, 0) + n
        family = self._family()
        for (topic, outcome), n in sorted(totals.items()):
            family.add_metric([topic, outcome], n)
        yield family


class ConsumerMetrics(PerRegistry):
    """Worker metrics, labelled by consumer group and topic."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["group", "topic"]
        self.lag = Gauge(
            "meshkit_mq_consumer_lag",
            "Messages not yet committed by the group: high watermark minus committed offset",
            ["group", "topic", "partition"],
            registry=registry,
        )
        # processed, failed and handler latency: plain counts summed at scrape time.
        self.handlers = _HandlerCollector()
        registry.register(self.handlers)
        self.retried = Counter(
            "meshkit_mq_retried",
            "Retries: in place (stage=inplace) or by moving to a retry topic (stage=topic)",
            [*labels, "stage"],
            registry=registry,
        )
        self.dead_lettered = Counter(
            "meshkit_mq_dead_lettered",
            "Messages moved to the dead-letter topic, by reason (poison, rejected, exhausted)",
            [*labels, "reason"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "meshkit_mq_in_flight",
            "Messages fetched and not yet finished (queued in lanes or running)",
            ["group"],
            registry=registry,
        )
        self.rebalances = Counter(
            "meshkit_mq_rebalances",
            "Partition assignments and revocations seen by the worker",
            ["group", "kind"],
            registry=registry,
        )
        self._workers: weakref.WeakSet[Any] = weakref.WeakSet()

    def track_in_flight(self, worker: Any) -> None:
        """Show ``worker.in_flight`` (summed over the group's workers) at scrape time."""
        group = worker.group
        workers = self._workers
        workers.add(worker)
        self.in_flight.labels(group).set_function(
            lambda: sum(w.in_flight for w in list(workers) if w.group == group)
        )


class ProducerMetrics(PerRegistry):
    """Publisher metrics, labelled by topic."""

    def __init__(self, registry: CollectorRegistry) -> None:
        # Published counts: plain numbers per publisher, summed at scrape time.
        self.published = _PublishedCollector()
        registry.register(self.published)
        self.buffer_full = Counter(
            "meshkit_mq_publish_buffer_full",
            "Publish calls refused because the producer buffer was full",
            ["topic"],
            registry=registry,
        )
        self.buffered = Gauge(
            "meshkit_mq_publish_buffered",
            "Messages waiting in producer buffers for a delivery report",
            registry=registry,
        )
        # Read at scrape time: no lock round trip per published message.
        self.publishers: weakref.WeakSet[Any] = weakref.WeakSet()
        self.buffered.set_function(lambda: sum(p.pending for p in list(self.publishers)))
