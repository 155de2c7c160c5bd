"""The OpenTelemetry tracer hook for the RPC pipeline.

Spans are created through ``opentelemetry-api``: when no SDK is installed they are
non-recording and nearly free, yet a caller's ``traceparent`` is still carried on to the
next hop, so a trace is never broken by a meshkit service. When ``MESHKIT_TRACES`` is set
and the application installed no provider, the first call installs meshkit's
(:func:`meshkit.tracing.provider.setup_tracing`).

Spans of one call:

* client: one ``CLIENT`` span per logical call (``<service>/<method>``), covering the
  retries and hedges; attempt 0 travels on it. Every later attempt (a retry or a hedge)
  is a ``CLIENT`` child span of it (``<service>/<method> retry 1``, ``… hedge 1``) whose
  context is the one sent on the wire, so the server span of each attempt hangs under
  the attempt that sent it;
* server: one ``SERVER`` span, child of the caller's span from ``traceparent``.

Attributes: ``rpc.system``/``rpc.service``/``rpc.method``, ``meshkit.service`` (the
local service: the caller on the client, the callee on the server), ``net.peer.name``,
``meshkit.instance`` (the instance called, on the client; this instance, on the server),
``meshkit.status_code`` (``OK`` or the meshkit status), ``meshkit.attempt`` /
``meshkit.attempts``, ``meshkit.route`` (gray-release decision), ``meshkit.zone``,
``meshkit.hedged``, ``meshkit.hedge_lost`` (a hedge attempt cancelled because another
attempt answered first: ``meshkit.status_code=CANCELLED``, not an error),
``meshkit.deadline_ms`` (budget left when the span started),
``meshkit.app_error`` (an IDL exception).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import NonRecordingSpan, SpanKind, Status, StatusCode

from ..errors import ConfigError, MeshkitError
from . import provider as _provider
from . import w3c
from .tailspan import TailSpan

log = logging.getLogger(__name__)
_warned: set[str] = set()

_CLIENT = SpanKind.CLIENT
_SERVER = SpanKind.SERVER
_ERROR = StatusCode.ERROR


_EMPTY = otel_context.Context()
# opentelemetry.trace's globals: the installed provider read with one dict look-up
_TRACE_GLOBALS = vars(trace)
_dict_set = dict.__setitem__


def _context_var() -> tuple[Any, str] | None:
    """The context variable behind OpenTelemetry's runtime context and the current-span
    key, when it is the standard contextvars runtime (it always is unless
    ``OTEL_PYTHON_CONTEXT`` names another): then a span is made current with one
    ``ContextVar.set`` (what ``attach(set_span_in_context(span))`` does in six calls)."""
    from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
    from opentelemetry.trace import propagation

    runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    key = getattr(propagation, "_SPAN_KEY", None)
    if type(runtime) is ContextVarsRuntimeContext and isinstance(key, str):
        return runtime._current_context, key
    return None


_FAST_CONTEXT = _context_var()


def _make_current(span: Any, parent: Any = None) -> Any:
    """``attach(set_span_in_context(span, parent))``: the token to detach with."""
    if _FAST_CONTEXT is None:
        return otel_context.attach(trace.set_span_in_context(span, parent))
    var, key = _FAST_CONTEXT
    context = otel_context.Context(var.get() if parent is None else parent)
    _dict_set(context, key, span)  # (Context refuses item assignment; it is new here)
    return var.set(context)


# meshkit.tracing.fastspan.FastSpan once imported (it imports the SDK)
_fast_span_class: Any = None

_names: dict[tuple[str, str], str] = {}


def _name(service: str, method: str) -> str:
    """``<service>/<method>``, built once per pair (a service has a handful of methods)."""
    name = _names.get((service, method))
    if name is None:
        name = f"{service}/{method}"
        if len(_names) < 4096:
            _names[(service, method)] = name
    return name


def _client_attributes(ctx: Any, now: float) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "rpc.system": "thrift",
        "rpc.service": ctx.service,
        "rpc.method": ctx.method,
    }
    if ctx.caller:
        attributes["meshkit.service"] = ctx.caller
    if ctx.deadline is not None:
        attributes["meshkit.deadline_ms"] = round((ctx.deadline - now) * 1000, 1)
    return attributes


def _status_code(error: BaseException | None) -> str:
    if error is None:
        return "OK"
    if isinstance(error, MeshkitError):
        return str(error.code.value)
    if type(error).__name__ == "CancelledError":
        return "CANCELLED"
    return "INTERNAL"


class OTelHook:
    """Client and server spans (Dapper's cs/cr and sr/ss) with W3C propagation."""

    # How long the answer to "is an SDK installed?" is reused (asking reads os.environ).
    recheck_after = 1.0

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        self._provider = tracer_provider
        self._recording_until = 0.0
        self._recording_cached = False
        self._tracer_obj: trace.Tracer | None = None
        self._tracer_from: object = None
        self._recorder: Any = None

    def _tracer(self) -> trace.Tracer:
        provider = self._provider or trace.get_tracer_provider()
        if provider is not self._tracer_from or self._tracer_obj is None:
            self._tracer_obj = trace.get_tracer("meshkit", tracer_provider=provider)
            self._recorder = None
            if not isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
                global _fast_span_class
                from .fastspan import FastSpan, recorder_for  # the SDK: only when in use

                _fast_span_class = FastSpan
                self._recorder = recorder_for(provider)
            self._tracer_from = provider
        return self._tracer_obj

    def _start(
        self, name: str, kind: SpanKind, attributes: dict[str, Any], context: Any = None
    ) -> Any:
        tracer = self._tracer()
        recorder = self._recorder
        if recorder is not None:
            return recorder.start(name, kind, attributes, context)
        return tracer.start_span(name, context=context, kind=kind, attributes=attributes)

    def _recording(self) -> bool:
        now = time.monotonic()
        if now < self._recording_until:
            return self._recording_cached
        provider = self._provider or trace.get_tracer_provider()
        if self._provider is None and isinstance(provider, trace.ProxyTracerProvider):
            # Tracing configured by MESHKIT_TRACES but nobody installed a provider yet.
            try:
                provider = _provider.setup_tracing() or trace.get_tracer_provider()
            except ConfigError as exc:
                # A bad MESHKIT_TRACES* must not fail every call: say it once, do not trace.
                if str(exc) not in _warned:  # once per process and message
                    _warned.add(str(exc))
                    log.error("tracing disabled: %s", exc)
                self._recording_cached = False
                self._recording_until = now + 3600
                return False
        recording = not isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider))
        self._recording_cached = recording
        self._recording_until = now + self.recheck_after
        return recording

    # -- client ---------------------------------------------------------------------

    def _provider_now(self) -> object:
        """The provider in use: the hook's own, else the global one."""
        provider = self._provider
        if provider is None:
            provider = getattr(trace, "_TRACER_PROVIDER", None) or trace.get_tracer_provider()
        return provider

    def start_client(self, ctx: Any) -> Any:
        now = time.monotonic()  # the budget left is read before the first call's setup
        if not (self._recording_cached if now < self._recording_until else self._recording()):
            # No SDK: no spans to record, but carry on a trace (and baggage) someone
            # else started.
            if _FAST_CONTEXT is not None and not _FAST_CONTEXT[0].get():
                return None  # an empty context: the common case, one look-up
            propagate.inject(ctx.headers)  # (writes nothing for an invalid span)
            return None
        provider = self._provider or _TRACE_GLOBALS.get("_TRACER_PROVIDER")
        if (provider or self._provider_now()) is not self._tracer_from:
            self._tracer()
        recorder = self._recorder
        if recorder is not None and recorder.inline and _FAST_CONTEXT is not None:
            # decided before any attribute is built: an unsampled span costs its ids
            var, key = _FAST_CONTEXT
            values = var.get()
            current = values.get(key)
            parent = None
            if current is not None and isinstance(current, trace.Span):
                parent = current.get_span_context()
                if not parent[5]:  # is_valid (SpanContext fields by index)
                    parent = None
            span_context, recording = recorder.begin(parent)
            span: Any
            if span_context[3]:  # sampled
                span = recorder.record(
                    _name(ctx.service, ctx.method),
                    _CLIENT,
                    span_context,
                    parent,
                    _client_attributes(ctx, now),
                )
            elif not recording:
                span = NonRecordingSpan(span_context)
            elif recorder.tail_rule() is not None:  # kept in outline until its end
                span = TailSpan(span_context, parent, _CLIENT, time.time_ns())
            else:  # another processor reads every recorded span
                span = recorder.record(
                    _name(ctx.service, ctx.method),
                    _CLIENT,
                    span_context,
                    parent,
                    _client_attributes(ctx, now),
                )
            context = otel_context.Context(values)
            _dict_set(context, key, span)
            token = var.set(context)
            w3c.inject(ctx.headers, span_context, values)
            return span, token
        attributes = _client_attributes(ctx, now)
        span = self._start(_name(ctx.service, ctx.method), _CLIENT, attributes)
        token = _make_current(span)
        w3c.inject(ctx.headers, span.get_span_context())
        return span, token

    def start_attempt(self, ctx: Any) -> Any:
        """A child span for a retry or hedge (attempt ≥ 1); its context goes on the wire."""
        if not self._recording():
            return None
        parent = trace.get_current_span()
        if not parent.is_recording() and type(parent) is not TailSpan:
            return None
        kind = "hedge" if ctx.extras.get("hedge") else "retry"
        parent.add_event(kind, {"meshkit.attempt": ctx.attempt})
        attributes = _client_attributes(ctx, time.monotonic())
        attributes["meshkit.attempt"] = ctx.attempt
        attributes["meshkit.attempt_kind"] = kind
        span = self._start(
            f"{ctx.service}/{ctx.method} {kind} {ctx.attempt}",
            _CLIENT,
            attributes,
            trace.set_span_in_context(parent),
        )
        w3c.inject(ctx.headers, span.get_span_context())
        return span, None

    # -- server ---------------------------------------------------------------------

    def start_server(self, ctx: Any) -> Any:
        headers = ctx.headers
        now = time.monotonic()
        if not (self._recording_cached if now < self._recording_until else self._recording()):
            if "traceparent" in headers or "baggage" in headers:
                return None, otel_context.attach(w3c.extract(headers))
            # nothing carried: the handler starts from an empty context, not from the
            # one the connection's task inherited (what was current when it started)
            if _FAST_CONTEXT is not None and not _FAST_CONTEXT[0].get():
                return None  # it is empty already: the common case
            return None, otel_context.attach(_EMPTY)
        provider = self._provider or _TRACE_GLOBALS.get("_TRACER_PROVIDER")
        if (provider or self._provider_now()) is not self._tracer_from:
            self._tracer()
        recorder = self._recorder
        caller = w3c.extract_span_context(headers)
        if caller is not None and recorder is not None and recorder.inline:
            # the usual case: a plain traceparent, no baggage, meshkit's sampler
            if not caller[5]:  # is_valid
                caller = None
            span_context, recording = recorder.begin(caller)
            span: Any
            if span_context[3]:  # sampled
                span = recorder.record(
                    _name(ctx.service, ctx.method),
                    _SERVER,
                    span_context,
                    caller,
                    self._server_attributes(ctx, now),
                )
            elif not recording:
                span = NonRecordingSpan(span_context)
            elif recorder.tail_rule() is not None:  # kept in outline until its end
                span = TailSpan(span_context, caller, _SERVER, time.time_ns())
            else:
                span = recorder.record(
                    _name(ctx.service, ctx.method),
                    _SERVER,
                    span_context,
                    caller,
                    self._server_attributes(ctx, now),
                )
            return span, _make_current(span, _EMPTY)
        parent = w3c.extract(headers)
        span = self._start(
            _name(ctx.service, ctx.method), _SERVER, self._server_attributes(ctx, now), parent
        )
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        return span, token

    @staticmethod
    def _server_attributes(ctx: Any, now: float) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            "rpc.system": "thrift",
            "rpc.service": ctx.service,
            "rpc.method": ctx.method,
            "meshkit.service": ctx.service,
            "net.peer.name": ctx.peer,
        }
        if ctx.caller:
            attributes["meshkit.caller"] = ctx.caller
        instance = _provider.instance_of(ctx.service)
        if instance:
            attributes["meshkit.instance"] = instance
        if ctx.deadline is not None:
            attributes["meshkit.deadline_ms"] = round((ctx.deadline - now) * 1000, 1)
        return attributes

    # -- both -----------------------------------------------------------------------

    def end(self, handle: Any, ctx: Any, error: BaseException | None) -> None:
        if handle is None:
            return
        span, token = handle
        lost = False
        if error is not None and ctx.extras and ctx.extras.get("hedge_lost") is True:
            # a hedge attempt cancelled because another attempt answered: not an error
            error, lost = None, True
        try:
            kind = type(span)
            if kind is TailSpan:
                # what FastRecorder.tail_end decides, inline: most of these end here
                now = time.time_ns()
                recorder = self._recorder
                rule = None if recorder is None else recorder.tail_rule()
                if recorder is None:
                    pass  # the provider went away during the call: nothing to keep it in
                elif (
                    rule is None
                    or (rule[0] and (error is not None or (span._notes is not None and span.erred)))
                    or (rule[1] is not None and now - span._start >= rule[1])
                ):
                    self._end_tail(span, ctx, error, lost)
            elif span is not None and kind is not NonRecordingSpan:  # (nothing to end)
                if span.is_recording():
                    self._finish(span, ctx, error, lost)
                span.end()
        finally:
            if token is not None:
                if _FAST_CONTEXT is None:
                    otel_context.detach(token)
                else:
                    try:
                        _FAST_CONTEXT[0].reset(token)
                    except Exception:  # as opentelemetry.context.detach: say it, go on
                        log.exception("Failed to detach context")

    def _end_tail(
        self, span: TailSpan, ctx: Any, error: BaseException | None, lost: bool = False
    ) -> None:
        """The end of an unsampled span kept in outline: usually nothing more; when it
        erred or was slow, the full span is built and exported (tail keeping)."""
        recorder = self._recorder
        end_ns = recorder.tail_end(span, error is not None)
        if end_ns is None:
            return
        started = time.monotonic() - (end_ns - span._start) / 1e9  # for the budget left
        if span._kind is _SERVER:
            attributes = self._server_attributes(ctx, started)
        else:
            attributes = _client_attributes(ctx, started)
        full = recorder.build_kept(span, _name(ctx.service, ctx.method), attributes, end_ns)
        self._finish(full, ctx, error, lost)
        full.end()

    @staticmethod
    def _finish(span: Any, ctx: Any, error: BaseException | None, lost: bool = False) -> None:
        # meshkit's own spans: straight into their attribute dict (no copy, no check per key)
        own: dict[str, Any] | None = (
            span._attributes
            if span.__class__ is _fast_span_class
            else getattr(span, "raw_attributes", None)
        )
        attributes: dict[str, Any] = {} if own is None else own
        attributes["meshkit.status_code"] = _status_code(error)
        if lost:
            attributes["meshkit.status_code"] = "CANCELLED"
            attributes["meshkit.hedge_lost"] = True  # another attempt answered first
        if (span._kind if own is not None else span.kind) is _CLIENT:
            if ctx.peer:
                attributes["net.peer.name"] = ctx.peer
            endpoint = ctx.endpoint
            if endpoint is not None and endpoint.instance_id:
                attributes["meshkit.instance"] = endpoint.instance_id
            if "meshkit.attempt" not in attributes and (
                own is not None or "meshkit.attempt" not in span.attributes
            ):
                attributes["meshkit.attempts"] = ctx.attempt + 1
            extras = ctx.extras
            if extras:
                for key in ("route", "zone", "hedged", "hedge_winner", "fallback"):
                    value = extras.get(key)
                    if value is not None and isinstance(value, (str, bool, int, float)):
                        attributes[f"meshkit.{key}"] = value
        app_error = ctx.extras.get("app_error") if ctx.extras else None
        if app_error:
            attributes["meshkit.app_error"] = app_error
        if own is None:
            span.set_attributes(attributes)
        if error is not None:
            span.set_status(Status(_ERROR, f"{type(error).__name__}: {error}"))
