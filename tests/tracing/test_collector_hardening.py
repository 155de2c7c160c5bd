"""The collector under hostile or unusual input: every answer is a clear 200/400, never a
500, and one bad span never costs the spans of anyone else."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any

import aiohttp
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from tracing_support import flushed, otlp_json_request, otlp_json_span

from meshkit.tracing.collector import Collector, SpanStore, otlp, pbwire
from meshkit.tracing.collector.queries import critical_path

TRACE = "0af7651916cd43dd8448eb211c80319c"
SPAN = "00f067aa0ba902b7"
PB = "application/x-protobuf"
JS = "application/json"


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out) + bytes([n])


def strict_json(text: str) -> Any:
    """Parse as a browser's ``JSON.parse`` would (no NaN/Infinity tokens)."""

    def refuse(token: str) -> Any:
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


async def post(collector: Collector, body: bytes, ctype: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            collector.url + "/v1/traces", data=body, headers={"Content-Type": ctype}
        ) as resp,
    ):
        return resp.status, await resp.text()


async def get(collector: Collector, path: str) -> tuple[int, Any]:
    """GET an API path; the body must be strict JSON whatever the status."""
    async with aiohttp.ClientSession() as session, session.get(collector.url + path) as resp:
        text = await resp.text()
        assert resp.content_type == "application/json", (path, resp.status, text[:200])
        return resp.status, strict_json(text)


def pb_request(
    trace: str = TRACE,
    span: str = SPAN,
    *,
    attrs: dict[str, Any] | None = None,
    start: int | None = None,
    end: int | None = None,
) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    kv = rs.resource.attributes.add()
    kv.key, kv.value.string_value = "service.name", "svc"
    sp = rs.scope_spans.add().spans.add()
    sp.trace_id, sp.span_id, sp.name = bytes.fromhex(trace), bytes.fromhex(span), "op"
    now = time.time_ns()
    sp.start_time_unix_nano = now - 10**6 if start is None else start
    sp.end_time_unix_nano = now if end is None else end
    for key, value in (attrs or {}).items():
        a = sp.attributes.add()
        a.key = key
        if isinstance(value, float):
            a.value.double_value = value
        else:
            a.value.string_value = str(value)
    return req


# -- 1. NaN and infinities -------------------------------------------------------------


@pytest.mark.parametrize("path", ["wire", "generated", "json"])
async def test_non_finite_doubles_are_stored_as_json_strings(
    collector: Collector, path: str
) -> None:
    doubles = {"ratio": float("nan"), "budget_ms": float("inf"), "floor": float("-inf")}
    if path == "json":
        span = otlp_json_span(TRACE, SPAN, "", "op", time.time_ns() - 10**6, 10**6)
        # OTLP JSON writes them as strings; Python writes the bare tokens: take both
        span["attributes"] = [
            {"key": "ratio", "value": {"doubleValue": "NaN"}},
            {"key": "budget_ms", "value": {"doubleValue": float("inf")}},
            {"key": "floor", "value": {"doubleValue": "-Infinity"}},
        ]
        span["events"] = [
            {
                "timeUnixNano": str(time.time_ns()),
                "name": "e",
                "attributes": [{"key": "x", "value": {"doubleValue": "NaN"}}],
            }
        ]
        request = otlp_json_request("svc", [span])
        request["resourceSpans"][0]["resource"]["attributes"].append(
            {"key": "load", "value": {"arrayValue": {"values": [{"doubleValue": "Infinity"}]}}}
        )
        status, _ = await post(collector, json.dumps(request).encode(), JS)
    else:
        req = pb_request(attrs=doubles)
        ev = req.resource_spans[0].scope_spans[0].spans[0].events.add()
        ev.name = "e"
        x = ev.attributes.add()
        x.key, x.value.double_value = "x", float("nan")
        load = Resource()
        load.attributes.add(key="load").value.array_value.values.add().double_value = math.inf
        if path == "wire":
            req.resource_spans[0].resource.MergeFrom(load)
            body = req.SerializeToString()
        else:  # the Resource twice (protobuf merges them): the fast path leaves it
            rs = req.resource_spans[0].SerializeToString()
            rs += b"\x0a" + _varint(load.ByteSize()) + load.SerializeToString()
            body = b"\x0a" + _varint(len(rs)) + rs
            with pytest.raises(pbwire.Fallback):
                otlp._decode_wire(body)
        status, _ = await post(collector, body, PB)
    assert status == 200
    await flushed(collector)
    rows = collector.store.query("SELECT attrs, events, resource FROM spans")
    for text in rows[0]:
        strict_json(text)  # every stored text is JSON SQLite can read
    status, trace = await get(collector, f"/api/traces/{TRACE}")
    assert status == 200
    assert trace["attrs"][0] == {"ratio": "NaN", "budget_ms": "Infinity", "floor": "-Infinity"}
    assert trace["events"][0][0]["attrs"] == {"x": "NaN"}
    status, found = await get(collector, "/api/traces?tags=ratio=NaN")
    assert status == 200
    assert [t["trace_id"] for t in found["traces"]] == [TRACE]
    status, found = await get(collector, "/api/traces?tags=budget_ms=1")
    assert (status, found["traces"]) == (200, [])
    assert trace["resources"][0]["load"] == ["Infinity"]


# -- 2. spans SQLite cannot store ------------------------------------------------------


def _json_span(span: str, **extra: Any) -> dict[str, Any]:
    body = otlp_json_span(TRACE, span, "", "op", time.time_ns() - 1000, 1000)
    body.update(extra)
    return body


@pytest.mark.parametrize("path", ["wire", "generated", "json"])
def test_times_past_2_63_are_rejected_as_partial_success(path: str) -> None:
    good, bad = SPAN, "00f067aa0ba902b8"
    if path == "json":
        decoded = otlp.decode_json(
            json.dumps(
                otlp_json_request(
                    "svc",
                    [
                        _json_span(good),
                        _json_span(bad, startTimeUnixNano=str(2**63), endTimeUnixNano=str(2**63)),
                        _json_span("00f067aa0ba902b9", startTimeUnixNano="-5"),
                    ],
                )
            ).encode()
        )
        assert decoded.rejected == 2
    else:
        req = pb_request(span=good)
        req.MergeFrom(pb_request(span=bad, start=2**64 - 10, end=2**64 - 1))
        body = req.SerializeToString()
        decoded = otlp._decode_wire(body) if path == "wire" else otlp._decode_generated(body)
        assert decoded.rejected == 1
    assert [s.span_id for s in decoded.spans] == [good]
    assert "resourceSpans[1]" in decoded.first_error or "spans[1]" in decoded.first_error
    assert "between 0 and 9223372036854775807" in decoded.first_error


async def test_a_lone_surrogate_in_json_text_is_a_400_naming_where(collector: Collector) -> None:
    good = json.dumps(otlp_json_request("svc", [_json_span(SPAN)])).encode()
    bad = good.replace(b'"op"', b'"a\\udc00b"')
    status, text = await post(collector, bad, JS)
    assert status == 400
    assert "$.resourceSpans[0].scopeSpans[0].spans[0].name" in strict_json(text)["error"]
    # a pair is text like any other
    emoji = good.replace(b'"op"', b'"\\ud83d\\ude00"')
    status, _ = await post(collector, emoji, JS)
    assert status == 200
    await flushed(collector)
    assert collector.store.query("SELECT name FROM spans")[0][0] == "\U0001f600"


def test_the_writer_loses_only_the_span_sqlite_refuses(tmp_path: Any) -> None:
    spans = [
        otlp_json_span(TRACE, "%016x" % (i + 1), "", f"op{i}", time.time_ns(), 1000)
        for i in range(300)
    ]
    rows = otlp.decode_json(json.dumps(otlp_json_request("svc", spans)).encode()).spans
    # what the decoders no longer let through, made by hand: a start past SQLite's INTEGER
    # and a name UTF-8 cannot encode, in the middle of one batch of acknowledged spans
    rows[100] = dataclasses.replace(rows[100], start_ns=2**63)
    rows[200] = dataclasses.replace(rows[200], name="\ud800")
    store = SpanStore(tmp_path / "t.db", retention_every=3600)
    try:
        store.add(rows)  # one queue item: one writer batch
        assert store.flush(10.0)
        stored = {r[0] for r in store.query("SELECT span_id FROM spans")}
        assert stored == {r.span_id for r in rows} - {rows[100].span_id, rows[200].span_id}
        assert store.spans_dropped == 2
        assert store.spans_written == 298
    finally:
        store.close()


# -- 3. malformed OTLP JSON ------------------------------------------------------------


def _with(**extra: Any) -> dict[str, Any]:
    return otlp_json_request("svc", [_json_span(SPAN, **extra)])


SPAN0 = "$.resourceSpans[0].scopeSpans[0].spans[0]"


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"resourceSpans": [1]}, "$.resourceSpans[0]"),
        ({"resourceSpans": [{"resource": [1], "scopeSpans": []}]}, "$.resourceSpans[0].resource"),
        ({"resourceSpans": [{"scopeSpans": {"spans": []}}]}, "$.resourceSpans[0].scopeSpans"),
        ({"resourceSpans": [{"scopeSpans": ["x"]}]}, "$.resourceSpans[0].scopeSpans[0]"),
        (_with(status="ERROR"), f"{SPAN0}.status"),
        (_with(events=[{"timeUnixNano": "soon"}]), f"{SPAN0}.events[0].timeUnixNano"),
        (_with(events=[{"timeUnixNano": str(2**64)}]), f"{SPAN0}.events[0].timeUnixNano"),
        (_with(events=["e"]), f"{SPAN0}.events[0]"),
        (_with(links=[{"attributes": {}}]), f"{SPAN0}.links[0].attributes"),
        (
            _with(attributes=[{"key": "n", "value": {"intValue": "x"}}]),
            f"{SPAN0}.attributes[0].value.intValue",
        ),
        (
            _with(attributes=[{"key": "n", "value": {"intValue": str(2**63)}}]),
            f"{SPAN0}.attributes[0].value.intValue",
        ),
        (
            _with(attributes=[{"key": "n", "value": {"doubleValue": "fast"}}]),
            f"{SPAN0}.attributes[0].value.doubleValue",
        ),
        (
            _with(attributes=[{"key": "n", "value": {"arrayValue": [1]}}]),
            f"{SPAN0}.attributes[0].value.arrayValue",
        ),
        (
            _with(attributes=[{"key": "n", "value": {"kvlistValue": {"values": [2]}}}]),
            f"{SPAN0}.attributes[0].value.kvlistValue.values[0]",
        ),
        (_with(attributes=[{"key": 5, "value": {}}]), f"{SPAN0}.attributes[0].key"),
        (_with(attributes={"n": 1}), f"{SPAN0}.attributes"),
    ],
)
async def test_malformed_json_is_a_400_naming_the_element(
    collector: Collector, body: dict[str, Any], where: str
) -> None:
    status, text = await post(collector, json.dumps(body).encode(), JS)
    assert status == 400, text
    error = strict_json(text)["error"]
    assert f" at {where}, found" in error, error


async def test_well_formed_json_values_of_every_kind_are_kept(collector: Collector) -> None:
    attributes = [
        {"key": "s", "value": {"stringValue": "x"}},
        {"key": "b", "value": {"boolValue": False}},
        {"key": "i", "value": {"intValue": "-9223372036854775808"}},
        {"key": "j", "value": {"intValue": 7}},
        {"key": "d", "value": {"doubleValue": 1.5}},
        {"key": "e", "value": {"doubleValue": "2"}},
        {"key": "a", "value": {"arrayValue": {"values": [{"intValue": "1"}, {}]}}},
        {"key": "k", "value": {"kvlistValue": {"values": [{"key": "z", "value": None}]}}},
        {"key": "empty", "value": {"arrayValue": {}}},
        {"key": "none"},
        {"key": "null", "value": {"intValue": None}},
    ]
    body = _with(attributes=attributes, status=None, events=None, links=[])
    status, _ = await post(collector, json.dumps(body).encode(), JS)
    assert status == 200
    await flushed(collector)
    stored = json.loads(collector.store.query("SELECT attrs FROM spans")[0][0])
    assert stored == {
        "s": "x",
        "b": False,
        "i": -(2**63),
        "j": 7,
        "d": 1.5,
        "e": 2.0,
        "a": [1, None],
        "k": {"z": None},
        "empty": [],
        "none": None,
        "null": None,
    }


# -- 6. span kinds ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "stored"),
    [(7, "UNSPECIFIED"), (6, "UNSPECIFIED"), (-1, "UNSPECIFIED"), (3, "CLIENT"),
     ("SPAN_KIND_PRODUCER", "PRODUCER"), ("5", "CONSUMER")],
)  # fmt: skip
def test_json_and_protobuf_agree_on_span_kinds(kind: Any, stored: str) -> None:
    decoded = otlp.decode_json(json.dumps(_with(kind=kind)).encode())
    assert [s.kind for s in decoded.spans] == [stored]
    if isinstance(kind, int):
        req = pb_request()
        req.resource_spans[0].scope_spans[0].spans[0].kind = kind  # type: ignore[assignment]
        body = req.SerializeToString()
        assert [s.kind for s in otlp._decode_wire(body).spans] == [stored]
        assert [s.kind for s in otlp._decode_generated(body).spans] == [stored]


# -- 4. viewer API input ---------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/api/traces?min_ms=1e20",
        "/api/traces?max_ms=9.3e12",
        "/api/traces?start_ms=1e300",
        "/api/traces?end_ms=1e16",
        "/api/traces?lookback=1e300",
        "/api/traces?limit=1e300",
        "/api/dependencies?end_ms=1e300",
        "/api/dependencies?window_s=1e30",
    ],
)
async def test_out_of_range_numbers_are_a_400(collector: Collector, path: str) -> None:
    status, body = await get(collector, path)
    assert status == 400, body
    name = path.split("?")[1].split("=")[0]
    assert name in body["error"]


async def test_numbers_at_the_bounds_are_answered(collector: Collector) -> None:
    for path in [
        "/api/traces?min_ms=9e12&start_ms=9e12&end_ms=9e12&max_ms=9e12",
        "/api/traces?lookback=9e9",
        "/api/dependencies?end_ms=9e12",
    ]:
        status, body = await get(collector, path)
        assert status == 200, (path, body)


async def test_a_trace_whose_parents_form_a_cycle_is_answered(collector: Collector) -> None:
    now = time.time_ns()
    a, b, c = "000000000000000a", "000000000000000b", "000000000000000c"
    spans = [
        otlp_json_span(TRACE, a, b, "a", now, 3000),
        otlp_json_span(TRACE, b, a, "b", now + 500, 1000),
        otlp_json_span(TRACE, c, b, "c", now + 600, 500),
    ]
    status, _ = await post(collector, json.dumps(otlp_json_request("svc", spans)).encode(), JS)
    assert status == 200
    await flushed(collector)
    status, trace = await get(collector, f"/api/traces/{TRACE}")
    assert status == 200, trace
    assert trace["critical_path"] == [a, b, c]
    status, diff = await get(collector, f"/api/compare?a={TRACE}&b={TRACE}")
    assert status == 200, diff
    # the same spans at the same times: the walk still ends, each span once
    same = [
        {"span_id": sid, "parent_id": parent, "start_ns": 0, "duration_ns": 10}
        for sid, parent in [(a, b), (b, a), (c, b)]
    ]
    assert sorted(critical_path(same)) == [a, b, c]


# -- 5. protobuf bodies the generated classes refuse -------------------------------------


def _span_bytes(extra: bytes = b"", *, ids: bool = True) -> bytes:
    req = pb_request(start=10, end=20)
    span = req.resource_spans[0].scope_spans[0].spans[0]
    if not ids:
        span.ClearField("trace_id")
        span.ClearField("span_id")
    return span.SerializeToString() + extra


def _ld(tag: int, payload: bytes) -> bytes:
    return bytes([tag]) + _varint(len(payload)) + payload


def _request(*spans: bytes) -> bytes:
    return _ld(0x0A, _ld(0x12, b"".join(_ld(0x12, s) for s in spans)))


@pytest.mark.parametrize(
    "body",
    [
        # Status {code: <a varint cut by the end of the Status>}, then the span's kind
        _request(_span_bytes(b"\x7a\x01\x18\x30\x02")),
        # Status {<a tag varint cut by the end of the Status>}
        _request(_span_bytes(b"\x7a\x01\x80\x30\x02")),
        # a tag varint of 7 bytes (a field number past 2**29 - 1) in a span
        _request(_span_bytes(b"\xd1\x93\xcb\xab\x9f\xd6\x18" + bytes(8))),
        # ... in a Status and in the request itself
        _request(_span_bytes(_ld(0x7A, b"\xd0\x93\xcb\xab\x9f\xd6\x18\x00"))),
        _request(_span_bytes()) + b"\xd0\x93\xcb\xab\x9f\xd6\x18\x00",
        # invalid UTF-8 in a link / an event of a span rejected for its ids, beside a good one
        _request(_span_bytes(_ld(0x6A, _ld(0x1A, b"\xff\xfe")), ids=False), _span_bytes()),
        _request(_span_bytes(_ld(0x5A, _ld(0x12, b"\xff\xfe")), ids=False), _span_bytes()),
    ],
    ids=["status-code-cut", "status-tag-cut", "span-tag", "status-tag", "request-tag",
         "link-utf8", "event-utf8"],
)  # fmt: skip
async def test_protobuf_bodies_protobuf_refuses_are_a_400(
    collector: Collector, body: bytes
) -> None:
    with pytest.raises(otlp.OtlpError):
        otlp._decode_generated(body)  # the reference
    with pytest.raises(pbwire.Fallback):
        otlp._decode_wire(body)
    status, text = await post(collector, body, PB)
    assert status == 400, text
    assert "protobuf" in strict_json(text)["error"]


def test_bounded_reads_keep_valid_bodies_on_the_fast_path() -> None:
    # a multi-byte code and a 5-byte tag (field 2**29 - 1) are valid: decoded here
    for extra in [_ld(0x7A, b"\x18\x82\x00"), b"\xf8\xff\xff\xff\x0f\x01"]:
        body = _request(_span_bytes(extra))
        fast, ref = otlp._decode_wire(body), otlp._decode_generated(body)
        assert [(s.span_id, s.status, s.error) for s in fast.spans] == [
            (s.span_id, s.status, s.error) for s in ref.spans
        ]
