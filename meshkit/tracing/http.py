"""W3C trace context on meshkit's HTTP endpoints (aiohttp middleware).

A request carrying ``traceparent`` continues its caller's trace: the handler runs in that
context (its log lines carry the trace id) and, when a tracer provider records, inside a
``SERVER`` span named ``<METHOD> <path>``. Requests without ``traceparent`` (the
platform's probes every few seconds) create no span.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from .provider import identity

__all__ = ["trace_context_middleware"]

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def trace_context_middleware(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Extract ``traceparent``/``tracestate``/``baggage`` and run the handler in that context."""
    if "traceparent" not in request.headers:
        return await handler(request)
    parent = propagate.extract(request.headers)
    tracer = trace.get_tracer("meshkit.http")
    span = tracer.start_span(
        f"{request.method} {request.path}",
        context=parent,
        kind=SpanKind.SERVER,
        attributes={
            "http.request.method": request.method,
            "url.path": request.path,
            "meshkit.service": identity().get("service", "http"),
        },
    )
    token = otel_context.attach(trace.set_span_in_context(span, parent))
    try:
        response = await handler(request)
        span.set_attribute("http.response.status_code", response.status)
        if response.status >= 500:
            span.set_status(Status(StatusCode.ERROR, f"HTTP {response.status}"))
        return response
    except BaseException as exc:
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        span.end()
        otel_context.detach(token)
