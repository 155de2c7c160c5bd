"""The collector's wire-format protobuf decoder gives what the generated classes give.

``decode_protobuf`` reads common bodies itself (``pbwire``) and hands anything else to the
generated protobuf classes; both must produce the same rows, rejections and errors.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from meshkit.tracing.collector import otlp, pbwire
from meshkit.tracing.collector.otlp import OtlpError, decode_protobuf
from meshkit.tracing.collector.store import _dumps

TRACE = bytes.fromhex("0af7651916cd43dd8448eb211c80319c")


def _rows(decoded: otlp.Decoded) -> list[tuple[Any, ...]]:
    """Each row as stored: the attribute JSON text in place of the attribute dict."""
    out = []
    for row in decoded.spans:
        stored = row.attrs_json or _dumps(row.attrs)
        assert stored == _dumps(row.attrs)  # (NaN != NaN: compared as text)
        fields = [getattr(row, name) for name in row.__slots__ if name[:5] != "attrs"]
        out.append((*fields, stored))
    return out


def assert_same(body: bytes, *, wire: bool = True) -> otlp.Decoded:
    """The fast path (when ``wire``) or its fallback agrees with the generated classes."""
    reference = otlp._decode_generated(body)
    if wire:
        fast = otlp._decode_wire(body)
    else:
        with pytest.raises(pbwire.Fallback):
            otlp._decode_wire(body)
        fast = decode_protobuf(body)
    assert _rows(fast) == _rows(reference)
    assert (fast.rejected, fast.first_error) == (reference.rejected, reference.first_error)
    return fast


def _value(v: Any) -> AnyValue:
    if isinstance(v, bool):
        return AnyValue(bool_value=v)
    if isinstance(v, int):
        return AnyValue(int_value=v)
    if isinstance(v, float):
        return AnyValue(double_value=v)
    if isinstance(v, bytes):
        return AnyValue(bytes_value=v)
    if isinstance(v, list):
        out = AnyValue()
        out.array_value.values.extend(_value(x) for x in v)
        return out
    if isinstance(v, dict):
        out = AnyValue()
        out.kvlist_value.values.extend(KeyValue(key=k, value=_value(x)) for k, x in v.items())
        return out
    return AnyValue(string_value=v)


def _span(i: int, attrs: dict[str, Any], **fields: Any) -> Span:
    span = Span(
        trace_id=TRACE,
        span_id=(i + 1).to_bytes(8, "big"),
        name=f"svc/op{i % 3}",
        kind=Span.SPAN_KIND_CLIENT if i % 2 else Span.SPAN_KIND_SERVER,
        start_time_unix_nano=1_700_000_000_000_000_000 + i,
        end_time_unix_nano=1_700_000_000_000_000_000 + i * 1000 + 5,
        flags=256,
        **fields,
    )
    span.attributes.extend(KeyValue(key=k, value=_value(v)) for k, v in attrs.items())
    return span


def _request(spans: list[Span], resource: dict[str, Any] | None = None) -> bytes:
    request = ExportTraceServiceRequest()
    rs = request.resource_spans.add()
    rs.resource.attributes.extend(
        KeyValue(key=k, value=_value(v)) for k, v in (resource or {"service.name": "shop"}).items()
    )
    ss = rs.scope_spans.add()
    ss.scope.name = "meshkit"
    ss.spans.extend(spans)
    return request.SerializeToString()


MESHKIT_ATTRS = {
    "rpc.system": "thrift",
    "rpc.service": "orders",
    "meshkit.service": "gateway",
    "net.peer.name": "127.0.0.1:9090",
    "meshkit.attempts": 1,
    "meshkit.deadline_ms": 498.7,
    "meshkit.hedged": False,
}


def test_meshkit_spans_take_the_fast_path_and_match() -> None:
    spans = [_span(i, {**MESHKIT_ATTRS, "meshkit.deadline_ms": 500.0 - i}) for i in range(20)]
    spans[3].parent_span_id = (7).to_bytes(8, "big")
    spans[4].status.code = Status.STATUS_CODE_ERROR
    spans[4].status.message = "boom: é"
    spans[5].trace_state = "vendor=1"
    decoded = assert_same(_request(spans))
    assert len(decoded.spans) == 20 and decoded.spans[4].error
    assert all(row.attrs_json is not None for row in decoded.spans)  # written from cache


def test_events_links_and_structured_values_match() -> None:
    span = _span(
        1,
        {
            "tags": ["a", "b"],
            "nested": {"k": 1, "deeper": [1.5, True]},
            "blob": b"\x00\xff",
            "big": -(2**63),
            "nan": math.nan,
            "inf": -math.inf,
            "ünïcode": "ok ✓",
            "empty": "",
        },
    )
    span.events.add(time_unix_nano=5, name="exception").attributes.add(
        key="exception.type", value=AnyValue(string_value="ValueError")
    )
    span.links.add(trace_id=TRACE, span_id=(9).to_bytes(8, "big")).attributes.add(
        key="kind", value=AnyValue(string_value="producer")
    )
    span.attributes.add(key="unset")  # a KeyValue without a value
    decoded = assert_same(_request([span], {"service.name": "shop", "host": ["a", "b"]}))
    (row,) = decoded.spans
    assert row.events[0]["attrs"] == {"exception.type": "ValueError"}
    assert row.links[0]["span_id"] == f"{9:016x}"
    assert row.attrs["nested"] == {"k": 1, "deeper": [1.5, True]}


def test_a_repeated_attribute_key_keeps_the_last_value_as_protobuf_readers_do() -> None:
    span = _span(1, {"k": "first"})
    span.attributes.add(key="k", value=AnyValue(string_value="second"))
    (row,) = assert_same(_request([span])).spans
    assert row.attrs == {"k": "second"} and row.attrs_json is None  # stored via the dict


def test_bad_ids_and_times_are_rejected_by_the_fast_path_as_by_the_reference() -> None:
    spans = [_span(i, {"i": i}) for i in range(5)]
    spans[1].trace_id = b"\x01" * 15
    spans[2].span_id = bytes(8)
    spans[3].parent_span_id = b"\x01" * 9
    spans[4].end_time_unix_nano = 1
    decoded = assert_same(_request(spans))
    assert decoded.rejected == 4 and "spans[1]" in decoded.first_error


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out) + bytes([n])


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    tag = _varint((number << 3) | wire_type)
    if wire_type == 2:
        return tag + _varint(len(payload)) + payload
    return tag + payload


def _wrap_span(span_bytes: bytes) -> bytes:
    scope = _field(2, 2, span_bytes)
    resource_spans = _field(2, 2, scope)
    return _field(1, 2, resource_spans)


def test_fields_out_of_order_repeated_or_unknown_decode_like_protobuf() -> None:
    base = _span(1, {"a": "x"}).SerializeToString()
    extra = (
        _field(5, 2, b"renamed")  # a second name: the last one wins
        + _field(9, 2, KeyValue(key="b", value=AnyValue(int_value=2)).SerializeToString())
        + _field(20, 0, b"\x05")  # unknown varint field
        + _field(21, 2, b"\xff\xfe")  # unknown bytes field (not UTF-8: fine, unknown)
        + _field(22, 5, b"\x00\x00\x00\x00")  # unknown fixed32
        + _field(6, 0, b"\x03")  # kind again
    )
    decoded = assert_same(_wrap_span(extra + base + extra))
    (row,) = decoded.spans
    assert row.name == "renamed" and row.attrs == {"b": 2, "a": "x"}


def test_what_the_fast_path_leaves_goes_to_protobuf() -> None:
    good = _span(1, {"a": "x"})
    twice_status = good.SerializeToString() + _field(15, 2, b"\x18\x02") + _field(15, 2, b"")
    assert_same(_wrap_span(twice_status), wire=False)
    group = good.SerializeToString() + _varint((30 << 3) | 3) + _varint((30 << 3) | 4)
    assert_same(_wrap_span(group), wire=False)


@pytest.mark.parametrize(
    "body",
    [
        _request([_span(1, {"a": "x"})])[:-3],  # truncated
        _wrap_span(_field(5, 2, b"\xff\xfe")),  # a name that is not UTF-8
        _wrap_span(_field(9, 2, _field(1, 2, b"\xc3"))),  # an attribute key that is not
        b"\x0a\xff\xff\xff\xff\x0f",  # a length past the end
    ],
)
def test_malformed_bodies_get_protobufs_error(body: bytes) -> None:
    with pytest.raises(pbwire.Fallback):
        otlp._decode_wire(body)
    with pytest.raises(OtlpError, match="expected a protobuf ExportTraceServiceRequest"):
        decode_protobuf(body)


_scalars = st.one_of(
    st.text(max_size=12),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.dictionaries(st.text(max_size=10), _scalars, max_size=6), min_size=1, max_size=6)
)
def test_random_attributes_match(attr_sets: list[dict[str, Any]]) -> None:
    assert_same(_request([_span(i, attrs) for i, attrs in enumerate(attr_sets)]))
