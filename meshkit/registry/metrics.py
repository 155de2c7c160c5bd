"""Discovery metrics: how many instances each followed service has, and whether the
snapshot is stale (registry unreachable, last known snapshot in use)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Gauge

from .._metrics import PerRegistry


class DiscoveryMetrics(PerRegistry):
    """Gauges read at scrape time from the resolvers that registered them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.instances = Gauge(
            "meshkit_discovery_instances",
            "Instances in the client's current snapshot, by called service",
            ["service"],
            registry=registry,
        )
        self.stale = Gauge(
            "meshkit_discovery_stale",
            "1 while the registry is unreachable and the last known snapshot is in use",
            ["service"],
            registry=registry,
        )

    def track(self, service: str, count: Callable[[], int], stale: Callable[[], bool]) -> None:
        """Report ``service`` from these callables (the latest resolver wins)."""
        self.instances.labels(service).set_function(count)
        self.stale.labels(service).set_function(lambda: 1.0 if stale() else 0.0)
