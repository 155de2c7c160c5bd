"""Decoding OTLP/HTTP trace requests (protobuf and JSON) into rows for the span store.

Both encodings of ``ExportTraceServiceRequest`` are accepted, as the OTLP specification
defines them: binary protobuf (``application/x-protobuf``) and JSON
(``application/json``, trace and span ids as hex strings, 64-bit integers as strings or
numbers, enums as numbers or names). A malformed body is refused as a whole
(:class:`OtlpError`); a well-formed body with some invalid spans (bad ids, end before
start) keeps the valid ones and reports the others as rejected (OTLP partial success).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from .pbwire import Fallback, decode_request

__all__ = ["Decoded", "OtlpError", "SpanRow", "decode_json", "decode_protobuf"]

KINDS = ("UNSPECIFIED", "INTERNAL", "SERVER", "CLIENT", "PRODUCER", "CONSUMER")
_NKINDS = len(KINDS)
_HEX = frozenset("0123456789abcdef")
_ZERO16 = bytes(16)
_ZERO8 = bytes(8)


def _ids_valid(trace_id: bytes, span_id: bytes, parent_id: bytes) -> bool:
    """Binary ids of the right sizes, trace and span ids not all zero, parent optional
    (their ``.hex()`` is then valid lower-case hex: only sizes and zeros to check)."""
    return (
        len(trace_id) == 16
        and len(span_id) == 8
        and trace_id != _ZERO16
        and span_id != _ZERO8
        and (not parent_id or len(parent_id) == 8)
    )


class OtlpError(ValueError):
    """The request body is not an OTLP trace export request."""


@dataclass(slots=True)
class SpanRow:
    """One span as the store keeps it."""

    trace_id: str
    span_id: str
    parent_id: str
    service: str
    name: str
    kind: str
    start_ns: int
    duration_ns: int
    error: bool
    status: str
    peer_service: str | None
    kept: str | None
    attrs: dict[str, Any]
    events: list[dict[str, Any]]
    links: list[dict[str, Any]]
    resource: dict[str, Any]
    # ``attrs`` as the store's JSON text, when the decoder had it at hand (else made from
    # ``attrs`` when stored)
    attrs_json: str | None = None


@dataclass(slots=True)
class Decoded:
    """The spans of one request and what was rejected (with the first reason)."""

    spans: list[SpanRow] = field(default_factory=list)
    rejected: int = 0
    first_error: str = ""

    def reject(self, where: str, why: str) -> None:
        self.rejected += 1
        if not self.first_error:
            self.first_error = f"{where}: {why}"


def _peer_service(kind: str, attrs: dict[str, Any]) -> str | None:
    """Whom a CLIENT/PRODUCER span called (the dependency graph's edge target)."""
    if kind not in ("CLIENT", "PRODUCER") or "meshkit.attempt" in attrs:
        return None  # retries and hedges are children of the logical call: count it once
    for key in ("peer.service", "rpc.service", "messaging.destination.name", "server.address"):
        value = attrs.get(key)
        if value:
            return str(value)
    return None


def _row(
    trace_id: str,
    span_id: str,
    parent_id: str,
    name: str,
    kind: str,
    start: int,
    end: int,
    status_code: int,
    status_message: str,
    attrs: dict[str, Any],
    events: list[dict[str, Any]],
    links: list[dict[str, Any]],
    resource: dict[str, Any],
    attrs_json: str | None = None,
) -> SpanRow:
    service = attrs.get("meshkit.service") or resource.get("service.name") or "unknown"
    error = status_code == 2
    # positional: SpanRow's field order (a keyword call costs twice as much per span)
    return SpanRow(
        trace_id,
        span_id,
        parent_id,
        service if service.__class__ is str else str(service),
        name,
        kind,
        start,
        end - start,
        error,
        status_message if error else ("OK" if status_code == 1 else ""),
        _peer_service(kind, attrs),
        attrs.get("meshkit.kept"),
        attrs,
        events,
        links,
        resource,
        attrs_json,
    )


def _check_ids(trace_id: str, span_id: str, parent_id: str) -> str | None:
    if len(trace_id) != 32 or not _HEX.issuperset(trace_id) or trace_id == "0" * 32:
        return f"expected a traceId of 32 hex digits (not all zero), found {trace_id!r}"
    if len(span_id) != 16 or not _HEX.issuperset(span_id) or span_id == "0" * 16:
        return f"expected a spanId of 16 hex digits (not all zero), found {span_id!r}"
    if parent_id and (len(parent_id) != 16 or not _HEX.issuperset(parent_id)):
        return f"expected a parentSpanId of 16 hex digits or none, found {parent_id!r}"
    return None


_MAX_NS = (1 << 63) - 1  # SQLite's INTEGER is signed 64-bit


def _time_problem(start: int, end: int) -> str:
    """Why a span's times cannot be stored (only called when they cannot)."""
    if end < start:
        return "endTimeUnixNano is before startTimeUnixNano"
    return (
        f"expected startTimeUnixNano and endTimeUnixNano between 0 and {_MAX_NS} "
        f"(year 2262), found {start} and {end}"
    )


# -- protobuf -------------------------------------------------------------------------


def _pb_value(value: Any) -> Any:
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_pb_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _pb_value(kv.value) for kv in value.kvlist_value.values}
    if which == "bytes_value":
        return base64.b64encode(value.bytes_value).decode()
    return getattr(value, which)


def _pb_attrs(attributes: Iterable[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in attributes:
        value = kv.value
        which = value.WhichOneof("value")
        # the scalar kinds read by name (this loop is most of the decoding time)
        if which in _SCALARS:
            out[kv.key] = getattr(value, which)
        else:
            out[kv.key] = _pb_value(value)
    return out


_SCALARS = frozenset(("string_value", "int_value", "double_value", "bool_value"))


def decode_protobuf(body: bytes) -> Decoded:
    """Decode a binary ``ExportTraceServiceRequest``.

    The wire-format fast path (:mod:`.pbwire`) decodes what it can decode exactly; any
    body it leaves (malformed ones included) goes through the generated classes, whose
    result or error is the reference.
    """
    try:
        return _decode_wire(body)
    except Fallback:
        return _decode_generated(body)


def _slow_kv(raw: bytes) -> tuple[str, Any]:
    try:
        kv = KeyValue.FromString(raw)
    except DecodeError:
        raise Fallback from None
    return kv.key, _pb_value(kv.value)


def _event(raw: bytes) -> dict[str, Any]:
    try:
        e = Span.Event.FromString(raw)
    except DecodeError:
        raise Fallback from None
    return {"time_ns": e.time_unix_nano, "name": e.name, "attrs": _pb_attrs(e.attributes)}


def _link(raw: bytes) -> dict[str, Any]:
    try:
        link = Span.Link.FromString(raw)
    except DecodeError:
        raise Fallback from None
    return {
        "trace_id": link.trace_id.hex(),
        "span_id": link.span_id.hex(),
        "attrs": _pb_attrs(link.attributes),
    }


def _decode_wire(body: bytes) -> Decoded:
    out = Decoded()
    append = out.spans.append
    for r, (resource_raw, scopes) in enumerate(decode_request(body, _slow_kv)):
        try:
            resource = _pb_attrs(Resource.FromString(resource_raw or b"").attributes)
        except DecodeError:
            raise Fallback from None
        default_service = resource.get("service.name") or "unknown"
        for s, spans in enumerate(scopes):
            for i, w in enumerate(spans):
                raw_trace, raw_span, raw_parent, name, kind, start, end = w[:7]
                trace_id, span_id = raw_trace.hex(), raw_span.hex()
                parent_id = raw_parent.hex()
                if _ids_valid(raw_trace, raw_span, raw_parent):
                    problem = None
                else:
                    problem = _check_ids(trace_id, span_id, parent_id)
                if problem is None and (end < start or end >> 63):
                    problem = _time_problem(start, end)
                if problem is not None:
                    # protobuf refuses the whole body for a bad event or link, kept or not
                    for raw in w[11]:
                        _event(raw)
                    for raw in w[12]:
                        _link(raw)
                    out.reject(f"resourceSpans[{r}].scopeSpans[{s}].spans[{i}]", problem)
                    continue
                # what _row does, inline (a call with 14 arguments per span)
                events, links = w[11], w[12]
                attrs = w[9]
                kind_name = KINDS[kind] if 0 <= kind < _NKINDS else "UNSPECIFIED"
                service = attrs.get("meshkit.service") or default_service
                code = w[7]
                error = code == 2
                append(
                    SpanRow(
                        trace_id,
                        span_id,
                        parent_id,
                        service if service.__class__ is str else str(service),
                        name,
                        kind_name,
                        start,
                        end - start,
                        error,
                        w[8] if error else ("OK" if code == 1 else ""),
                        _peer_service(kind_name, attrs) if kind == 3 or kind == 4 else None,
                        attrs.get("meshkit.kept"),
                        attrs,
                        [_event(e) for e in events] if events else [],
                        [_link(link) for link in links] if links else [],
                        resource,
                        w[10],
                    )
                )
    return out


def _decode_generated(body: bytes) -> Decoded:
    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(body)
    except DecodeError as exc:
        raise OtlpError(f"expected a protobuf ExportTraceServiceRequest: {exc}") from None
    out = Decoded()
    append = out.spans.append
    for r, resource_spans in enumerate(request.resource_spans):
        resource = _pb_attrs(resource_spans.resource.attributes)
        for s, scope_spans in enumerate(resource_spans.scope_spans):
            for i, span in enumerate(scope_spans.spans):
                raw_trace, raw_span = span.trace_id, span.span_id
                raw_parent = span.parent_span_id
                if _ids_valid(raw_trace, raw_span, raw_parent):
                    trace_id, span_id = raw_trace.hex(), raw_span.hex()
                    parent_id = raw_parent.hex()
                    problem = None
                else:
                    trace_id, span_id = raw_trace.hex(), raw_span.hex()
                    parent_id = raw_parent.hex()
                    problem = _check_ids(trace_id, span_id, parent_id)
                start, end = span.start_time_unix_nano, span.end_time_unix_nano
                if problem is None and (end < start or end >> 63):
                    problem = _time_problem(start, end)
                if problem is not None:
                    out.reject(f"resourceSpans[{r}].scopeSpans[{s}].spans[{i}]", problem)
                    continue
                span_events = span.events
                events = (
                    [
                        {
                            "time_ns": e.time_unix_nano,
                            "name": e.name,
                            "attrs": _pb_attrs(e.attributes),
                        }
                        for e in span_events
                    ]
                    if span_events
                    else []
                )
                span_links = span.links
                links = (
                    [
                        {
                            "trace_id": link.trace_id.hex(),
                            "span_id": link.span_id.hex(),
                            "attrs": _pb_attrs(link.attributes),
                        }
                        for link in span_links
                    ]
                    if span_links
                    else []
                )
                kind = span.kind
                status = span.status
                append(
                    _row(
                        trace_id,
                        span_id,
                        parent_id,
                        span.name,
                        KINDS[kind] if 0 <= kind < len(KINDS) else "UNSPECIFIED",
                        start,
                        end,
                        status.code,
                        status.message,
                        _pb_attrs(span.attributes),
                        events,
                        links,
                        resource,
                    )
                )
    return out


# -- JSON -----------------------------------------------------------------------------


_INT64 = range(-(1 << 63), 1 << 63)
_UINT63 = range(1 << 63)  # times: OTLP's fixed64, as far as SQLite's INTEGER goes


def _bad(where: str, expected: str, found: Any) -> OtlpError:
    text = json.dumps(found)
    if len(text) > 60:
        text = text[:57] + "..."
    return OtlpError(f"expected {expected} at {where}, found {text}")


def _js_obj(value: Any, where: str) -> dict[str, Any]:
    """A JSON object (``null`` or absent: empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(where, "an object", value)
    return value


def _js_list(obj: dict[str, Any], key: str, where: str) -> Iterator[tuple[Any, str]]:
    """(item, JSON path of the item) of the list ``obj[key]`` (``null``: none)."""
    items = obj.get(key)
    if items is None:
        return iter(())
    if not isinstance(items, list):
        raise _bad(f"{where}.{key}", "a list", items)
    return ((item, f"{where}.{key}[{i}]") for i, item in enumerate(items))


def _js_int(value: Any, where: str, allowed: range = _INT64) -> int:
    """A 64-bit integer, as OTLP JSON writes them: a number or a decimal string."""
    if value.__class__ is int or value.__class__ is str:
        try:
            number = int(value)
        except ValueError:
            pass
        else:
            if number in allowed:
                return number
    elif value.__class__ is float and value.is_integer() and int(value) in allowed:
        return int(value)
    raise _bad(where, "an integer", value)


def _js_value(value: Any, where: str) -> Any:
    value = _js_obj(value, where)
    if not value:
        return None
    key, inner = next(iter(value.items()))
    if inner is None:
        return None  # null: the field's default, i.e. no value
    where = f"{where}.{key}"
    if key == "stringValue" or key == "bytesValue":
        if not isinstance(inner, str):
            raise _bad(where, "a string", inner)
        return inner
    if key == "boolValue":
        if not isinstance(inner, bool):
            raise _bad(where, "true or false", inner)
        return inner
    if key == "intValue":
        return _js_int(inner, where)
    if key == "doubleValue":
        if inner.__class__ in (str, int, float):
            try:
                return float(inner)
            except ValueError:
                pass
        raise _bad(where, 'a number (or "NaN", "Infinity", "-Infinity")', inner)
    if key == "arrayValue":
        return [_js_value(v, w) for v, w in _js_list(_js_obj(inner, where), "values", where)]
    if key == "kvlistValue":
        inner = _js_obj(inner, where)
        return _js_attrs(inner.get("values"), f"{where}.values")
    raise _bad(where, "a value: stringValue, boolValue, intValue, doubleValue, …", key)


def _js_attrs(attributes: Any, where: str) -> dict[str, Any]:
    if attributes is None:
        return {}
    if not isinstance(attributes, list):
        raise _bad(where, "a list of attributes", attributes)
    out: dict[str, Any] = {}
    for i, kv in enumerate(attributes):
        kv = _js_obj(kv, f"{where}[{i}]")
        key = kv.get("key", "")
        if not isinstance(key, str):
            raise _bad(f"{where}[{i}].key", "a string", key)
        out[key] = _js_value(kv.get("value"), f"{where}[{i}].value")
    return out


def _js_enum(value: Any, names: tuple[str, ...], prefix: str) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        name = value.removeprefix(prefix)
        if name in names:
            return names.index(name)
        if value.isdigit():
            return int(value)
    return 0


# a \uD800-\uDFFF escape: JSON lets it stand alone, but UTF-8 (and SQLite) cannot carry it
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


def _lone_surrogate(value: Any, where: str) -> str | None:
    """The JSON path of the first string (or key) holding a lone surrogate, if any."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return where
    elif isinstance(value, dict):
        for key, item in value.items():
            found = _lone_surrogate(key, f"{where} (a key)") or _lone_surrogate(
                item, f"{where}.{key}"
            )
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _lone_surrogate(item, f"{where}[{i}]")
            if found is not None:
                return found
    return None


def decode_json(body: bytes) -> Decoded:
    """Decode an ``ExportTraceServiceRequest`` in OTLP's JSON encoding."""
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise OtlpError(f"expected a JSON ExportTraceServiceRequest in UTF-8: {exc}") from None
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise OtlpError(f"expected a JSON ExportTraceServiceRequest: {exc}") from None
    if _SURROGATE_ESCAPE.search(text):  # rare: only then is every string looked at
        where = _lone_surrogate(doc, "$")
        if where is not None:
            raise OtlpError(
                f"expected text without lone UTF-16 surrogates (\\ud800-\\udfff) at {where}"
            )
    if not isinstance(doc, dict) or not isinstance(doc.get("resourceSpans", []), list):
        raise OtlpError('expected a JSON object with a "resourceSpans" list')
    out = Decoded()
    for resource_spans, rwhere in _js_list(doc, "resourceSpans", "$"):
        resource_spans = _js_obj(resource_spans, rwhere)
        resource = _js_attrs(
            _js_obj(resource_spans.get("resource"), f"{rwhere}.resource").get("attributes"),
            f"{rwhere}.resource.attributes",
        )
        for scope_spans, swhere in _js_list(resource_spans, "scopeSpans", rwhere):
            scope_spans = _js_obj(scope_spans, swhere)
            for span, where in _js_list(scope_spans, "spans", swhere):
                if not isinstance(span, dict):
                    out.reject(where, "expected a span object")
                    continue
                trace_id = str(span.get("traceId", "")).lower()
                span_id = str(span.get("spanId", "")).lower()
                parent_id = str(span.get("parentSpanId") or "").lower()
                problem = _check_ids(trace_id, span_id, parent_id)
                try:
                    start = int(span.get("startTimeUnixNano", 0))
                    end = int(span.get("endTimeUnixNano", 0))
                except (TypeError, ValueError):
                    problem = problem or "expected integer startTimeUnixNano/endTimeUnixNano"
                    start = end = 0
                if problem is None and (end < start or end >> 63 or start < 0):
                    problem = _time_problem(start, end)
                if problem is not None:
                    out.reject(where, problem)
                    continue
                status = _js_obj(span.get("status"), f"{where}.status")
                events = []
                for e, ewhere in _js_list(span, "events", where):
                    e = _js_obj(e, ewhere)
                    events.append(
                        {
                            "time_ns": _js_int(
                                e.get("timeUnixNano", 0), f"{ewhere}.timeUnixNano", _UINT63
                            ),
                            "name": str(e.get("name", "")),
                            "attrs": _js_attrs(e.get("attributes"), f"{ewhere}.attributes"),
                        }
                    )
                links = []
                for link, lwhere in _js_list(span, "links", where):
                    link = _js_obj(link, lwhere)
                    links.append(
                        {
                            "trace_id": str(link.get("traceId", "")).lower(),
                            "span_id": str(link.get("spanId", "")).lower(),
                            "attrs": _js_attrs(link.get("attributes"), f"{lwhere}.attributes"),
                        }
                    )
                kind = _js_enum(span.get("kind"), KINDS, "SPAN_KIND_")
                out.spans.append(
                    _row(
                        trace_id,
                        span_id,
                        parent_id,
                        str(span.get("name", "")),
                        KINDS[kind] if 0 <= kind < _NKINDS else "UNSPECIFIED",
                        start,
                        end,
                        _js_enum(status.get("code"), ("UNSET", "OK", "ERROR"), "STATUS_CODE_"),
                        str(status.get("message", "")),
                        _js_attrs(span.get("attributes"), f"{where}.attributes"),
                        events,
                        links,
                        resource,
                    )
                )
    return out
