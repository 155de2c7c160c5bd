"""``trace_id`` and ``span_id`` on every log line written inside a span.

:func:`add_trace_context` is a structlog processor; ``Service.run`` passes it to
:func:`meshkit.logs.configure_logging`, so every line a handler (or meshkit's per-call
access log, ``MESHKIT_LOG_LEVEL=debug``) writes while a call is in flight can be matched
with its trace in the viewer. Lines written outside any span are left alone.
"""

from __future__ import annotations

from opentelemetry import trace
from structlog.typing import EventDict, WrappedLogger

__all__ = ["add_trace_context"]


def add_trace_context(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """Add ``trace_id``/``span_id`` (hex, as the viewer and OTLP backends show them)."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event_dict.setdefault("trace_id", format(context.trace_id, "032x"))
        event_dict.setdefault("span_id", format(context.span_id, "016x"))
    return event_dict
