"""W3C trace context on the RPC hot path, without the propagator machinery.

When the global propagator is OpenTelemetry's default (W3C trace context + W3C baggage),
``traceparent`` is written and read here directly: the composite propagator's generic
path (getter/setter objects, a regular expression, a context copy per propagator) costs
several microseconds per call on both sides. Anything unusual — another propagator
configured, a ``traceparent`` of another version or shape, baggage present — goes
through ``opentelemetry.propagate`` as before, so the behaviour is the specification's.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping

from opentelemetry import baggage, propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = ["extract", "inject", "uses_default_propagators"]

_checked: tuple[object, bool] = (None, False)
_baggage = W3CBaggagePropagator()
_HEX = frozenset("0123456789abcdef")
_FLAGS = {n: TraceFlags(n) for n in range(256)}


def uses_default_propagators() -> bool:
    """Whether the global propagator is exactly W3C trace context + W3C baggage."""
    global _checked
    textmap = propagate.get_global_textmap()
    if _checked[0] is textmap:
        return _checked[1]
    parts = getattr(textmap, "_propagators", None)
    ok = (
        isinstance(textmap, CompositePropagator)
        and parts is not None
        and [type(p) for p in parts] == [TraceContextTextMapPropagator, W3CBaggagePropagator]
    )
    _checked = (textmap, ok)
    return ok


def inject(headers: MutableMapping[str, str], span_context: SpanContext) -> None:
    """Write ``span_context`` (and the current baggage) as the default propagators would."""
    if not uses_default_propagators():
        propagate.inject(headers)
        return
    if span_context.is_valid:
        headers["traceparent"] = (
            f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-"
            f"{int(span_context.trace_flags) & 0xFF:02x}"
        )
        if span_context.trace_state:
            headers["tracestate"] = span_context.trace_state.to_header()
    if baggage.get_all():
        _baggage.inject(headers)


def extract(headers: Mapping[str, str]) -> Context:
    """The caller's context from ``headers``; as ``propagate.extract`` would return it."""
    if not uses_default_propagators():
        return propagate.extract(headers)
    parent = headers.get("traceparent")
    if (
        parent is None
        or len(parent) != 55
        or not parent.startswith("00-")
        or parent[35] != "-"
        or parent[52] != "-"
        or not _HEX.issuperset(parent[3:35] + parent[36:52] + parent[53:])
    ):
        return propagate.extract(headers)  # absent, or anything but plain version 00
    trace_id = int(parent[3:35], 16)
    span_id = int(parent[36:52], 16)
    if trace_id == 0 or span_id == 0:
        return propagate.extract(headers)
    state_header = headers.get("tracestate")
    state = TraceState.from_header([state_header]) if state_header else TraceState()
    context = trace.set_span_in_context(
        NonRecordingSpan(
            SpanContext(
                trace_id,
                span_id,
                is_remote=True,
                trace_flags=_FLAGS[int(parent[53:], 16)],
                trace_state=state,
            )
        )
    )
    if "baggage" in headers:
        context = _baggage.extract(headers, context=context)
    return context
