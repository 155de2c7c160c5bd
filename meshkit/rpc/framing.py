"""Incremental transport detection and frame splitting for one Thrift connection.

A :class:`FrameDecoder` is fed the bytes of a connection as they arrive and hands back every
complete message, whatever transport the peer speaks, detected per message:

* ``0x80 0x01 ...``  unframed strict binary (no length: the message is scanned);
* ``0x82 ...``       unframed compact;
* otherwise a 4-byte big-endian length ``N`` followed by ``N`` bytes which start with
  ``0x0F 0xFF`` (THeader), ``0x80 0x01`` (framed binary) or ``0x82`` (framed compact).

:func:`encode_like` writes a reply in the transport the request came in.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum

from meshkit.errors import FrameError
from meshkit.rpc.theader import (
    DEFAULT_LIMITS,
    HeaderLimits,
    ProtocolId,
    decode_frame_fields,
    encode_frame,
)

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "Frame",
    "FrameDecoder",
    "OversizedFrame",
    "TransportType",
    "encode_like",
    "unframed_message_length",
]

DEFAULT_MAX_FRAME_SIZE = 16 * 1024 * 1024

_U32 = struct.Struct("!I")
_U32_UNPACK = _U32.unpack_from
_U32_PACK = _U32.pack
_I32_UNPACK = struct.Struct("!i").unpack_from
_MSG_HEAD_UNPACK = struct.Struct("!Ii").unpack_from
_MAP_HEAD_UNPACK = struct.Struct("!BBi").unpack_from
_LIST_HEAD_UNPACK = struct.Struct("!Bi").unpack_from
_BINARY = int(ProtocolId.BINARY)
_COMPACT = int(ProtocolId.COMPACT)


class TransportType(IntEnum):
    """How a message was delimited on the wire."""

    HEADER = 0
    FRAMED = 1
    UNFRAMED = 2


class BadHeaderFrame(FrameError):
    """A complete THeader frame whose header block was refused; ``seqid`` says which call."""

    transport = TransportType.HEADER

    def __init__(self, message: str, *, seqid: int | None) -> None:
        super().__init__(message)
        self.seqid = seqid


def _header_seqid(src: bytes | bytearray | memoryview, body: int, n: int) -> int | None:
    if body + 8 > n:
        return None
    return int.from_bytes(bytes(src[body + 4 : body + 8]), "big", signed=True)


class OversizedFrame(FrameError):
    """A frame (or unframed message) is larger than the decoder accepts.

    ``seqid`` is the THeader sequence id when the frame is THeader and its fixed fields had
    arrived, so a server can answer with an error before it closes the connection.
    ``transport`` is the transport, when it could be told already.
    """

    def __init__(
        self,
        message: str,
        *,
        limit: int,
        size: int | None = None,
        seqid: int | None = None,
        transport: TransportType | None = None,
    ) -> None:
        super().__init__(message)
        self.limit = limit
        self.size = size
        self.seqid = seqid
        self.transport = transport


@dataclass(slots=True)
class Frame:
    """One complete Thrift message taken off the wire.

    ``payload`` is the Thrift message: the (decompressed) THeader payload, the body of a
    framed message, or the bytes of an unframed message. ``seqid``, ``headers``, ``flags``
    and ``transforms`` are THeader fields (``None``/empty for the other transports).
    """

    transport: TransportType
    protocol_id: int
    payload: bytes
    seqid: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    flags: int = 0
    transforms: tuple[int, ...] = ()


# ------------------------------------------------------------------ unframed scanning


class _Incomplete(Exception):
    """More bytes are needed to finish the current step of the scan."""


# binary protocol: fixed widths, and the minimum encoded size of every type
_B_FIXED = {2: 1, 3: 1, 4: 8, 6: 2, 8: 4, 10: 8, 16: 16}
_B_MIN = {**_B_FIXED, 11: 4, 12: 1, 13: 6, 14: 5, 15: 5}
# compact protocol: 1/2 are bools (1 byte inside containers), 4/5/6 zigzag varints
_C_FIXED = {1: 1, 2: 1, 3: 1, 7: 8, 13: 16}
_C_VARINT = {4: 3, 5: 5, 6: 10}
_C_MIN = {**_C_FIXED, 4: 1, 5: 1, 6: 1, 8: 1, 9: 1, 10: 1, 11: 1, 12: 1}

# scanner stack entries: [_STRUCT] or [_LIST, elem type, 0, remaining]
# or [_MAP, key type, value type, remaining keys + values] (a key when remaining is even)
_STRUCT = 0
_LIST = 1
_MAP = 2

_Entry = list[int]


class _UnframedScanner:
    """Finds where one unframed message ends, without building Python objects.

    The scan is resumable: :meth:`run` is called with the message bytes received so far
    and picks up where the previous call stopped, so a message that trickles in is scanned
    once in total. Each step (a field header and its value header, or one container
    element) either completes or leaves the state untouched.
    """

    __slots__ = ("binary", "limit", "max_depth", "pos", "stack")

    def __init__(self, protocol_id: int, max_depth: int, limit: int) -> None:
        if protocol_id != _BINARY and protocol_id != _COMPACT:
            raise FrameError(f"expected protocol id 0 (binary) or 2 (compact), found {protocol_id}")
        self.binary = protocol_id == _BINARY
        self.max_depth = max_depth
        self.limit = limit
        self.pos = 0
        self.stack: list[_Entry] | None = None

    def run(self, m: memoryview | bytes | bytearray) -> int | None:
        """Scan on over ``m`` (the message so far); its length once complete, else None."""
        lim = min(len(m), self.limit)
        try:
            stack = self.stack
            if stack is None:
                if self.binary:
                    self.pos = self._binary_header(m, lim)
                else:
                    self.pos = self._compact_header(m, lim)
                if self.max_depth < 1:
                    raise self._too_deep()
                stack = self.stack = [[_STRUCT]]
            step = self._binary_step if self.binary else self._compact_step
            while stack:
                step(m, lim, stack)
        except _Incomplete:
            return None
        return self.pos

    # -- shared

    def _short(self, p: int) -> None:
        """``p`` (an end offset) lies beyond what is available or allowed."""
        if p > self.limit:
            raise OversizedFrame(
                f"unframed message of at least {p} bytes exceeds the limit of {self.limit}",
                limit=self.limit,
                size=p,
                transport=TransportType.UNFRAMED,
            )
        raise _Incomplete

    def _too_deep(self) -> FrameError:
        return FrameError(
            f"expected nesting of at most {self.max_depth} levels, found a deeper message"
        )

    def _container(
        self,
        p: int,
        lim: int,
        size: int,
        kinds: tuple[int, ...],
        depth: int,
        fixed: dict[int, int],
        minimum: dict[int, int],
    ) -> tuple[int, _Entry | None]:
        """Skip a fixed-width container whole, or return the stack entry to walk it."""
        if depth >= self.max_depth:
            raise self._too_deep()
        if len(kinds) == 1:
            width = fixed.get(kinds[0])
            if width is not None:
                p += size * width
                if p > lim:
                    self._short(p)
                return p, None
            least = p + size * minimum[kinds[0]]
            entry = [_LIST, kinds[0], 0, size]
        else:
            kw = fixed.get(kinds[0])
            vw = fixed.get(kinds[1])
            if kw is not None and vw is not None:
                p += size * (kw + vw)
                if p > lim:
                    self._short(p)
                return p, None
            least = p + size * (minimum[kinds[0]] + minimum[kinds[1]])
            entry = [_MAP, kinds[0], kinds[1], 2 * size]
        if least > self.limit:  # refuse absurd counts at once
            self._short(least)
        return p, entry

    def _varint(
        self, m: memoryview | bytes | bytearray, lim: int, p: int, max_bytes: int
    ) -> tuple[int, int]:
        result = 0
        shift = 0
        stop = p + max_bytes
        while True:
            if p >= lim:
                self._short(p + 1)
            byte = m[p]
            p += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result, p
            shift += 7
            if p >= stop:
                raise FrameError(
                    f"expected a varint of at most {max_bytes} bytes, found a longer one"
                )

    # -- strict binary

    def _binary_header(self, m: memoryview | bytes | bytearray, lim: int) -> int:
        if lim < 8:
            self._short(8)
        version: int
        name_len: int
        version, name_len = _MSG_HEAD_UNPACK(m, 0)
        if version & 0xFFFF0000 != 0x80010000:
            raise FrameError(f"expected strict binary version 0x8001, found 0x{version >> 16:04x}")
        mtype = version & 0xFF
        if not 1 <= mtype <= 4:
            raise FrameError(f"expected a message type 1..4, found {mtype}")
        if name_len < 0:
            raise FrameError(f"expected a non-negative method name length, found {name_len}")
        p = 8 + name_len + 4  # name, seqid
        if p > lim:
            self._short(p)
        return p

    def _binary_step(
        self, m: memoryview | bytes | bytearray, lim: int, stack: list[_Entry]
    ) -> None:
        top = stack[-1]
        pos = self.pos
        if top[0] == _STRUCT:
            if pos >= lim:
                self._short(pos + 1)
            ftype = m[pos]
            if ftype == 0:
                stack.pop()
                self.pos = pos + 1
                return
            p, entry = self._binary_value(m, lim, ftype, pos + 3, len(stack))
        else:
            remaining = top[3]
            if remaining == 0:
                stack.pop()
                return
            etype = top[1] if top[0] == _LIST or remaining & 1 == 0 else top[2]
            p, entry = self._binary_value(m, lim, etype, pos, len(stack))
            top[3] = remaining - 1
        self.pos = p
        if entry is not None:
            stack.append(entry)

    def _binary_value(
        self, m: memoryview | bytes | bytearray, lim: int, t: int, p: int, depth: int
    ) -> tuple[int, _Entry | None]:
        width = _B_FIXED.get(t)
        if width is not None:
            p += width
            if p > lim:
                self._short(p)
            return p, None
        if t == 11:
            if p + 4 > lim:
                self._short(p + 4)
            (size,) = _I32_UNPACK(m, p)
            if size < 0:
                raise FrameError(f"expected a non-negative string length, found {size}")
            p += 4 + size
            if p > lim:
                self._short(p)
            return p, None
        if t == 12:
            if depth >= self.max_depth:
                raise self._too_deep()
            return p, [_STRUCT]
        if t == 13:
            if p + 6 > lim:
                self._short(p + 6)
            ktype, vtype, size = _MAP_HEAD_UNPACK(m, p)
            p += 6
            if size < 0:
                raise FrameError(f"expected a non-negative map size, found {size}")
            if size == 0:
                return p, None
            for k in (ktype, vtype):
                if k not in _B_MIN:
                    raise FrameError(f"expected a binary Thrift type id in a map, found {k}")
            return self._container(p, lim, size, (ktype, vtype), depth, _B_FIXED, _B_MIN)
        if t == 14 or t == 15:
            if p + 5 > lim:
                self._short(p + 5)
            etype, size = _LIST_HEAD_UNPACK(m, p)
            p += 5
            if size < 0:
                raise FrameError(f"expected a non-negative list/set size, found {size}")
            if size == 0:
                return p, None
            if etype not in _B_MIN:
                raise FrameError(f"expected a binary Thrift type id in a list/set, found {etype}")
            return self._container(p, lim, size, (etype,), depth, _B_FIXED, _B_MIN)
        raise FrameError(f"expected a binary Thrift type id, found {t}")

    # -- compact

    def _compact_header(self, m: memoryview | bytes | bytearray, lim: int) -> int:
        if lim < 2:
            self._short(2)
        if m[0] != 0x82:
            raise FrameError(f"expected compact protocol id 0x82, found 0x{m[0]:02x}")
        version = m[1] & 0x1F
        if version != 1:
            raise FrameError(f"expected compact protocol version 1, found {version}")
        mtype = m[1] >> 5
        if not 1 <= mtype <= 4:
            raise FrameError(f"expected a message type 1..4, found {mtype}")
        _, p = self._varint(m, lim, 2, 5)  # seqid
        name_len, p = self._varint(m, lim, p, 5)
        p += name_len
        if p > lim:
            self._short(p)
        return p

    def _compact_step(
        self, m: memoryview | bytes | bytearray, lim: int, stack: list[_Entry]
    ) -> None:
        top = stack[-1]
        pos = self.pos
        if top[0] == _STRUCT:
            if pos >= lim:
                self._short(pos + 1)
            byte = m[pos]
            p = pos + 1
            if byte == 0:
                stack.pop()
                self.pos = p
                return
            if byte < 0x10:  # no delta: the zigzag i16 field id follows
                _, p = self._varint(m, lim, p, 3)
            ftype = byte & 0x0F
            if ftype == 1 or ftype == 2:  # bool, the value is in the type
                self.pos = p
                return
            p, entry = self._compact_value(m, lim, ftype, p, len(stack))
        else:
            remaining = top[3]
            if remaining == 0:
                stack.pop()
                return
            etype = top[1] if top[0] == _LIST or remaining & 1 == 0 else top[2]
            p, entry = self._compact_value(m, lim, etype, pos, len(stack))
            top[3] = remaining - 1
        self.pos = p
        if entry is not None:
            stack.append(entry)

    def _compact_value(
        self, m: memoryview | bytes | bytearray, lim: int, t: int, p: int, depth: int
    ) -> tuple[int, _Entry | None]:
        width = _C_FIXED.get(t)
        if width is not None:
            p += width
            if p > lim:
                self._short(p)
            return p, None
        max_bytes = _C_VARINT.get(t)
        if max_bytes is not None:
            return self._varint(m, lim, p, max_bytes)[1], None
        if t == 8:
            size, p = self._varint(m, lim, p, 5)
            p += size
            if p > lim:
                self._short(p)
            return p, None
        if t == 12:
            if depth >= self.max_depth:
                raise self._too_deep()
            return p, [_STRUCT]
        if t == 9 or t == 10:
            if p >= lim:
                self._short(p + 1)
            head = m[p]
            p += 1
            size = head >> 4
            etype = head & 0x0F
            if size == 15:
                size, p = self._varint(m, lim, p, 5)
            if size == 0:
                return p, None
            if etype not in _C_MIN:
                raise FrameError(f"expected a compact Thrift type id in a list/set, found {etype}")
            return self._container(p, lim, size, (etype,), depth, _C_FIXED, _C_MIN)
        if t == 11:
            size, p = self._varint(m, lim, p, 5)
            if size == 0:
                return p, None
            if p >= lim:
                self._short(p + 1)
            kv = m[p]
            p += 1
            ktype, vtype = kv >> 4, kv & 0x0F
            for k in (ktype, vtype):
                if k not in _C_MIN:
                    raise FrameError(f"expected a compact Thrift type id in a map, found {k}")
            return self._container(p, lim, size, (ktype, vtype), depth, _C_FIXED, _C_MIN)
        raise FrameError(f"expected a compact Thrift type id, found {t}")


def unframed_message_length(
    buf: bytes | bytearray | memoryview,
    protocol_id: int,
    *,
    max_depth: int = 64,
    limit: int,
) -> int | None:
    """Byte length of the unframed Thrift message (header + one struct) at the start of ``buf``.

    Returns ``None`` when ``buf`` holds only a prefix of the message. Raises
    :class:`FrameError` for anything that is not a well-formed strict binary / compact
    message or nests deeper than ``max_depth``, and :class:`OversizedFrame` when the message
    is (or is bound to be) longer than ``limit`` bytes.
    """
    return _UnframedScanner(protocol_id, max_depth, limit).run(buf)


# ------------------------------------------------------------------ the decoder


def _garbage(src: bytes, body: int, n: int, length: int) -> FrameError:
    found = src[body : min(n, body + 4, body + length)].hex()
    return FrameError(
        f"expected THeader, framed or unframed Thrift binary/compact, found bytes 0x{found} "
        f"after a frame length of {length}"
    )


class FrameDecoder:
    """Splits the byte stream of one connection into :class:`Frame` objects.

    Feed it whatever arrives; it keeps partial data between calls. After a
    :class:`FrameError` the connection cannot continue: every later :meth:`feed` raises the
    same error again.
    """

    __slots__ = (
        "_buf",
        "_error",
        "_limits",
        "_max",
        "_max_depth",
        "_pending",
        "_want",
        "completed",
        "rejected",
    )

    def __init__(
        self,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        header_limits: HeaderLimits = DEFAULT_LIMITS,
        max_depth: int = 64,
    ) -> None:
        if max_frame_size <= 0:
            raise ValueError("max_frame_size must be positive")
        self._buf = bytearray()
        self._max = max_frame_size
        self._limits = header_limits
        self._max_depth = max_depth
        # bytes the buffer must hold before it is worth parsing again (an incomplete frame)
        self._want = 0
        # the scan of the incomplete unframed message at the start of the buffer
        self._pending: _UnframedScanner | None = None
        self._error: FrameError | None = None
        #: THeader frames whose header block was refused (their bounds and seq ids are
        #: known, so the stream goes on): whoever feeds takes them and clears the list
        self.rejected: list[BadHeaderFrame] = []
        #: the frames completed in the ``feed`` that raised, before the bad data
        self.completed: list[Frame] = []

    @property
    def buffered(self) -> int:
        """Bytes held back, waiting for the rest of a message."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Add ``data`` and return every message it completes, in order.

        A THeader frame whose header block is refused does not stop the stream: it goes
        to :attr:`rejected` (a :class:`BadHeaderFrame` with its seq id) and the frames
        after it are decoded. Raises :class:`FrameError` (or :class:`OversizedFrame`) when
        the stream breaks the protocol (it cannot be followed any further); the frames
        completed earlier in the same ``data`` are then in :attr:`completed`.
        """
        if self._error is not None:
            raise self._error
        buf = self._buf
        frames: list[Frame] = []
        try:
            if buf:
                buf += data
                if len(buf) < self._want:
                    return []  # the frame at the start is still incomplete
                pending = self._pending
                if pending is not None:
                    with memoryview(buf) as view:
                        done = pending.run(view)
                    if done is None:
                        return []
                src = bytes(buf)
                buf.clear()
            elif not data:
                return []
            else:
                src = bytes(data)  # no copy when data is bytes
            pos = self._split(src, frames)
        except FrameError as exc:
            self._error = exc
            self.completed = frames
            raise
        if pos < len(src):
            buf += memoryview(src)[pos:]
        return frames

    def _split(self, src: bytes, frames: list[Frame]) -> int:
        """Append every complete message in ``src`` to ``frames``; return the bytes used."""
        n = len(src)
        pos = 0
        max_size = self._max
        limits = self._limits
        append = frames.append
        self._want = 0
        while pos < n:
            b0 = src[pos]
            if b0 >= 0x80:
                # no valid frame length starts with a set top bit: unframed, or garbage
                if b0 == 0x82:
                    proto = _COMPACT
                elif b0 == 0x80 and pos + 1 < n and src[pos + 1] == 0x01:
                    proto = _BINARY
                elif b0 == 0x80 and pos + 1 == n:
                    break
                else:
                    raise FrameError(
                        f"expected a positive frame length or an unframed Thrift message, "
                        f"found bytes 0x{src[pos : pos + 4].hex()}"
                    )
                scanner = self._pending
                if scanner is None or pos:
                    scanner = _UnframedScanner(proto, self._max_depth, max_size)
                with memoryview(src) as view:
                    size = scanner.run(view[pos:])
                if size is None:
                    self._pending = scanner  # resumes here with the next feed
                    break
                self._pending = None
                end = pos + size
                append(Frame(TransportType.UNFRAMED, proto, src[pos:end], None, {}))
                pos = end
                continue

            if pos + 4 > n:
                break
            (length,) = _U32_UNPACK(src, pos)
            if length == 0:
                raise FrameError("expected a positive frame length, found 0")
            if length > max_size:
                raise self._oversized(src, pos, n, length)
            body = pos + 4
            end = body + length
            if body + 1 < n:
                b4 = src[body]
                b5 = src[body + 1]
                if b4 == 0x0F and b5 == 0xFF:
                    if end > n:
                        self._want = end - pos
                        break
                    try:
                        seqid, proto, headers, payload, flags, transforms = decode_frame_fields(
                            src, body, end, limits
                        )
                    except FrameError as exc:
                        # The frame's bounds and seq id are known: refuse this one call
                        # and go on with the next frame.
                        self.rejected.append(
                            BadHeaderFrame(exc.message, seqid=_header_seqid(src, body, n))
                        )
                        pos = end
                        continue
                    append(
                        Frame(
                            TransportType.HEADER, proto, payload, seqid, headers, flags, transforms
                        )
                    )
                    pos = end
                    continue
                if b4 == 0x82:
                    proto = _COMPACT
                elif b4 == 0x80 and b5 == 0x01 and length > 1:
                    proto = _BINARY
                else:
                    raise _garbage(src, body, n, length)
            elif body < n:
                b4 = src[body]
                if b4 == 0x82:
                    proto = _COMPACT
                elif length == 1 or (b4 != 0x0F and b4 != 0x80):
                    raise _garbage(src, body, n, length)
                else:
                    self._want = body + 2 - pos
                    break
            else:
                self._want = 5
                break
            if end > n:
                self._want = end - pos
                break
            append(Frame(TransportType.FRAMED, proto, src[body:end], None, {}))
            pos = end
        return pos

    def _oversized(self, src: bytes, pos: int, n: int, length: int) -> FrameError:
        """The error for a frame over the limit (or for garbage that looks like one)."""
        transport: TransportType | None = None
        seqid: int | None = None
        body = pos + 4
        if n - body >= 2:
            b4, b5 = src[body], src[body + 1]
            if b4 == 0x0F and b5 == 0xFF:
                transport = TransportType.HEADER
                if n - pos >= 14:
                    (seqid,) = _I32_UNPACK(src, pos + 8)
            elif (b4 == 0x80 and b5 == 0x01) or b4 == 0x82:
                transport = TransportType.FRAMED
            else:
                return _garbage(src, body, n, length)
        elif n - body == 1:
            b4 = src[body]
            if b4 == 0x82:
                transport = TransportType.FRAMED
            elif b4 != 0x0F and b4 != 0x80:
                return _garbage(src, body, n, length)
        return OversizedFrame(
            f"frame of {length} bytes exceeds the limit of {self._max}",
            limit=self._max,
            size=length,
            seqid=seqid,
            transport=transport,
        )


def encode_like(
    frame_transport: TransportType,
    protocol_id: int,
    payload: bytes,
    *,
    seqid: int,
    headers: Mapping[str, str] | None = None,
    transforms: Sequence[int] = (),
    flags: int = 0,
) -> bytes:
    """Encode a reply in the transport its request came in.

    HEADER: a THeader frame (``seqid``, ``headers``, ``transforms``, ``flags`` and
    ``protocol_id`` are used); FRAMED: 4-byte length + payload; UNFRAMED: the payload as is.
    """
    if frame_transport == TransportType.HEADER:
        return encode_frame(
            payload,
            seqid=seqid,
            headers=headers,
            protocol_id=protocol_id,
            transforms=transforms,
            flags=flags,
        )
    if frame_transport == TransportType.FRAMED:
        return _U32_PACK(len(payload)) + payload
    if frame_transport == TransportType.UNFRAMED:
        return bytes(payload)
    raise ValueError(f"unknown transport {frame_transport!r}")
