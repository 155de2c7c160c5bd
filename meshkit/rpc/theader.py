"""The Apache Thrift THeader frame format: encoder and validating decoder.

Wire layout (Apache Thrift ``doc/specs/HeaderFormat.md``)::

    LENGTH        u32  bytes that follow (excludes itself)
    MAGIC         u16  0x0FFF
    FLAGS         u16
    SEQUENCE      i32  (two's complement)
    HEADER SIZE   u16  size of the header block in 4-byte words
    HEADER BLOCK       varint protocol id
                       varint number of transforms, then one varint id each
                       info sections: varint info id; id 1 (KEYVALUE) is followed by
                       a varint count and that many (key, value) varint-length-prefixed
                       utf-8 strings; id 0 is padding and ends the info sections
                       zero padding to a multiple of 4 bytes
    PAYLOAD            the Thrift message, after the transforms (zlib) were applied

Like Apache's ``THeaderTransport``, an info id other than KEYVALUE stops the parsing of the
info sections: the rest of the header block is skipped. Every other violation of the format
raises :class:`~meshkit.errors.FrameError`.

:func:`encode_frame` and :func:`decode_frame` are on the hot path of every RPC: the common
case (a few headers, no transforms) does no per-byte work beyond short varints, and header
blocks seen recently are reused from bounded caches. The two headers that change from call
to call, ``meshkit-timeout-ms`` and ``traceparent``, are written last (in that order), so
the rest of a traced call's block is cached on both sides (see ``_VARYING``).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from meshkit.errors import FrameError

from .context import TIMEOUT_KEY

__all__ = [
    "DEFAULT_LIMITS",
    "HEADER_MAGIC",
    "INFO_KEYVALUE",
    "INFO_PADDING",
    "MAX_HEADER_BLOCK",
    "HeaderFrame",
    "HeaderLimits",
    "ProtocolId",
    "TransformId",
    "decode_frame",
    "decode_frame_fields",
    "encode_frame",
]

HEADER_MAGIC = 0x0FFF
INFO_PADDING = 0
INFO_KEYVALUE = 1
#: The header size field counts 4-byte words in 16 bits.
MAX_HEADER_BLOCK = 0xFFFF * 4
#: Largest value of the 4-byte length prefix (Apache reads it as a signed int32).
MAX_FRAME_LENGTH = 0x7FFFFFFF

_FIXED_SIZE = 10  # magic, flags, seqid, header size
_MAX_VARINT32_BYTES = 5


class ProtocolId(IntEnum):
    """Serialization protocol of the payload (THeader "protocol id")."""

    BINARY = 0
    COMPACT = 2


class TransformId(IntEnum):
    """Payload transforms. Only ZLIB is supported; the others are recognised and refused."""

    ZLIB = 1
    HMAC = 2
    SNAPPY = 3


_PROTOCOL_IDS = frozenset(int(p) for p in ProtocolId)


@dataclass(slots=True)
class HeaderLimits:
    """Bounds applied while decoding a frame, so a peer cannot make us allocate at will.

    ``max_header_bytes`` bounds the header block (the part counted by HEADER SIZE);
    ``max_payload`` bounds the payload both as received and after decompression.
    """

    max_headers: int = 128
    max_header_bytes: int = 64 * 1024
    max_payload: int = 16 * 1024 * 1024


DEFAULT_LIMITS = HeaderLimits()


@dataclass(slots=True)
class HeaderFrame:
    """One decoded THeader frame. ``payload`` is after the transforms were undone."""

    seqid: int
    protocol_id: int
    headers: dict[str, str]
    payload: bytes
    flags: int = 0
    transforms: tuple[int, ...] = field(default=())


# --------------------------------------------------------------------------- encoding

# length, magic, flags, seqid (unsigned after masking), header words
_PREFIX = struct.Struct("!IHHIH")
_PREFIX_PACK = _PREFIX.pack
_VARINT1 = tuple(bytes((i,)) for i in range(128))
_PADDING = (b"", b"\x00\x00\x00", b"\x00\x00", b"\x00")
# header block with no transforms and no headers: protocol id, 0 transforms, 2 bytes padding
_BARE_BLOCK = {int(p): bytes((int(p), 0, 0, 0)) for p in ProtocolId}


# Header blocks recently encoded or decoded. Calls of one client mostly carry the same
# headers (the same budget, caller and trace flags), and a lookup costs far less than
# encoding or parsing them again. Bounded: emptied when full.
_CACHE_SIZE = 512
_BLOCKS: dict[tuple[int, tuple[tuple[str, str], ...]], bytes] = {}
# Parsed blocks (up to 256 bytes): the headers and the largest header count the block
# declares (what ``HeaderLimits.max_headers`` is checked against).
_PARSED: dict[bytes, tuple[dict[str, str], int]] = {}

# Two headers change from call to call: ``traceparent`` (a new span id on every traced
# call) and ``meshkit-timeout-ms`` (the budget left). When present they are encoded after
# all the others, the budget first and the trace context last, so that the rest of the
# block (the "head": protocol id, header count and the other pairs) is cached even on
# traced calls, and the decoder finds them at the end of the block. Header order carries
# no meaning in THeader; any peer decodes the block, and the order is still a function of
# the headers alone (the others in the mapping's order, then these two).
_TRACE_KEY = "traceparent"
_TIMEOUT_KEY = TIMEOUT_KEY
_VARYING = frozenset((_TRACE_KEY, _TIMEOUT_KEY))
# a W3C version-00 traceparent is 55 characters: key length, key, value length
_TRACE_SIZE = 55
_TRACE_PAIR = b"\x0b" + _TRACE_KEY.encode() + bytes((_TRACE_SIZE,))
_TRACE_KEY_PREFIX = _TRACE_PAIR[:-1]
_TRACE_TAIL = len(_TRACE_PAIR) + _TRACE_SIZE  # the whole traceparent pair
_TIMEOUT_KEY_PREFIX = bytes((len(_TIMEOUT_KEY),)) + _TIMEOUT_KEY.encode()
# heads of blocks with varying headers: (protocol id, header count, the other pairs)
_HEADS: dict[tuple[int, int, tuple[tuple[str, str], ...]], bytes] = {}
# parsed heads: head bytes -> (headers, declared count, pairs in the head)
_PARSED_HEADS: dict[bytes, tuple[dict[str, str], int, int]] = {}
_PARSE_CACHE_MAX_BLOCK = 256


def _remember(cache: dict[Any, Any], key: Any, value: Any) -> None:
    if len(cache) >= _CACHE_SIZE:
        cache.clear()
    cache[key] = value


def _varint(value: int) -> bytes:
    """Encode a non-negative int as an unsigned LEB128 varint."""
    if value < 0x80:
        return _VARINT1[value]
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _compress(payload: bytes, transforms: Sequence[int]) -> bytes:
    for transform in transforms:
        if transform == TransformId.ZLIB:
            payload = zlib.compress(payload)
        else:
            raise FrameError(_transform_message(transform))
    return payload


def _transform_message(transform: int) -> str:
    if transform in (TransformId.HMAC, TransformId.SNAPPY):
        name = TransformId(transform).name
        return f"unsupported transform: expected ZLIB (1), found {name} ({transform})"
    return f"unknown transform: expected ZLIB (1), found {transform}"


def _encode_head(
    protocol_id: int,
    transforms: Sequence[int],
    count: int,
    pairs: Iterable[tuple[str, str]],
) -> bytes:
    """Protocol id, transform ids and a KEYVALUE section of ``count`` headers of which
    ``pairs`` are written (the varying ones follow); no padding."""
    if protocol_id not in _PROTOCOL_IDS:
        raise FrameError(_protocol_message(protocol_id))
    parts = [_VARINT1[protocol_id], _varint(len(transforms))]
    parts.extend(_varint(t) for t in transforms)
    if count:
        parts.append(_VARINT1[INFO_KEYVALUE])
        parts.append(_varint(count))
        append = parts.append
        for key, value in pairs:
            kb = key.encode()
            vb = value.encode()
            size = len(kb)
            append(_VARINT1[size] if size < 0x80 else _varint(size))
            append(kb)
            size = len(vb)
            append(_VARINT1[size] if size < 0x80 else _varint(size))
            append(vb)
    return b"".join(parts)


def _timeout_pair(timeout: str) -> bytes:
    vb = timeout.encode()
    size = len(vb)
    return _TIMEOUT_KEY_PREFIX + (_VARINT1[size] if size < 0x80 else _varint(size)) + vb


def _trace_pair(trace: str) -> bytes:
    vb = trace.encode()
    if len(vb) == _TRACE_SIZE:
        return _TRACE_PAIR + vb
    return _TRACE_KEY_PREFIX + _varint(len(vb)) + vb


def _padded(block: bytes) -> bytes:
    block += _PADDING[len(block) & 3]
    if len(block) > MAX_HEADER_BLOCK:
        raise _block_too_large(len(block))
    return block


def _block_too_large(size: int) -> FrameError:
    return FrameError(
        f"expected a header block of at most {MAX_HEADER_BLOCK} bytes, found {size} bytes"
    )


def _frame_too_large(length: int) -> FrameError:
    return FrameError(f"expected a frame of at most {MAX_FRAME_LENGTH} bytes, found {length}")


def _new_head(key: tuple[int, int, tuple[tuple[str, str], ...]]) -> bytes:
    """Encode and cache the head for ``key``: (protocol id, header count, other pairs)."""
    head = _encode_head(key[0], (), key[1], key[2])
    _remember(_HEADS, key, head)
    return head


def _head(protocol_id: int, items: tuple[tuple[str, str], ...]) -> bytes:
    """The head (all before the varying pairs) of a block with ``items``."""
    key = (protocol_id, len(items), tuple(i for i in items if i[0] not in _VARYING))
    return _HEADS.get(key) or _new_head(key)


def _untraced_block(
    protocol_id: int, headers: Mapping[str, str], items: tuple[tuple[str, str], ...]
) -> bytes:
    """The padded block for headers without a ``traceparent`` (not cached here)."""
    timeout = headers.get(_TIMEOUT_KEY)
    if timeout is None:
        return _padded(_encode_head(protocol_id, (), len(items), items))
    return _padded(_head(protocol_id, items) + _timeout_pair(timeout))


def encode_frame(
    payload: bytes,
    *,
    seqid: int,
    headers: Mapping[str, str] | None = None,
    protocol_id: int = ProtocolId.BINARY,
    transforms: Sequence[int] = (),
    flags: int = 0,
) -> bytes:
    """Encode ``payload`` as a complete THeader frame, 4-byte length prefix included.

    ``seqid`` is masked to 32 bits, so negative int32 values are written in two's complement
    as Apache does. ``transforms`` are applied in order (only ``TransformId.ZLIB`` exists).
    Headers are written in the mapping's order, except ``meshkit-timeout-ms`` and
    ``traceparent``, which come last (in that order).
    Raises :class:`FrameError` for an unknown protocol id or transform, flags outside
    16 bits, or a header block or frame too large for the format.
    """
    if not 0 <= flags <= 0xFFFF:
        raise FrameError(f"expected 16-bit flags, found {flags}")
    if transforms:
        payload = _compress(payload, transforms)
        if headers:
            trace = headers.get(_TRACE_KEY)
            timeout = headers.get(_TIMEOUT_KEY)
            others = [item for item in headers.items() if item[0] not in _VARYING]
            block = _padded(
                _encode_head(protocol_id, transforms, len(headers), others)
                + (b"" if timeout is None else _timeout_pair(timeout))
                + (b"" if trace is None else _trace_pair(trace))
            )
        else:
            block = _padded(_encode_head(protocol_id, transforms, 0, ()))
    elif not headers:
        cached = _BARE_BLOCK.get(protocol_id)
        if cached is None:
            raise FrameError(_protocol_message(protocol_id))
        block = cached
    elif (trace := headers.get(_TRACE_KEY)) is None:
        cached = _BLOCKS.get(key := (protocol_id, tuple(headers.items())))
        if cached is None:
            cached = _untraced_block(protocol_id, headers, key[1])
            _remember(_BLOCKS, key, cached)
        block = cached
    else:
        # a traced call: the cached head, the budget left, the trace context, padding
        timeout = headers.get(_TIMEOUT_KEY)
        items = tuple(headers.items())
        varying = 1 if timeout is None else 2
        # (the client sets both last: then the other headers are a slice)
        if items[-1][0] in _VARYING and (varying == 1 or items[-2][0] in _VARYING):
            head_key = (protocol_id, len(items), items[:-varying])
        else:
            head_key = (protocol_id, len(items), tuple(i for i in items if i[0] not in _VARYING))
        head = _HEADS.get(head_key) or _new_head(head_key)
        tb = trace.encode()
        if timeout is not None and len(tb) == _TRACE_SIZE and len(vb := timeout.encode()) < 0x80:
            # the usual case, written without building the block first
            size = len(head) + len(_TIMEOUT_KEY_PREFIX) + 1 + len(vb) + _TRACE_TAIL
            pad = _PADDING[size & 3]
            size += len(pad)
            if size > MAX_HEADER_BLOCK:
                raise _block_too_large(size)
            length = _FIXED_SIZE + size + len(payload)
            if length > MAX_FRAME_LENGTH:
                raise _frame_too_large(length)
            prefix = _PREFIX_PACK(length, HEADER_MAGIC, flags, seqid & 0xFFFFFFFF, size >> 2)
            return b"".join(
                (
                    prefix,
                    head,
                    _TIMEOUT_KEY_PREFIX,
                    _VARINT1[len(vb)],
                    vb,
                    _TRACE_PAIR,
                    tb,
                    pad,
                    payload,
                )
            )
        block = _padded(
            head + (b"" if timeout is None else _timeout_pair(timeout)) + _trace_pair(trace)
        )
    length = _FIXED_SIZE + len(block) + len(payload)
    if length > MAX_FRAME_LENGTH:
        raise _frame_too_large(length)
    prefix = _PREFIX_PACK(length, HEADER_MAGIC, flags, seqid & 0xFFFFFFFF, len(block) >> 2)
    return b"".join((prefix, block, payload))


def _protocol_message(protocol_id: int) -> str:
    return f"unknown protocol id: expected 0 (binary) or 2 (compact), found {protocol_id}"


# --------------------------------------------------------------------------- decoding

_FIXED = struct.Struct("!HHiH")
_FIXED_UNPACK = _FIXED.unpack_from

Buffer = bytes | bytearray | memoryview


def _read_varint(buf: Buffer, pos: int, end: int, what: str) -> tuple[int, int]:
    """Read a varint of at most 5 bytes that must end before ``end``."""
    result = 0
    shift = 0
    start = pos
    while True:
        if pos >= end:
            raise FrameError(
                f"expected a varint {what} inside the header block, "
                f"found the block ends after {pos - start} byte(s) of it"
            )
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if pos - start >= _MAX_VARINT32_BYTES:
            raise FrameError(
                f"expected a varint {what} of at most {_MAX_VARINT32_BYTES} bytes, "
                f"found a longer one"
            )


def _decompress(payload: bytes, limit: int) -> bytes:
    decomp = zlib.decompressobj()
    try:
        out = decomp.decompress(payload, limit + 1)
    except zlib.error as exc:
        raise FrameError(
            f"expected a zlib-compressed payload, found corrupt data ({exc})"
        ) from None
    if len(out) > limit:
        raise FrameError(
            f"expected a decompressed payload of at most {limit} bytes (what is left of "
            "the frame's budget after any earlier zlib layer), found more than that"
        )
    if not decomp.eof:
        raise FrameError("expected a complete zlib stream, found a truncated one")
    if decomp.unused_data:
        raise FrameError(
            f"expected the zlib stream to end the payload, found {len(decomp.unused_data)} "
            f"trailing bytes"
        )
    return out


def _parse_info(block: bytes, max_headers: int) -> dict[str, str]:
    """Parse the info sections (the header block after the transform ids)."""
    cached = _PARSED.get(block)
    if cached is not None and cached[1] <= max_headers:
        return dict(cached[0])  # a copy: callers may change their headers
    if len(block) >= _TRACE_TAIL and (headers := _parse_traced(block, max_headers)) is not None:
        return headers
    headers, need = _parse_info_sections(block, max_headers)
    if len(block) <= _PARSE_CACHE_MAX_BLOCK and _TRACE_KEY not in headers:
        _remember(_PARSED, block, (headers.copy(), need))
    return headers


def _parse_traced(block: bytes, max_headers: int) -> dict[str, str] | None:
    """The headers of a block laid out as meshkit's encoder writes a traced call's: one
    KEYVALUE section whose last pair is a 55-byte ``traceparent``, then padding. The head
    (all before that pair) is parsed once and cached. ``None``: not that layout (or
    anything unusual): parse the block in full.

    The result is what :func:`_parse_info_sections` returns for the block: the head is
    checked to be exactly the section's first ``count - 1`` pairs, so the traceparent
    pair is the one the full parse reads next, and only padding (zeros) follows it.
    """
    body = block.rstrip(b"\x00")
    at = len(body) - _TRACE_TAIL
    if at < 2 or not body.startswith(_TRACE_PAIR, at):
        return None
    trace = body[at + len(_TRACE_PAIR) :]
    if not trace.isascii():
        return None
    head = body[:at]
    cached = _PARSED_HEADS.get(head)
    if cached is None:
        cached = _head_entry(head)
        if cached is None:
            return None
    parsed, count, pairs = cached
    if count - pairs != 1 or count > max_headers:
        return None  # (the full parse raises the error)
    headers = parsed.copy()
    headers[_TRACE_KEY] = trace.decode()
    return headers


def _head_entry(head: bytes) -> tuple[dict[str, str], int, int] | None:
    """Parse and cache ``head``, the start of a section that misses one pair. When it ends
    in a ``meshkit-timeout-ms`` pair (the budget varies from call to call), what comes
    before that pair is cached too, and only the budget is parsed on a later miss."""
    entry = None
    where = head.rfind(_TIMEOUT_KEY_PREFIX)
    if where >= 2:
        start = where + len(_TIMEOUT_KEY_PREFIX) + 1
        if start <= len(head) and head[start - 1] == len(head) - start < 0x80:
            value = head[start:]
            before = head[:where]
            inner = _PARSED_HEADS.get(before)
            if inner is None:
                inner = _parse_head(before, 2)
                if inner is not None and len(before) <= _PARSE_CACHE_MAX_BLOCK:
                    _remember(_PARSED_HEADS, before, inner)
            if inner is not None and inner[1] - inner[2] == 2 and value.isascii():
                headers = inner[0].copy()
                headers[_TIMEOUT_KEY] = value.decode()
                entry = (headers, inner[1], inner[2] + 1)
    if entry is None:
        entry = _parse_head(head, 1)
        if entry is None:
            return None
    if len(head) <= _PARSE_CACHE_MAX_BLOCK:
        _remember(_PARSED_HEADS, head, entry)
    return entry


def _parse_head(head: bytes, missing: int) -> tuple[dict[str, str], int, int] | None:
    """``head`` as the start of a KEYVALUE section: its headers, the count it declares
    and the number of pairs in it, when it holds exactly ``count - missing`` pairs."""
    if len(head) < 2 or head[0] != INFO_KEYVALUE:
        return None
    try:
        count, pos = _read_varint(head, 1, len(head), "header count")
        pairs = count - missing
        if pairs < 0 or count * 2 > len(head) + 2 * missing:
            return None
        headers: dict[str, str] = {}
        text = head.decode("ascii") if head.isascii() else None
        pos = _read_pairs(head, text, pos, len(head), pairs, headers)
    except FrameError:
        return None
    if pos != len(head):
        return None
    return headers, count, pairs


def _parse_info_sections(block: bytes, max_headers: int) -> tuple[dict[str, str], int]:
    """The headers of the info sections, and the largest number of headers a section
    made the limit check count (what a cached result is re-checked against)."""
    headers: dict[str, str] = {}
    need = 0
    # all-ASCII block (the usual case): offsets in the decoded text equal byte offsets,
    # so the block is decoded once and keys/values are plain str slices
    text = block.decode("ascii") if block.isascii() else None
    pos = 0
    end = len(block)
    while pos < end:
        info = block[pos]
        if info < 0x80:
            pos += 1
        else:
            info, pos = _read_varint(block, pos, end, "info id")
        if info != INFO_KEYVALUE:
            # padding (0) ends the info sections; like Apache, any other id stops parsing
            break
        if pos < end and block[pos] < 0x80:
            count = block[pos]
            pos += 1
        else:
            count, pos = _read_varint(block, pos, end, "header count")
        total = count + len(headers)
        if total > max_headers:
            raise FrameError(f"expected at most {max_headers} headers, found {total}")
        need = max(need, total)
        if count * 2 > end - pos:
            raise FrameError(
                f"expected room for {count} headers in the header block, "
                f"found only {end - pos} bytes left"
            )
        pos = _read_pairs(block, text, pos, end, count, headers)
    return headers, need


def _read_pairs(
    block: bytes, text: str | None, pos: int, end: int, count: int, headers: dict[str, str]
) -> int:
    """Read ``count`` (key, value) pairs from ``pos`` into ``headers``; the new position.

    ``text``: the block decoded as ASCII when it is all ASCII, else ``None``.
    """
    for _ in range(count):
        if pos < end and block[pos] < 0x80:
            size = block[pos]
            pos += 1
        else:
            size, pos = _read_varint(block, pos, end, "header key length")
        stop = pos + size
        if stop > end:
            raise _past_block("header key", size, end - pos)
        key = text[pos:stop] if text is not None else _utf8(block, pos, stop, "header key")
        pos = stop
        if pos < end and block[pos] < 0x80:
            size = block[pos]
            pos += 1
        else:
            size, pos = _read_varint(block, pos, end, "header value length")
        stop = pos + size
        if stop > end:
            raise _past_block("header value", size, end - pos)
        headers[key] = (
            text[pos:stop] if text is not None else _utf8(block, pos, stop, "header value")
        )
        pos = stop
    return pos


def _past_block(what: str, size: int, left: int) -> FrameError:
    return FrameError(
        f"expected a {what} of {size} bytes, found only {left} bytes left in the header block"
    )


def _utf8(block: bytes, start: int, stop: int, what: str) -> str:
    try:
        return block[start:stop].decode()
    except UnicodeDecodeError as exc:
        raise FrameError(f"expected a utf-8 {what}, found invalid utf-8 ({exc.reason})") from None


def decode_frame_fields(
    buf: Buffer, start: int, end: int, limits: HeaderLimits
) -> tuple[int, int, dict[str, str], bytes, int, tuple[int, ...]]:
    """Decode the THeader frame in ``buf[start:end]`` (magic onwards) without copying it.

    Returns ``(seqid, protocol_id, headers, payload, flags, transforms)``; this is the
    allocation-light primitive behind :func:`decode_frame` and the connection decoder.
    """
    size = end - start
    if size < _FIXED_SIZE:
        raise FrameError(
            f"expected at least {_FIXED_SIZE} bytes of THeader fixed fields, found {size}"
        )
    magic, flags, seqid, words = _FIXED_UNPACK(buf, start)
    if magic != HEADER_MAGIC:
        raise FrameError(f"expected THeader magic 0x{HEADER_MAGIC:04x}, found 0x{magic:04x}")
    pos = start + _FIXED_SIZE
    block_size = words << 2
    hend = pos + block_size
    if block_size > limits.max_header_bytes:
        raise FrameError(
            f"expected a header block of at most {limits.max_header_bytes} bytes, "
            f"found {block_size}"
        )
    if hend > end:
        raise FrameError(
            f"expected a header block of {block_size} bytes, found only {end - pos} bytes "
            f"after the fixed fields"
        )
    payload_size = end - hend
    if payload_size > limits.max_payload:
        raise FrameError(
            f"expected a payload of at most {limits.max_payload} bytes, found {payload_size}"
        )

    # protocol id and transform count: almost always single-byte varints
    if pos + 1 < hend and buf[pos] < 0x80 and buf[pos + 1] < 0x80:
        protocol_id = buf[pos]
        ntransforms = buf[pos + 1]
        pos += 2
    else:
        protocol_id, pos = _read_varint(buf, pos, hend, "protocol id")
        ntransforms, pos = _read_varint(buf, pos, hend, "transform count")
    if protocol_id != 0 and protocol_id != 2:
        raise FrameError(_protocol_message(protocol_id))

    transforms: tuple[int, ...] = ()
    if ntransforms:
        if ntransforms > hend - pos:
            raise FrameError(
                f"expected at most {hend - pos} transform ids in the header block, "
                f"found a count of {ntransforms}"
            )
        ids = []
        for _ in range(ntransforms):
            transform, pos = _read_varint(buf, pos, hend, "transform id")
            if transform != TransformId.ZLIB:
                raise FrameError(_transform_message(transform))
            ids.append(transform)
        transforms = tuple(ids)

    if pos < hend and buf[pos] != INFO_PADDING:
        block = buf[pos:hend]
        headers = _parse_info(block if type(block) is bytes else bytes(block), limits.max_headers)
    else:
        headers = {}

    payload = buf[hend:end]
    if type(payload) is not bytes:
        payload = bytes(payload)
    if transforms:
        # Apache applies the read transforms in reverse order of the write transforms.
        # Every layer's output counts against one max_payload budget: nested layers
        # (each inflating the next) would otherwise cost time quadratic in their number.
        budget = limits.max_payload
        for _ in reversed(transforms):
            payload = _decompress(payload, budget)
            budget -= len(payload)
    return seqid, protocol_id, headers, payload, flags, transforms


def decode_frame(
    frame: bytes | memoryview, *, limits: HeaderLimits = DEFAULT_LIMITS
) -> HeaderFrame:
    """Decode and validate one THeader frame.

    ``frame`` is everything after the 4-byte length prefix (it starts at the magic).
    ``seqid`` is returned as a signed int32, as Apache reads it. Raises
    :class:`FrameError` for any violation of the format or of ``limits``.
    """
    seqid, protocol_id, headers, payload, flags, transforms = decode_frame_fields(
        frame, 0, len(frame), limits
    )
    return HeaderFrame(seqid, protocol_id, headers, payload, flags, transforms)
