"""The fast path of the collector's protobuf decoder: OTLP spans read off the wire format.

The generated protobuf classes parse a request in C, but every field read afterwards builds
Python objects (an attribute is a ``KeyValue``, an ``AnyValue``, a ``WhichOneof`` and a
``getattr``): about 17 µs per span, most of the collector's decoding time. This module walks
the wire format itself and keeps, per distinct encoded attribute (``rpc.system=thrift``,
``meshkit.service=…``: the same bytes in span after span), its decoded key and value and its
JSON text, so a span's attribute object is joined from cached pieces instead of decoded and
serialised again.

Only what it can decode exactly as the generated classes would is decoded here: anything
else (a wire type or field it does not expect where it matters, a singular message repeated,
a truncated or malformed body, text that is not UTF-8) raises :class:`Fallback`, and the
caller decodes the whole body with the generated classes instead, whose answer (or error
message) is the reference. Events, links, resources and attribute values other than
strings, booleans, integers and doubles are rare on the hot path and are handed to the
generated classes one message at a time.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from .jsontext import dumps as _dumps
from .jsontext import float_text

__all__ = ["Fallback", "KvEntry", "WireSpan", "decode_request"]

_unpack_double = struct.Struct("<d").unpack_from
_unpack_u64 = struct.Struct("<Q").unpack_from

# (key, value, '"key":value' as JSON)
KvEntry = tuple[str, Any, str]

# Decoded attributes keyed by their encoded KeyValue. Strings, booleans and integers repeat
# from span to span; doubles (durations, budgets) rarely do and are not kept.
_CACHE: dict[bytes, KvEntry] = {}
_CACHE_MAX = 16384
_KEY_JSON: dict[str, str] = {}  # key -> '"key":'


# A tag is a 32-bit varint: field numbers go up to 2**29 - 1 (protobuf calls more corrupt).
_MAX_TAG = 0xFFFFFFFF


class Fallback(Exception):
    """The fast path leaves this body to the generated protobuf classes."""


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """A varint at ``pos``: its value and the position after it."""
    result = 0
    shift = 0
    while True:
        try:
            b = buf[pos]
        except IndexError:
            raise Fallback from None
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise Fallback


def _skip(buf: bytes, pos: int, end: int, wire_type: int) -> int:
    """The position after a field of an unknown number (kept as unknown by protobuf)."""
    if wire_type == 0:
        _, pos = _varint(buf, pos)
    elif wire_type == 1:
        pos += 8
    elif wire_type == 2:
        length, pos = _varint(buf, pos)
        pos += length
    elif wire_type == 5:
        pos += 4
    else:
        raise Fallback  # groups and invalid wire types
    if pos > end:
        raise Fallback
    return pos


def _string(raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise Fallback from None  # protobuf refuses it: let it say so


def _kv_entry(raw: bytes, slow_kv: Callable[[bytes], tuple[str, Any]]) -> KvEntry:
    """Decode one encoded ``KeyValue`` (and cache what repeats)."""
    key: str | None = None
    value: Any = None
    cacheable = True
    simple = True
    pos, end = 0, len(raw)
    while pos < end:
        tag = raw[pos]
        pos += 1
        if tag == 0x0A:  # 1: key
            length, pos = _varint(raw, pos)
            if pos + length > end:
                raise Fallback
            key = _string(raw[pos : pos + length])
            pos += length
        elif tag == 0x12:  # 2: value (AnyValue)
            length, pos = _varint(raw, pos)
            vend = pos + length
            if vend > end or value is not None:
                simple = False  # a repeated value message merges: leave it to protobuf
                break
            value, cacheable, ok = _any_value(raw, pos, vend)
            if not ok:
                simple = False
                break
            pos = vend
        else:
            simple = False
            break
    if not simple or key is None:
        key, value = slow_kv(raw)
        cacheable = False
    key_json = _KEY_JSON.get(key)
    if key_json is None:
        if len(_KEY_JSON) >= _CACHE_MAX:
            _KEY_JSON.clear()
        key_json = _KEY_JSON[key] = _dumps(key) + ":"
    if value.__class__ is float:  # finite: its repr; NaN, ±inf: OTLP JSON strings
        entry = (
            key,
            value,
            key_json + (repr(value) if value - value == 0.0 else float_text(value)),
        )
    else:
        entry = (key, value, key_json + _dumps(value))
    if cacheable:
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.clear()
        _CACHE[raw] = entry
    return entry


def _any_value(buf: bytes, pos: int, end: int) -> tuple[Any, bool, bool]:
    """An ``AnyValue`` holding one scalar: (value, cacheable, decoded here)."""
    if pos == end:
        return None, True, True  # no value set
    tag = buf[pos]
    pos += 1
    if tag == 0x0A:  # string_value
        length, pos = _varint(buf, pos)
        if pos + length != end:
            return None, False, False
        return _string(buf[pos:end]), True, True
    if tag == 0x10 or tag == 0x18:  # bool_value, int_value
        number, pos = _varint(buf, pos)
        if pos != end:
            return None, False, False
        if tag == 0x10:
            return number != 0, True, True
        number &= 0xFFFFFFFFFFFFFFFF
        return (number - (1 << 64) if number >> 63 else number), True, True
    if tag == 0x21 and pos + 8 == end:  # double_value
        return _unpack_double(buf, pos)[0], False, True
    return None, False, False  # arrays, kvlists, bytes, repeated oneof fields


# (trace_id, span_id, parent_span_id, name, kind, start, end, status code, status message,
#  attributes, their JSON text or None, encoded events, encoded links)
WireSpan = tuple[
    bytes,
    bytes,
    bytes,
    str,
    int,
    int,
    int,
    int,
    str,
    dict[str, Any],
    str | None,
    list[bytes],
    list[bytes],
]
# the fields every common encoder writes first: trace_id, span_id; start and end times
_unpack_ids = struct.Struct("<BB16sBB8s").unpack_from
_unpack_times = struct.Struct("<BQBQ").unpack_from


def _status(buf: bytes, pos: int, end: int) -> tuple[int, str]:
    """A ``Status`` in ``buf[pos:end]``; nothing read past ``end``."""
    code, message = 0, ""
    while pos < end:
        tag = buf[pos]
        pos += 1
        if tag == 0x18 and pos < end and buf[pos] < 0x80:  # 3: code, the usual 0, 1 or 2
            code = buf[pos]
            pos += 1
        elif tag == 0x12:  # 2: message
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise Fallback
            message = _string(buf[pos : pos + length])
            pos += length
        elif tag == 0x18:  # 3: code (an open enum, int32)
            code, pos = _varint(buf, pos)
            code &= 0xFFFFFFFF
            code = code - (1 << 32) if code >> 31 else code
        else:
            if tag > 0x7F:
                tag, pos = _varint(buf, pos - 1)
            if tag >> 3 == 0 or tag > _MAX_TAG:
                raise Fallback
            pos = _skip(buf, pos, end, tag & 7)
    if pos != end:  # a varint ran past the end of the message
        raise Fallback
    return code, message


def _span(buf: bytes, pos: int, end: int, slow_kv: Callable[[bytes], tuple[str, Any]]) -> WireSpan:
    try:
        return _span_fields(buf, pos, end, slow_kv)
    except UnicodeDecodeError:
        raise Fallback from None  # protobuf refuses it: let it say so


def _span_fields(
    buf: bytes, pos: int, end: int, slow_kv: Callable[[bytes], tuple[str, Any]]
) -> WireSpan:
    trace_id = span_id = parent_id = b""
    name = ""
    kind = start = stop_ns = code = 0
    message = ""
    attrs: dict[str, Any] = {}
    frags: list[str] = []
    events: list[bytes] = []
    links: list[bytes] = []
    cache_get = _CACHE.get
    status_seen = False
    # The fields in the order every common encoder writes them, each read only when its
    # tag is where expected; the general loop below reads whatever is left, in any order
    # (a field read twice: the last one wins, as in protobuf).
    if pos + 28 <= end:
        head = _unpack_ids(buf, pos)
        if head[0] == 0x0A and head[1] == 0x10 and head[3] == 0x12 and head[4] == 0x08:
            trace_id = head[2]
            span_id = head[5]
            pos += 28
            if pos + 10 <= end and buf[pos] == 0x22 and buf[pos + 1] == 0x08:
                parent_id = buf[pos + 2 : pos + 10]
                pos += 10
    if pos + 2 <= end and buf[pos] == 0x2A:
        stop = pos + 2 + buf[pos + 1]
        if stop <= end and buf[pos + 1] < 0x80:
            name = buf[pos + 2 : stop].decode()
            pos = stop
    if pos + 2 <= end and buf[pos] == 0x30 and buf[pos + 1] < 0x80:
        kind = buf[pos + 1]
        pos += 2
    if pos + 18 <= end:
        times = _unpack_times(buf, pos)
        if times[0] == 0x39 and times[2] == 0x41:
            start = times[1]
            stop_ns = times[3]
            pos += 18
    frags_append = frags.append
    while pos < end and buf[pos] == 0x4A:
        length = buf[pos + 1]
        if length > 0x7F:
            break
        stop = pos + 2 + length
        if stop > end:
            raise Fallback
        raw = buf[pos + 2 : stop]
        entry = cache_get(raw)
        if entry is None:
            entry = _kv_entry(raw, slow_kv)
        key, value, frag = entry
        attrs[key] = value
        frags_append(frag)
        pos = stop
    while pos < end:
        tag = buf[pos]
        pos += 1
        if tag > 0x7F:
            if tag == 0x85 and buf[pos] == 0x01:  # 16: flags (fixed32), not stored
                pos += 5
                continue
            tag, pos = _varint(buf, pos - 1)
            if tag > _MAX_TAG:
                raise Fallback
        wire_type = tag & 7
        field = tag >> 3
        if wire_type == 2:
            length = buf[pos]
            if length < 0x80:
                pos += 1
            else:
                length, pos = _varint(buf, pos)
            stop = pos + length
            if stop > end:
                raise Fallback
            if field == 9:
                raw = buf[pos:stop]
                entry = cache_get(raw)
                if entry is None:
                    entry = _kv_entry(raw, slow_kv)
                attrs[entry[0]] = entry[1]
                frags.append(entry[2])
            elif field == 15:
                if status_seen:
                    raise Fallback  # a repeated message field merges: leave it to protobuf
                status_seen = True
                code, message = _status(buf, pos, stop)
            elif field == 1:
                trace_id = buf[pos:stop]
            elif field == 2:
                span_id = buf[pos:stop]
            elif field == 4:
                parent_id = buf[pos:stop]
            elif field == 5:
                name = buf[pos:stop].decode()
            elif field == 11:
                events.append(buf[pos:stop])
            elif field == 13:
                links.append(buf[pos:stop])
            elif field == 3:
                buf[pos:stop].decode()  # trace_state: not stored, but must be UTF-8
            elif field == 0:
                raise Fallback
            pos = stop
        elif wire_type == 1:
            if pos + 8 > end:
                raise Fallback
            if field == 7:
                start = _unpack_u64(buf, pos)[0]
            elif field == 8:
                stop_ns = _unpack_u64(buf, pos)[0]
            elif field == 0:
                raise Fallback
            pos += 8
        elif wire_type == 0:
            number, pos = _varint(buf, pos)
            if field == 6:
                number &= 0xFFFFFFFF
                kind = number - (1 << 32) if number >> 31 else number
            elif field == 0:
                raise Fallback
        else:
            if field == 0:
                raise Fallback
            pos = _skip(buf, pos, end, wire_type)
    if pos != end:
        raise Fallback
    # no key repeated: the joined pieces are the JSON object
    attrs_json = "{" + ",".join(frags) + "}" if len(attrs) == len(frags) else None
    return (
        trace_id,
        span_id,
        parent_id,
        name,
        kind,
        start,
        stop_ns,
        code,
        message,
        attrs,
        attrs_json,
        events,
        links,
    )


def _message_fields(buf: bytes, pos: int, end: int) -> list[tuple[int, int, int]]:
    """(field, start, stop) of each length-delimited field of a message; others skipped."""
    out = []
    while pos < end:
        tag, pos = _varint(buf, pos)
        field, wire_type = tag >> 3, tag & 7
        if field == 0 or tag > 0xFFFFFFFF:  # a tag is a 32-bit varint
            raise Fallback
        if wire_type == 2:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise Fallback
            out.append((field, pos, pos + length))
            pos += length
        else:
            pos = _skip(buf, pos, end, wire_type)
    if pos != end:
        raise Fallback
    return out


# per resource: (its encoded Resource or None, the spans of each of its scopes)
RequestLayout = list[tuple[bytes | None, list[list[WireSpan]]]]


def _scope(buf: bytes, pos: int, end: int, slow_kv: Callable[[bytes], tuple[str, Any]]) -> None:
    """Check an ``InstrumentationScope`` as protobuf would (not stored)."""
    for field, start, stop in _message_fields(buf, pos, end):
        if field in (1, 2):  # name, version
            _string(buf[start:stop])
        elif field == 3:  # attributes
            _kv_entry(buf[start:stop], slow_kv)


def decode_request(body: bytes, slow_kv: Callable[[bytes], tuple[str, Any]]) -> RequestLayout:
    """Walk an ``ExportTraceServiceRequest``: per resource, its encoded ``Resource`` and
    the spans of each of its scopes. ``slow_kv`` decodes a ``KeyValue`` this module does
    not (with the generated classes; it raises :class:`Fallback` for a malformed one).
    Raises :class:`Fallback` for anything it leaves to the generated classes."""
    try:
        return _request(body, slow_kv)
    except (IndexError, struct.error):  # truncated
        raise Fallback from None


def _request(body: bytes, slow_kv: Callable[[bytes], tuple[str, Any]]) -> RequestLayout:
    out: RequestLayout = []
    for field, start, stop in _message_fields(body, 0, len(body)):
        if field != 1:
            continue
        resource: bytes | None = None
        scopes: list[list[WireSpan]] = []
        for rfield, rstart, rstop in _message_fields(body, start, stop):
            if rfield == 1:
                if resource is not None:
                    raise Fallback  # a repeated Resource merges: leave it to protobuf
                resource = body[rstart:rstop]
            elif rfield == 2:
                spans = []
                for sfield, sstart, sstop in _message_fields(body, rstart, rstop):
                    if sfield == 2:
                        spans.append(_span(body, sstart, sstop, slow_kv))
                    elif sfield == 1:
                        _scope(body, sstart, sstop, slow_kv)
                    elif sfield == 3:
                        _string(body[sstart:sstop])  # schema_url
                scopes.append(spans)
            elif rfield == 3:
                _string(body[rstart:rstop])  # schema_url
        out.append((resource, scopes))
    return out
