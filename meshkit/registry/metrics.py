"""Discovery metrics: how many instances each followed service has, and whether the
snapshot is stale (registry unreachable, last known snapshot in use)."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

from prometheus_client import REGISTRY, CollectorRegistry, Gauge


class DiscoveryMetrics:
    """Gauges read at scrape time from the resolvers that registered them."""

    _lock = threading.Lock()
    _instances: weakref.WeakKeyDictionary[CollectorRegistry, DiscoveryMetrics] = (
        weakref.WeakKeyDictionary()
    )

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

    @classmethod
    def get(cls, registry: CollectorRegistry | None = None) -> DiscoveryMetrics:
        registry = REGISTRY if registry is None else registry
        with cls._lock:
            metrics = cls._instances.get(registry)
            if metrics is None:
                metrics = cls._instances[registry] = cls(registry)
            return metrics

    def track(self, service: str, count: Callable[[], int], stale: Callable[[], bool]) -> None:
        """Report ``service`` from these callables (the latest resolver wins)."""
        self.instances.labels(service).set_function(count)
        self.stale.labels(service).set_function(lambda: 1.0 if stale() else 0.0)
