"""meshkit's hot-path span recorder and W3C codec behave like the SDK and the propagators."""

from __future__ import annotations

from typing import Any

import pytest
from echo_support import EchoImpl
from opentelemetry import baggage, propagate, trace
from opentelemetry.context import attach, detach
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState
from prometheus_client import CollectorRegistry
from tracing_support import traced_echo

from meshkit.tracing import w3c
from meshkit.tracing.otel import OTelHook
from meshkit.tracing.provider import TraceSettings, build_provider

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
SPAN_ID = 0x00F067AA0BA902B7


@pytest.mark.parametrize("flags", [0, 1])
@pytest.mark.parametrize("state", ["", "vendor=abc,other=1"])
@pytest.mark.parametrize("bag", [{}, {"user": "u-42"}])
def test_w3c_codec_matches_the_default_propagators(
    flags: int, state: str, bag: dict[str, str]
) -> None:
    span_context = SpanContext(
        TRACE_ID,
        SPAN_ID,
        is_remote=False,
        trace_flags=TraceFlags(flags),
        trace_state=TraceState.from_header([state]) if state else TraceState(),
    )
    context = trace.set_span_in_context(NonRecordingSpan(span_context))
    for key, value in bag.items():
        context = baggage.set_baggage(key, value, context=context)
    token = attach(context)
    try:
        ours: dict[str, str] = {}
        w3c.inject(ours, span_context)
        theirs: dict[str, str] = {}
        propagate.inject(theirs)
    finally:
        detach(token)
    assert ours == theirs
    ours_ctx, theirs_ctx = w3c.extract(ours), propagate.extract(theirs)
    assert (
        trace.get_current_span(ours_ctx).get_span_context()
        == trace.get_current_span(theirs_ctx).get_span_context()
    )
    assert baggage.get_all(ours_ctx) == baggage.get_all(theirs_ctx)


@pytest.mark.parametrize(
    "header",
    [
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # invalid version
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # zero trace id
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper case
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",  # future version
        "garbage",
    ],
)
def test_unusual_traceparents_are_read_as_the_specification_says(header: str) -> None:
    ours = trace.get_current_span(w3c.extract({"traceparent": header})).get_span_context()
    theirs = trace.get_current_span(propagate.extract({"traceparent": header}))
    assert ours == theirs.get_span_context()


class Tagging(EchoImpl):
    async def echo(self, message: str) -> str:
        span = trace.get_current_span()
        span.set_attribute("user.id", 42)
        span.add_event("looked up", {"cache": "hit"})
        return message


async def test_handlers_can_annotate_the_server_span() -> None:
    exporter = InMemorySpanExporter()
    provider = build_provider(
        TraceSettings(), exporter=exporter, metrics_registry=CollectorRegistry()
    )
    hook = OTelHook(tracer_provider=provider)
    async with traced_echo(hook, Tagging()) as client:
        await client.echo("x")
    provider.force_flush()
    spans: list[Any] = list(exporter.get_finished_spans())
    (server,) = [s for s in spans if s.kind.name == "SERVER"]
    (client_span,) = [s for s in spans if s.kind.name == "CLIENT"]
    assert server.attributes["user.id"] == 42
    assert [e.name for e in server.events] == ["looked up"]
    assert server.parent.span_id == client_span.context.span_id
    assert server.resource is provider.resource
    assert server.instrumentation_scope.name == "meshkit"
    provider.shutdown()


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
        {
            "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
            "tracestate": "vendor=abc,other=1",
        },
    ],
)
def test_the_servers_bare_traceparent_read_matches_the_propagators(
    headers: dict[str, str],
) -> None:
    ours = w3c.extract_span_context(headers)
    assert ours == trace.get_current_span(propagate.extract(headers)).get_span_context()


@pytest.mark.parametrize(
    "headers",
    [
        {"traceparent": f"00-{TRACE_ID:032x}-{SPAN_ID:016x}-01", "baggage": "a=1"},
        {"traceparent": "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"},
        {"traceparent": "garbage"},
    ],
)
def test_anything_but_a_bare_traceparent_is_left_to_the_full_extract(
    headers: dict[str, str],
) -> None:
    assert w3c.extract_span_context(headers) is None


class Failing(EchoImpl):
    async def echo(self, message: str) -> str:
        trace.get_current_span().set_attribute("user.note", message)
        if message == "fail":
            raise RuntimeError("boom")
        return message


async def _calls(provider: Any, messages: list[str]) -> None:
    hook = OTelHook(tracer_provider=provider)
    async with traced_echo(hook, Failing()) as client:
        for message in messages:
            try:
                await client.echo(message)
            except Exception:
                if message != "fail":
                    raise
    provider.force_flush()


async def test_unsampled_spans_kept_for_an_error_carry_every_attribute() -> None:
    # sampling 0, tail keeping on: the fast calls are dropped, the failing one is kept
    # whole, with the attributes meshkit builds only once a span is known to be kept
    exporter = InMemorySpanExporter()
    provider = build_provider(
        TraceSettings(sample=0.0), exporter=exporter, metrics_registry=CollectorRegistry()
    )
    await _calls(provider, ["a", "fail", "b"])
    spans: list[Any] = list(exporter.get_finished_spans())
    assert sorted(s.kind.name for s in spans) == ["CLIENT", "SERVER"]
    (server,) = [s for s in spans if s.kind.name == "SERVER"]
    (client_span,) = [s for s in spans if s.kind.name == "CLIENT"]
    for span in (server, client_span):
        assert not span.context.trace_flags.sampled
        assert span.attributes["meshkit.kept"] == "error"
        assert span.attributes["rpc.service"] == "echo"
        assert span.attributes["rpc.method"] == "echo"
        assert span.attributes["meshkit.status_code"] != "OK"
        assert span.attributes["meshkit.deadline_ms"] > 0
    assert server.attributes["user.note"] == "fail"  # set by the handler, kept
    assert server.attributes["net.peer.name"]
    assert client_span.attributes["net.peer.name"].startswith("127.0.0.1:")
    assert server.parent.span_id == client_span.context.span_id
    provider.shutdown()


async def test_unsampled_spans_keep_their_attributes_for_another_processor() -> None:
    # a processor of the application's sees every recorded span as the SDK would give it
    from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor

    class Everything(SpanProcessor):
        def __init__(self) -> None:
            self.ended: list[ReadableSpan] = []

        def on_end(self, span: ReadableSpan) -> None:
            assert isinstance(span, ReadableSpan)
            self.ended.append(span)

    exporter = InMemorySpanExporter()
    theirs = Everything()
    provider = build_provider(
        TraceSettings(sample=0.0), exporter=exporter, metrics_registry=CollectorRegistry()
    )
    provider.add_span_processor(theirs)
    await _calls(provider, ["a"])
    assert list(exporter.get_finished_spans()) == []
    spans: list[Any] = theirs.ended
    assert sorted(s.kind.name for s in spans) == ["CLIENT", "SERVER"]
    for span in spans:
        assert span.attributes["rpc.service"] == "echo"
        assert span.attributes["meshkit.status_code"] == "OK"
        assert not span.context.trace_flags.sampled
    (server,) = [s for s in spans if s.kind.name == "SERVER"]
    assert server.attributes["user.note"] == "a"
    provider.shutdown()


async def test_unsampled_slow_calls_are_kept_whole() -> None:
    exporter = InMemorySpanExporter()
    settings = TraceSettings(sample=0.0, slow_ms=10)
    provider = build_provider(settings, exporter=exporter, metrics_registry=CollectorRegistry())
    hook = OTelHook(tracer_provider=provider)
    async with traced_echo(hook, EchoImpl()) as client:
        assert await client.slow(30) == 30  # ≥ 30 ms on both sides: slow
    provider.force_flush()
    spans: list[Any] = list(exporter.get_finished_spans())
    assert sorted(s.kind.name for s in spans) == ["CLIENT", "SERVER"]
    for span in spans:
        assert span.attributes["meshkit.kept"] == "slow"
        assert span.attributes["rpc.method"] == "slow"
        assert span.attributes["meshkit.status_code"] == "OK"
    provider.shutdown()
