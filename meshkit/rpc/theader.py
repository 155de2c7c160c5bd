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
case (a few headers, no transforms) does no per-byte work beyond short varints.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from meshkit.errors import FrameError

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
# A block with a trace context is new on every call (a fresh span id each time): caching
# it would only push out the blocks that repeat.
_UNIQUE_KEY = "traceparent"
_BLOCKS: dict[tuple[int, tuple[tuple[str, str], ...]], bytes] = {}
_PARSED: dict[bytes, dict[str, str]] = {}


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
    Raises :class:`FrameError` for an unknown protocol id or transform, flags outside
    16 bits, or a header block or frame too large for the format.
    """
    if transforms:
        payload = _compress(payload, transforms)
    if not headers and not transforms:
        block = _BARE_BLOCK.get(protocol_id)
        if block is None:
            raise FrameError(_protocol_message(protocol_id))
    elif (
        not transforms
        and _UNIQUE_KEY not in headers  # type: ignore[operator]
        and (cached := _BLOCKS.get(cache_key := (protocol_id, tuple(headers.items()))))  # type: ignore[union-attr]
    ):
        block = cached
    else:
        if protocol_id not in _PROTOCOL_IDS:
            raise FrameError(_protocol_message(protocol_id))
        parts = [_VARINT1[protocol_id], _varint(len(transforms))]
        parts.extend(_varint(t) for t in transforms)
        if headers:
            parts.append(_VARINT1[INFO_KEYVALUE])
            parts.append(_varint(len(headers)))
            append = parts.append
            for key, value in headers.items():
                kb = key.encode()
                vb = value.encode()
                size = len(kb)
                append(_VARINT1[size] if size < 0x80 else _varint(size))
                append(kb)
                size = len(vb)
                append(_VARINT1[size] if size < 0x80 else _varint(size))
                append(vb)
        block = b"".join(parts)
        size = len(block)
        block += _PADDING[size & 3]
        if len(block) > MAX_HEADER_BLOCK:
            raise FrameError(
                f"expected a header block of at most {MAX_HEADER_BLOCK} bytes, "
                f"found {len(block)} bytes"
            )
        if not transforms and _UNIQUE_KEY not in headers:  # type: ignore[operator]
            _remember(_BLOCKS, cache_key, block)
    length = _FIXED_SIZE + len(block) + len(payload)
    if length > MAX_FRAME_LENGTH:
        raise FrameError(f"expected a frame of at most {MAX_FRAME_LENGTH} bytes, found {length}")
    if not 0 <= flags <= 0xFFFF:
        raise FrameError(f"expected 16-bit flags, found {flags}")
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
            f"expected a decompressed payload of at most {limit} bytes, found more than that"
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
    if cached is not None and len(cached) <= max_headers:
        return dict(cached)  # a copy: callers may change their headers
    headers = _parse_info_sections(block, max_headers)
    if len(block) <= 256 and _UNIQUE_KEY not in headers:
        _remember(_PARSED, block, dict(headers))
    return headers


def _parse_info_sections(block: bytes, max_headers: int) -> dict[str, str]:
    headers: dict[str, str] = {}
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
        if count + len(headers) > max_headers:
            raise FrameError(
                f"expected at most {max_headers} headers, found {count + len(headers)}"
            )
        if count * 2 > end - pos:
            raise FrameError(
                f"expected room for {count} headers in the header block, "
                f"found only {end - pos} bytes left"
            )
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
    return headers


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
        # Apache applies the read transforms in reverse order of the write transforms
        for _ in reversed(transforms):
            payload = _decompress(payload, limits.max_payload)
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
