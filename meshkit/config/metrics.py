"""Config metrics: the version each instance runs, applied and rejected versions,
failing change callbacks, and whether the store is reachable."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from .._metrics import PerRegistry


class ConfigMetrics(PerRegistry):
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.version = Gauge(
            "meshkit_config_version",
            "Config version this instance runs, by namespace (0: nothing published)",
            ["service", "namespace"],
            registry=registry,
        )
        self.gray = Gauge(
            "meshkit_config_gray",
            "1 while this instance runs a gray (not yet promoted) config version",
            ["service", "namespace"],
            registry=registry,
        )
        self.applied = Counter(
            "meshkit_config_applied",
            "Config versions validated and applied",
            ["service", "namespace"],
            registry=registry,
        )
        self.rejected = Counter(
            "meshkit_config_rejected",
            "Config versions that failed validation and were not applied",
            ["service", "namespace"],
            registry=registry,
        )
        self.callback_errors = Counter(
            "meshkit_config_callback_errors",
            "Config change callbacks that raised",
            ["service"],
            registry=registry,
        )
        self.store_up = Gauge(
            "meshkit_config_store_up",
            "1 while the config store is reachable, 0 while the last good config is in use",
            ["service"],
            registry=registry,
        )
