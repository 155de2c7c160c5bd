"""W3C context round-trips through every carrier kind."""

from __future__ import annotations

from opentelemetry import baggage, trace
from opentelemetry.context import attach, detach
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from meshkit.tracing.propagation import (
    extract_kafka,
    extract_mapping,
    inject_kafka,
    inject_mapping,
)

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
SPAN_ID = 0xB7AD6B7169203331


def _current() -> object:
    span = NonRecordingSpan(
        SpanContext(TRACE_ID, SPAN_ID, is_remote=False, trace_flags=TraceFlags(1))
    )
    ctx = trace.set_span_in_context(span)
    return baggage.set_baggage("user", "u-42", context=ctx)


def test_mapping_round_trip() -> None:
    token = attach(_current())  # type: ignore[arg-type]
    try:
        headers: dict[str, str] = {}
        inject_mapping(headers)
    finally:
        detach(token)
    assert headers["traceparent"] == f"00-{TRACE_ID:032x}-{SPAN_ID:016x}-01"
    ctx = extract_mapping(headers)
    assert trace.get_current_span(ctx).get_span_context().trace_id == TRACE_ID
    assert baggage.get_baggage("user", ctx) == "u-42"


def test_kafka_round_trip_replaces_stale_context() -> None:
    stale = f"00-{1:032x}-{1:016x}-01".encode()
    headers = [("order-id", b"7"), ("traceparent", stale)]
    token = attach(_current())  # type: ignore[arg-type]
    try:
        inject_kafka(headers)
    finally:
        detach(token)
    assert ("order-id", b"7") in headers
    assert [v for k, v in headers if k == "traceparent"] == [
        f"00-{TRACE_ID:032x}-{SPAN_ID:016x}-01".encode()
    ]
    ctx = extract_kafka(headers)
    assert trace.get_current_span(ctx).get_span_context().span_id == SPAN_ID
    assert baggage.get_baggage("user", ctx) == "u-42"


def test_kafka_extract_tolerates_missing_and_garbage_headers() -> None:
    assert not trace.get_current_span(extract_kafka(None)).get_span_context().is_valid
    garbage = [("traceparent", b"\xff\xfe not a traceparent"), ("x", None)]
    assert not trace.get_current_span(extract_kafka(garbage)).get_span_context().is_valid
