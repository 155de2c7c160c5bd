"""meshkit's OTLP encoder writes what the SDK's encoder writes, for SDK and meshkit spans."""

from __future__ import annotations

import time
from typing import Any

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    StatusCode,
    TraceFlags,
    TraceState,
    set_span_in_context,
)
from prometheus_client import CollectorRegistry

from meshkit.rpc.context import CallContext
from meshkit.tracing.otel import OTelHook
from meshkit.tracing.otlp_encode import encode_request
from meshkit.tracing.provider import TraceSettings, build_provider


def _same(spans: Any) -> None:
    ours = ExportTraceServiceRequest.FromString(encode_request(spans))
    theirs = encode_spans(spans)
    # an unset status is left out, where the SDK writes an empty one: the same to readers
    for resource_spans in theirs.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                if span.status == type(span.status)():
                    span.ClearField("status")
    assert ours == theirs
    # twice: the second time from the encoder's caches
    assert ExportTraceServiceRequest.FromString(encode_request(spans)) == theirs


def test_sdk_spans_of_every_shape_encode_as_the_sdk_does() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "enc", "n": 3}))
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("t", "1.2")
    remote = SpanContext(
        0x4BF92F3577B34DA6A3CE929D0E0E4736,
        0x00F067AA0BA902B7,
        is_remote=True,
        trace_flags=TraceFlags(1),
        trace_state=TraceState.from_header(["vendor=abc"]),
    )
    parent = set_span_in_context(NonRecordingSpan(remote))
    for n in range(2):  # the same attributes twice: cached fields the second time
        with tracer.start_as_current_span(
            "op é",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "s": "text",
                "b": True,
                "i": 42,
                "neg": -7,
                "f": 1.5,
                "list": ["a", "b"],
                "n": n,
                "long": "x" * 300,
            },
            links=[Link(remote, {"why": "batch"})],
        ) as span:
            span.add_event("ev", {"k": 1}, timestamp=time.time_ns())
            span.set_status(StatusCode.ERROR, "bad")
            with tracer.start_as_current_span("child", kind=SpanKind.CLIENT):
                pass
    _same(exporter.get_finished_spans())
    provider.shutdown()


def test_meshkit_spans_encode_as_the_sdk_does() -> None:
    exporter = InMemorySpanExporter()
    provider = build_provider(
        TraceSettings(), exporter=exporter, metrics_registry=CollectorRegistry()
    )
    hook = OTelHook(provider)
    for message in ("ok", "fail"):
        client = CallContext("svc", "echo", caller="me", deadline=time.monotonic() + 5, peer="p:1")
        handle = hook.start_client(client)
        server = CallContext("svc", "echo", headers=dict(client.headers), peer="p:2")
        server_handle = hook.start_server(server)
        error = RuntimeError("boom") if message == "fail" else None
        hook.end(server_handle, server, error)
        hook.end(handle, client, error)
    provider.force_flush()
    spans = exporter.get_finished_spans()
    assert len(spans) == 4
    _same(spans)
    provider.shutdown()


def test_cached_fields_keep_types_apart_and_resources_interleaved_group(monkeypatch: Any) -> None:
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    from meshkit.tracing import otlp_encode

    monkeypatch.setattr(otlp_encode, "_PAIR_CACHE_MAX", 3)  # caches cleared while encoding
    exporter = InMemorySpanExporter()
    tracers = []
    for name in ("a", "b"):
        provider = TracerProvider(resource=Resource.create({"service.name": name}))
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        tracers.append(provider.get_tracer("t"))
    values: list[Any] = [True, 1, False, 0, "1", 1.0, "x", "y", "z", "x"]
    for n, value in enumerate(values):  # spans of resources a, b, a, b… in one batch
        with tracers[n % 2].start_as_current_span(f"op{n % 3}", attributes={"v": value, "n": n}):
            pass
    _same(exporter.get_finished_spans())
    decoded = ExportTraceServiceRequest.FromString(encode_request(exporter.get_finished_spans()))
    assert len(decoded.resource_spans) == 2
    kinds = [
        span.attributes[0].value.WhichOneof("value")
        for rs in decoded.resource_spans
        for span in rs.scope_spans[0].spans
    ]
    assert sorted(kinds) == sorted(
        ["bool_value"] * 2 + ["int_value"] * 2 + ["double_value"] + ["string_value"] * 5
    )
