"""One metric family per Prometheus registry, shared by everything in the process.

prometheus-client refuses to register a metric name twice in one registry, yet many
objects (clients, servers, policies) want the same family. A :class:`PerRegistry`
subclass builds its metrics in ``__init__(registry)``; ``get(registry)`` returns the
one instance for that registry, created on first use. The cache holds registries
weakly: an ``id()`` could be reused by a new registry after the old one is collected.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Self

from prometheus_client import REGISTRY, CollectorRegistry


class PerRegistry:
    """Base class for a metric family created once per ``CollectorRegistry``."""

    _lock = threading.Lock()
    _caches: weakref.WeakKeyDictionary[CollectorRegistry, dict[type, Any]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, registry: CollectorRegistry) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def get(cls, registry: CollectorRegistry | None = None) -> Self:
        """The shared instance for ``registry`` (default: the global one)."""
        registry = REGISTRY if registry is None else registry
        with PerRegistry._lock:
            cache = PerRegistry._caches.setdefault(registry, {})
            metrics = cache.get(cls)
            if metrics is None:
                metrics = cache[cls] = cls(registry)
            return metrics  # type: ignore[no-any-return]
