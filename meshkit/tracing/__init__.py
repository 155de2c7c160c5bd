"""Call-chain tracing on OpenTelemetry: spans, propagation, export, and the bundled collector.

* :class:`~meshkit.tracing.otel.OTelHook` — the RPC pipeline's client/server spans;
* :func:`setup_tracing` — install meshkit's SDK provider (done for you on the first call
  when ``MESHKIT_TRACES`` is set and the application has no provider);
* :func:`flush` — export what is queued now;
* :func:`add_trace_context` — structlog processor adding ``trace_id``/``span_id``;
* ``inject_*``/``extract_*`` — W3C context on string mappings (RPC, HTTP) and Kafka headers;
* :mod:`meshkit.tracing.collector` — ``meshkit traces serve``: OTLP/HTTP in, SQLite, viewer.
"""

from .logcontext import add_trace_context
from .propagation import extract_kafka, extract_mapping, inject_kafka, inject_mapping
from .provider import TraceSettings, flush, set_identity, setup_tracing

__all__ = [
    "TraceSettings",
    "add_trace_context",
    "extract_kafka",
    "extract_mapping",
    "flush",
    "inject_kafka",
    "inject_mapping",
    "set_identity",
    "setup_tracing",
]
