"""The OpenTelemetry tracer hook for the RPC pipeline.

Spans are created through ``opentelemetry-api``: when no SDK is installed they
are non-recording and nearly free, yet a caller's ``traceparent`` is still
carried on to the next hop, so a trace is never broken by a meshkit service.
"""

from __future__ import annotations

import time
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from ..errors import MeshkitError


class OTelHook:
    """Client and server spans (Dapper's cs/cr and sr/ss) with W3C propagation."""

    # How long the answer to "is an SDK installed?" is reused (asking reads os.environ).
    recheck_after = 1.0

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        self._provider = tracer_provider
        self._recording_until = 0.0
        self._recording_cached = False

    def _tracer(self) -> trace.Tracer:
        # Looked up per call so a provider installed after start-up is honoured.
        return trace.get_tracer("meshkit", tracer_provider=self._provider)

    def _recording(self) -> bool:
        now = time.monotonic()
        if now < self._recording_until:
            return self._recording_cached
        provider = self._provider or trace.get_tracer_provider()
        recording = not isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider))
        self._recording_cached = recording
        self._recording_until = now + self.recheck_after
        return recording

    def start_client(self, ctx: Any) -> Any:
        if not self._recording():
            # No SDK: no spans to record, but carry on a trace someone else started.
            if trace.get_current_span().get_span_context().is_valid:
                propagate.inject(ctx.headers)
            return None
        span = self._tracer().start_span(
            f"{ctx.service}/{ctx.method}",
            kind=SpanKind.CLIENT,
            attributes={
                "rpc.system": "thrift",
                "rpc.service": ctx.service,
                "rpc.method": ctx.method,
            },
        )
        token = otel_context.attach(trace.set_span_in_context(span))
        propagate.inject(ctx.headers)
        return span, token

    def start_server(self, ctx: Any) -> Any:
        if not self._recording():
            if "traceparent" not in ctx.headers:
                return None
            return None, otel_context.attach(propagate.extract(ctx.headers))
        parent = propagate.extract(ctx.headers)
        span = self._tracer().start_span(
            f"{ctx.service}/{ctx.method}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "rpc.system": "thrift",
                "rpc.service": ctx.service,
                "rpc.method": ctx.method,
                "net.peer.name": ctx.peer,
            },
        )
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        return span, token

    def end(self, handle: Any, ctx: Any, error: BaseException | None) -> None:
        if handle is None:
            return
        span, token = handle
        if span is None:
            otel_context.detach(token)
            return
        try:
            if span.is_recording():
                if ctx.peer:
                    span.set_attribute("net.peer.name", ctx.peer)
                if error is not None:
                    code = error.code.value if isinstance(error, MeshkitError) else "INTERNAL"
                    span.set_attribute("meshkit.status_code", code)
                    span.set_status(Status(StatusCode.ERROR, str(error)))
            span.end()
        finally:
            otel_context.detach(token)
