"""Prometheus metrics of Kafka workers and publishers (one family per registry).

Consumer lag per partition is what the platform scales workers on.
"""

from __future__ import annotations

import weakref
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .._metrics import PerRegistry

HANDLER_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


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
        self.processed = Counter(
            "meshkit_mq_processed",
            "Messages whose handler finished without error",
            labels,
            registry=registry,
        )
        self.failed = Counter(
            "meshkit_mq_failed",
            "Handler attempts that raised (each attempt counts)",
            labels,
            registry=registry,
        )
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
        self.latency = Histogram(
            "meshkit_mq_handler_seconds",
            "Handler latency per attempt",
            labels,
            buckets=HANDLER_BUCKETS,
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


class ProducerMetrics(PerRegistry):
    """Publisher metrics, labelled by topic."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.published = Counter(
            "meshkit_mq_published",
            "Messages acknowledged by the broker (outcome=ok) or failed (outcome=error)",
            ["topic", "outcome"],
            registry=registry,
        )
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
