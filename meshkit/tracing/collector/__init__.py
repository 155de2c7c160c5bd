"""The bundled trace collector: OTLP/HTTP in, SQLite store, JSON API, web viewer.

``meshkit traces serve`` runs it; :class:`Collector` and :class:`SpanStore` embed it
(the demo and the tests do).
"""

from .server import Collector, serve
from .store import SpanStore, StoreFull

__all__ = ["Collector", "SpanStore", "StoreFull", "serve"]
