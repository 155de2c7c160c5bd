"""W3C trace context on meshkit's HTTP endpoints (aiohttp middleware).

A request carrying ``traceparent`` continues its caller's trace (and baggage): the
handler runs in it (its log lines carry the trace id) and, when a tracer provider
records, inside a ``SERVER`` span named ``<METHOD> <route>`` (the route template, e.g.
``GET /info``; just ``<METHOD>`` for a path no route matches, so unknown paths do not
make new span names). Requests without ``traceparent`` (the platform's probes every
few seconds) create no span. As in OpenTelemetry's HTTP server conventions, the span records
``http.response.status_code`` and is an error only for a 5xx answer (or an exception
that is not an HTTP answer): a 404 or 405 is the client's mistake, not the server's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from . import w3c
from .provider import identity

__all__ = ["trace_context_middleware"]

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# OpenTelemetry's known HTTP methods; any other is named ``_OTHER`` (bounded names)
_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)


def _route(request: web.Request) -> str | None:
    """The template of the route that matched (``/info``), or ``None``."""
    route = request.match_info.route
    resource = None if route is None else route.resource
    return None if resource is None else resource.canonical


@web.middleware
async def trace_context_middleware(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Extract ``traceparent``/``tracestate``/``baggage`` and run the handler in that context."""
    if "traceparent" not in request.headers:
        return await handler(request)
    parent = w3c.extract(request.headers)  # the caller's context only
    method = request.method if request.method in _METHODS else "_OTHER"
    route = _route(request)
    attributes = {
        "http.request.method": method,
        "url.path": request.path,
        "meshkit.service": identity().get("service", "http"),
    }
    if route is not None:
        attributes["http.route"] = route
    span = trace.get_tracer("meshkit.http").start_span(
        method if route is None else f"{method} {route}",
        context=parent,
        kind=SpanKind.SERVER,
        attributes=attributes,
    )
    token = otel_context.attach(trace.set_span_in_context(span, parent))
    try:
        response = await handler(request)
        _answered(span, response.status)
        return response
    except web.HTTPException as exc:  # an HTTP answer raised (404, 405, a redirect, …)
        _answered(span, exc.status)
        raise
    except BaseException as exc:
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        span.end()
        otel_context.detach(token)


def _answered(span: trace.Span, status: int) -> None:
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))
