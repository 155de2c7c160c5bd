"""W3C trace context on the RPC hot path, without the propagator machinery.

When the global propagator is OpenTelemetry's default (W3C trace context + W3C baggage),
``traceparent`` is written and read here directly: the composite propagator's generic
path (getter/setter objects, a regular expression, a context copy per propagator) costs
several microseconds per call on both sides. Anything unusual — another propagator
configured, a ``traceparent`` of another version or shape, baggage present — goes
through ``opentelemetry.propagate`` as before, so the behaviour is the specification's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, MutableMapping

from opentelemetry import baggage, propagate, trace
from opentelemetry import context as otel_context
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.trace import (
    INVALID_SPAN_CONTEXT,
    NonRecordingSpan,
    SpanContext,
    TraceFlags,
    TraceState,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.trace.span import DEFAULT_TRACE_STATE

__all__ = ["extract", "extract_span_context", "inject", "uses_default_propagators"]

_checked: tuple[object, bool] = (None, False)
_baggage = W3CBaggagePropagator()
# version 00, lower-case hex ids and flags, nothing after (other shapes: the propagator)
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})").fullmatch
_BAGGAGE_KEY = getattr(baggage, "_BAGGAGE_KEY", None)
_runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
# the standard contextvars runtime's variable (see meshkit.tracing.otel._context_var)
_CONTEXT_VAR = _runtime._current_context if type(_runtime) is ContextVarsRuntimeContext else None


def _current_baggage() -> object:
    """The current baggage, or anything falsy when there is none (``baggage.get_all``
    wraps it in a new read-only mapping: a dict look-up is enough to know)."""
    if _BAGGAGE_KEY is None:
        return baggage.get_all()
    if _CONTEXT_VAR is not None:
        return _CONTEXT_VAR.get().get(_BAGGAGE_KEY)
    return otel_context.get_value(_BAGGAGE_KEY)


_FLAGS = {n: TraceFlags(n) for n in range(256)}
_FLAGS_HEX = {f"{n:02x}": flags for n, flags in _FLAGS.items()}
_new_context = tuple.__new__
_EMPTY = Context()
_NO_STATE = DEFAULT_TRACE_STATE


# the module global get_global_textmap() returns: read with one dict look-up per call
_PROPAGATE_GLOBALS = vars(propagate)
_TEXTMAP_NAME = "_HTTP_TEXT_FORMAT"


def uses_default_propagators() -> bool:
    """Whether the global propagator is exactly W3C trace context + W3C baggage."""
    global _checked
    if _checked[0] is _PROPAGATE_GLOBALS.get(_TEXTMAP_NAME, _PROPAGATE_GLOBALS):
        return _checked[1]
    textmap = propagate.get_global_textmap()
    parts = getattr(textmap, "_propagators", None)
    ok = (
        isinstance(textmap, CompositePropagator)
        and parts is not None
        and [type(p) for p in parts] == [TraceContextTextMapPropagator, W3CBaggagePropagator]
    )
    _checked = (textmap, ok)
    return ok


def inject(
    headers: MutableMapping[str, str],
    span_context: SpanContext,
    current: Mapping[str, object] | None = None,
) -> None:
    """Write ``span_context`` (and the current baggage) as the default propagators would.

    ``current``: the current context's values when the caller has them at hand (its
    baggage is the one written).
    """
    checked = _checked
    if (
        checked[0] is not _PROPAGATE_GLOBALS.get(_TEXTMAP_NAME) or not checked[1]
    ) and not uses_default_propagators():
        # the given span (a retry's or hedge's: not the current one) over the current context
        propagate.inject(headers, trace.set_span_in_context(NonRecordingSpan(span_context)))
        return
    if span_context[5]:  # is_valid (SpanContext fields by index: properties are calls)
        # trace id, span id, flags: the SpanContext tuple's fields 0, 1 and 3
        headers["traceparent"] = "00-%032x-%016x-%02x" % (  # noqa: UP031 (the fastest)
            span_context[0],
            span_context[1],
            span_context[3] & 0xFF,
        )
        state = span_context[4]
        if state is not _NO_STATE and state:
            headers["tracestate"] = state.to_header()
    if current is not None and _BAGGAGE_KEY is not None:
        if current.get(_BAGGAGE_KEY):
            _baggage.inject(headers)
    elif _current_baggage():
        _baggage.inject(headers)


def extract_span_context(headers: Mapping[str, str]) -> SpanContext | None:
    """The caller's span context when that is *all* ``headers`` carry, else ``None``.

    The server's fast path: with the default propagators, no ``baggage`` header and a
    plain version-00 ``traceparent`` (or none: the invalid context is returned), the
    context :func:`extract` would build holds nothing but this span context. ``None``
    means "call :func:`extract`".
    """
    if "baggage" in headers:
        return None
    checked = _checked
    if (
        checked[0] is not _PROPAGATE_GLOBALS.get(_TEXTMAP_NAME) or not checked[1]
    ) and not uses_default_propagators():
        return None
    parent = headers.get("traceparent")
    if parent is None:
        return INVALID_SPAN_CONTEXT
    if _TRACEPARENT(parent) is None:
        return None
    # matched: "00-" 32 hex digits "-" 16 hex digits "-" 2 hex digits
    trace_id = int(parent[3:35], 16)
    span_id = int(parent[36:52], 16)
    if trace_id == 0 or span_id == 0:
        return None
    state_header = headers.get("tracestate")
    state = TraceState.from_header([state_header]) if state_header else _NO_STATE
    # SpanContext(...) with ids known valid (non-zero, 128 and 64 bits): the same tuple
    return _new_context(  # type: ignore[no-any-return]
        SpanContext, (trace_id, span_id, True, _FLAGS_HEX[parent[53:]], state, True)
    )


def extract(headers: Mapping[str, str]) -> Context:
    """The caller's context from ``headers`` and nothing else (none of the current
    context's values: a request starts clean); as ``propagate.extract`` would return it
    given an empty context."""
    if not uses_default_propagators():
        return propagate.extract(headers, _EMPTY)
    parent = headers.get("traceparent")
    match = None if parent is None else _TRACEPARENT(parent)
    if match is None:
        return propagate.extract(headers, _EMPTY)  # absent, or anything but plain version 00
    trace_hex, span_hex, flags_hex = match.groups()
    trace_id = int(trace_hex, 16)
    span_id = int(span_hex, 16)
    if trace_id == 0 or span_id == 0:
        return propagate.extract(headers, _EMPTY)
    state_header = headers.get("tracestate")
    state = TraceState.from_header([state_header]) if state_header else _NO_STATE
    context = trace.set_span_in_context(
        NonRecordingSpan(
            SpanContext(
                trace_id,
                span_id,
                is_remote=True,
                trace_flags=_FLAGS[int(flags_hex, 16)],
                trace_state=state,
            )
        ),
        _EMPTY,
    )
    if "baggage" in headers:
        context = _baggage.extract(headers, context=context)
    return context
