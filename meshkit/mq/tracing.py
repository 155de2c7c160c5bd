"""Producer and consumer spans for Kafka messages (OpenTelemetry messaging conventions).

The producer span (kind PRODUCER, ``<topic> publish``) is injected into the message
headers as W3C ``traceparent``/``tracestate``/``baggage``. The consumer span (kind
CONSUMER, ``<topic> process``) is a child of that context and also links to it, so the
call chain reads producer → consumer in a trace viewer, and batch-aware backends see the
link. Without an OpenTelemetry SDK no span is recorded, but an incoming context is still
made current while the handler runs, so logs carry its trace id and downstream calls
continue the trace.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode

from ..tracing.propagation import extract_kafka, inject_kafka
from .headers import RawHeaders

_recheck_after = 1.0
#: until when (``time.monotonic()``) ``recording_cached`` answers :func:`recording`
#: (hot paths read the two directly to skip a call)
recording_until = 0.0
recording_cached = False


def _context_getter() -> Any:
    """A call returning the current OpenTelemetry context (an empty, falsy mapping when
    nothing is current): the runtime's context variable's ``get`` when it is the
    standard contextvars runtime (one C call), else ``otel_context.get_current``."""
    from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext

    runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    if type(runtime) is ContextVarsRuntimeContext:
        return runtime._current_context.get
    return otel_context.get_current


#: the current OpenTelemetry context; falsy when nothing (no span, no baggage) is current
current_context = _context_getter()
_EMPTY = otel_context.Context()


def recording() -> bool:
    """Whether an OpenTelemetry SDK is installed (rechecked at most once a second)."""
    global recording_until, recording_cached
    now = time.monotonic()
    if now < recording_until:
        return recording_cached
    provider = trace.get_tracer_provider()
    recording_cached = not isinstance(
        provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)
    )
    recording_until = now + _recheck_after
    return recording_cached


def _tracer() -> trace.Tracer:
    return trace.get_tracer("meshkit.mq")


def start_producer_span(
    topic: str, key: bytes | None, headers: list[tuple[str, bytes]]
) -> Span | None:
    """Start the PRODUCER span and inject its context into ``headers`` (in place).

    Without an SDK, the current context (if any) is injected and ``None`` returned.
    """
    if not recording():
        # An empty context (the common case without tracing) has no span to inject.
        if otel_context.get_current() and trace.get_current_span().get_span_context().is_valid:
            inject_kafka(headers)
        return None
    attributes: dict[str, Any] = {
        "messaging.system": "kafka",
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "messaging.destination.name": topic,
    }
    if key is not None:
        attributes["messaging.kafka.message.key"] = key.decode("utf-8", "replace")
    span = _tracer().start_span(f"{topic} publish", kind=SpanKind.PRODUCER, attributes=attributes)
    inject_kafka(headers, trace.set_span_in_context(span))
    return span


def end_producer_span(
    span: Span | None, partition: int | None, offset: int | None, error: str | None
) -> None:
    if span is None:
        return
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, error))
    else:
        if partition is not None:
            span.set_attribute("messaging.destination.partition.id", str(partition))
        if offset is not None:
            span.set_attribute("messaging.kafka.offset", offset)
    span.end()


def _pairs(headers: RawHeaders) -> list[tuple[str, bytes | str | None]]:
    if headers is None:
        return []
    if isinstance(headers, Mapping):
        return list(headers.items())
    return list(headers)


def has_trace_headers(headers: RawHeaders) -> bool:
    if not headers:
        return False
    if isinstance(headers, Mapping):
        return "traceparent" in headers
    return any(name == "traceparent" for name, _ in headers)


class ConsumerSpan:
    """The CONSUMER span around one handler run, current while the handler runs."""

    __slots__ = ("span", "token")

    def __init__(
        self,
        topic: str,
        group: str,
        partition: int,
        offset: int,
        key: bytes | None,
        headers: RawHeaders,
    ) -> None:
        self.span: Span | None = None
        # A message without trace headers starts a new trace: the parent is an empty
        # context, not whatever was current when the worker started.
        parent = extract_kafka(_pairs(headers)) if has_trace_headers(headers) else _EMPTY
        if not recording():
            # the handler runs in the message's context (nothing more): attached unless
            # both it and the current one are empty (the common case without tracing)
            self.token = otel_context.attach(parent) if parent or current_context() else None
            return
        attributes: dict[str, Any] = {
            "messaging.system": "kafka",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": topic,
            "messaging.consumer.group.name": group,
            "messaging.destination.partition.id": str(partition),
            "messaging.kafka.offset": offset,
        }
        if key is not None:
            attributes["messaging.kafka.message.key"] = key.decode("utf-8", "replace")
        links = []
        if parent:
            producer = trace.get_current_span(parent).get_span_context()
            if producer.is_valid:
                links.append(Link(producer))
        self.span = _tracer().start_span(
            f"{topic} process",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            links=links,
        )
        self.token = otel_context.attach(trace.set_span_in_context(self.span, parent))

    def end(self, error: BaseException | None) -> None:
        try:
            if self.span is not None:
                if error is not None:
                    self.span.record_exception(error)
                    self.span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}"))
                self.span.end()
        finally:
            if self.token is not None:
                otel_context.detach(self.token)
