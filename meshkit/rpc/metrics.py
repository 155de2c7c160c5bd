"""Prometheus metrics for RPC, client and server side, as a middleware.

Metric objects are created once per ``CollectorRegistry`` and labelled by
service and method, so several services (and clients) share one process.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from ..errors import MeshkitError
from .context import CallContext
from .pipeline import Next

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

APP_ERROR = "APP_ERROR"  # an exception declared in the IDL


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
        self.requests = Counter(
            f"{prefix}_requests",
            f"RPC calls by {who}, method and status code",
            ["service", "method", "code"],
            registry=registry,
        )
        self.latency = Histogram(
            f"{prefix}_latency_seconds",
            f"RPC latency by {who} and method",
            ["service", "method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            f"{prefix}_in_flight", f"RPC calls in flight by {who}", ["service"], registry=registry
        )
        # In-flight counts are plain ints read at scrape time: two lock round-trips
        # per call saved on the hot path.
        self.in_flight_counts: dict[str, int] = {}
        self.connections = Gauge(
            f"{prefix}_connections",
            f"Open RPC connections by {who}",
            ["service"],
            registry=registry,
        )

    def track_in_flight(self, service: str) -> None:
        """Expose ``in_flight_counts[service]`` as the in-flight gauge of ``service``."""
        if service not in self.in_flight_counts:
            self.in_flight_counts[service] = 0
            counts = self.in_flight_counts
            self.in_flight.labels(service).set_function(lambda: counts.get(service, 0))

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


class MetricsMiddleware:
    """Count calls, observe latency and track in-flight calls."""

    name = "metrics"

    def __init__(self, metrics: RpcMetrics, service: str | None = None) -> None:
        self.metrics = metrics
        self.service = service
        self._latency: dict[tuple[str, str], Any] = {}
        self._in_flight = metrics.in_flight_counts
        self._requests: dict[tuple[str, str, str], Any] = {}

    async def __call__(self, ctx: CallContext, call_next: Next) -> Any:
        service = self.service or ctx.service
        in_flight = self._in_flight
        if service not in in_flight:
            self.metrics.track_in_flight(service)
        latency = self._latency.get((service, ctx.method))
        if latency is None:
            latency = self._latency[(service, ctx.method)] = self.metrics.latency.labels(
                service, ctx.method
            )
        in_flight[service] += 1
        start = time.perf_counter()
        error: BaseException | None = None
        try:
            return await call_next(ctx)
        except BaseException as exc:
            error = exc
            raise
        finally:
            latency.observe(time.perf_counter() - start)
            in_flight[service] -= 1
            key = (service, ctx.method, status_label(error, ctx))
            counter = self._requests.get(key)
            if counter is None:
                counter = self._requests[key] = self.metrics.requests.labels(*key)
            counter.inc()
