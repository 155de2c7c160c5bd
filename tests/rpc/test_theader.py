"""THeader encoder/decoder: round trips, byte-level interop with Apache Thrift, and errors."""

from __future__ import annotations

import struct
import tracemalloc
import zlib

import pytest
from thrift.protocol.TBinaryProtocol import TBinaryProtocol
from thrift.protocol.TCompactProtocol import TCompactProtocol
from thrift.protocol.THeaderProtocol import THeaderProtocol
from thrift.Thrift import TApplicationException, TMessageType, TType
from thrift.transport.THeaderTransport import (
    THeaderClientType,
    THeaderSubprotocolID,
    THeaderTransformID,
    THeaderTransport,
)
from thrift.transport.TTransport import TMemoryBuffer, TTransportBase

from meshkit.errors import FrameError, InvalidArgument
from meshkit.rpc.theader import (
    DEFAULT_LIMITS,
    HeaderFrame,
    HeaderLimits,
    ProtocolId,
    TransformId,
    decode_frame,
    encode_frame,
)

MiB = 1024 * 1024


def _body(frame: bytes) -> bytes:
    """Strip and check the 4-byte length prefix."""
    (length,) = struct.unpack("!I", frame[:4])
    assert length == len(frame) - 4
    return frame[4:]


def raw_frame(
    block: bytes,
    payload: bytes = b"",
    *,
    seqid: int = 7,
    flags: int = 0,
    magic: int = 0x0FFF,
    words: int | None = None,
    pad: bool = True,
) -> bytes:
    """A hand-made THeader frame body (after the length prefix)."""
    if pad:
        block += b"\x00" * (-len(block) % 4)
    if words is None:
        words = len(block) // 4
    return struct.pack("!HHiH", magic, flags, seqid, words) + block + payload


# ----------------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    "headers",
    [None, {}, {"a": "b"}, {"trace-id": "0af7651916cd43dd8448eb211c80319c", "x": "", "": "y"}],
)
@pytest.mark.parametrize("seqid", [0, 1, -1, -(2**31), 2**31 - 1, 123456789])
def test_round_trip(headers: dict[str, str] | None, seqid: int) -> None:
    payload = b"\x80\x01\x00\x01payload"
    frame = encode_frame(payload, seqid=seqid, headers=headers)
    got = decode_frame(_body(frame))
    assert got == HeaderFrame(seqid, ProtocolId.BINARY, dict(headers or {}), payload)


def test_round_trip_unicode_headers_zlib_compact_flags() -> None:
    headers = {"clé": "välue ✓", "日本": "🎉" * 50, "k" * 300: "v" * 5000}
    payload = bytes(range(256)) * 40
    frame = encode_frame(
        payload,
        seqid=42,
        headers=headers,
        protocol_id=ProtocolId.COMPACT,
        transforms=[TransformId.ZLIB],
        flags=0x8001,
    )
    assert len(frame) < len(payload)  # it was compressed
    got = decode_frame(memoryview(_body(frame)))
    assert got.headers == headers
    assert got.payload == payload
    assert got.protocol_id == ProtocolId.COMPACT
    assert got.transforms == (TransformId.ZLIB,)
    assert got.flags == 0x8001
    assert got.seqid == 42


def test_double_zlib_and_empty_payload() -> None:
    frame = encode_frame(b"", seqid=1, transforms=[1, 1])
    assert decode_frame(_body(frame)).payload == b""
    frame = encode_frame(b"abc" * 100, seqid=1, transforms=[1, 1])
    assert decode_frame(_body(frame)).payload == b"abc" * 100


def test_seqid_is_masked_to_32_bits() -> None:
    assert decode_frame(_body(encode_frame(b"", seqid=2**32 - 1))).seqid == -1
    assert decode_frame(_body(encode_frame(b"", seqid=2**31))).seqid == -(2**31)
    assert decode_frame(_body(encode_frame(b"", seqid=2**32 + 5))).seqid == 5


def test_exact_bytes_of_a_bare_frame() -> None:
    frame = encode_frame(b"P", seqid=0x01020304)
    assert frame == (
        b"\x00\x00\x00\x0f"  # length: 10 + 4 + 1
        b"\x0f\xff\x00\x00"  # magic, flags
        b"\x01\x02\x03\x04"  # seqid
        b"\x00\x01"  # header words
        b"\x00\x00\x00\x00"  # protocol binary, 0 transforms, padding
        b"P"
    )
    compact = encode_frame(b"", seqid=0, protocol_id=ProtocolId.COMPACT)
    assert compact[14:18] == b"\x02\x00\x00\x00"


def test_encode_rejects_what_cannot_be_sent() -> None:
    with pytest.raises(FrameError, match="unknown protocol id"):
        encode_frame(b"", seqid=0, protocol_id=1)
    with pytest.raises(FrameError, match="unknown protocol id"):
        encode_frame(b"", seqid=0, protocol_id=5, headers={"a": "b"})
    for transform in (TransformId.HMAC, TransformId.SNAPPY):
        with pytest.raises(FrameError, match="unsupported transform"):
            encode_frame(b"", seqid=0, transforms=[transform])
    with pytest.raises(FrameError, match="unknown transform"):
        encode_frame(b"", seqid=0, transforms=[9])
    with pytest.raises(FrameError, match="16-bit flags"):
        encode_frame(b"", seqid=0, flags=0x10000)
    with pytest.raises(FrameError, match="header block of at most"):
        encode_frame(b"", seqid=0, headers={"k": "v" * 300_000})


def test_frame_error_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument):
        decode_frame(b"\x00")


# ------------------------------------------------------------- interop with Apache Thrift


def _apache_write(
    seqid: int,
    headers: dict[bytes, bytes],
    *,
    zlib_transform: bool = False,
    protocol: int = THeaderSubprotocolID.BINARY,
) -> bytes:
    out = TMemoryBuffer()
    proto = THeaderProtocol(out, (THeaderClientType.HEADERS,), protocol)
    for key, value in headers.items():
        proto.set_header(key, value)
    if zlib_transform:
        proto.add_transform(THeaderTransformID.ZLIB)
    proto.writeMessageBegin("getUser", TMessageType.CALL, seqid)
    proto.writeStructBegin("args")
    proto.writeFieldBegin("name", TType.STRING, 1)
    proto.writeString("x" * 200)
    proto.writeFieldEnd()
    proto.writeFieldBegin("id", TType.I64, 2)
    proto.writeI64(-99)
    proto.writeFieldEnd()
    proto.writeFieldStop()
    proto.writeStructEnd()
    proto.writeMessageEnd()
    proto.trans.flush()
    return out.getvalue()


def _read_args(payload: bytes, protocol: int) -> tuple[str, int, int, str, int]:
    cls = TBinaryProtocol if protocol == THeaderSubprotocolID.BINARY else TCompactProtocol
    proto = cls(TMemoryBuffer(payload))
    name, mtype, seqid = proto.readMessageBegin()
    proto.readStructBegin()
    proto.readFieldBegin()
    text = proto.readString()
    proto.readFieldEnd()
    proto.readFieldBegin()
    number = proto.readI64()
    return name, mtype, seqid, text, number


@pytest.mark.parametrize("zlib_transform", [False, True])
@pytest.mark.parametrize("protocol", [THeaderSubprotocolID.BINARY, THeaderSubprotocolID.COMPACT])
@pytest.mark.parametrize("seqid", [0, 17, -3, 2**31 - 1])
def test_decode_what_apache_writes(zlib_transform: bool, protocol: int, seqid: int) -> None:
    headers = {b"trace": b"abc", "ключ".encode(): "значение".encode(), b"L" * 200: b"v" * 1000}
    wire = _apache_write(seqid, headers, zlib_transform=zlib_transform, protocol=protocol)
    got = decode_frame(_body(wire))
    assert got.seqid == seqid
    assert got.flags == 0
    assert got.protocol_id == protocol
    assert got.transforms == ((TransformId.ZLIB,) if zlib_transform else ())
    assert got.headers == {"trace": "abc", "ключ": "значение", "L" * 200: "v" * 1000}
    assert _read_args(got.payload, protocol) == (
        "getUser",
        TMessageType.CALL,
        seqid,
        "x" * 200,
        -99,
    )
    # and we produce the very same bytes
    ours = encode_frame(
        got.payload,
        seqid=seqid,
        headers=got.headers,
        protocol_id=protocol,
        transforms=got.transforms,
    )
    assert ours == wire


def test_decode_apache_frame_without_headers() -> None:
    wire = _apache_write(5, {})
    got = decode_frame(_body(wire))
    assert got.headers == {}
    assert encode_frame(got.payload, seqid=5) == wire


@pytest.mark.parametrize("zlib_transform", [False, True])
@pytest.mark.parametrize("protocol", [ProtocolId.BINARY, ProtocolId.COMPACT])
@pytest.mark.parametrize("seqid", [0, 9, -7, -(2**31), 2**31 - 1])
def test_apache_reads_what_we_write(zlib_transform: bool, protocol: int, seqid: int) -> None:
    buf = TMemoryBuffer()
    writer = TBinaryProtocol(buf) if protocol == ProtocolId.BINARY else TCompactProtocol(buf)
    writer.writeMessageBegin("echo", TMessageType.CALL, seqid)
    writer.writeStructBegin("args")
    writer.writeFieldBegin("s", TType.STRING, 1)
    writer.writeString("héllo")
    writer.writeFieldEnd()
    writer.writeFieldStop()
    writer.writeStructEnd()
    writer.writeMessageEnd()
    payload = buf.getvalue()
    headers = {"k1": "v1", "ünï": "cødé", "empty": ""}
    wire = encode_frame(
        payload,
        seqid=seqid,
        headers=headers,
        protocol_id=protocol,
        transforms=[TransformId.ZLIB] if zlib_transform else [],
    )
    proto = THeaderProtocol(TMemoryBuffer(wire), (THeaderClientType.HEADERS,))
    assert proto.readMessageBegin() == ("echo", TMessageType.CALL, seqid)
    proto.readStructBegin()
    assert proto.readFieldBegin() == (None, TType.STRING, 1)
    assert proto.readString() == "héllo"
    assert proto.trans.sequence_id == seqid
    assert proto.trans.protocol_id == protocol
    assert proto.get_headers() == {k.encode(): v.encode() for k, v in headers.items()}


@pytest.mark.parametrize("transforms", [(), (TransformId.ZLIB,)])
def test_apache_transport_reads_raw_payload_headers_seqid_flags(
    transforms: tuple[int, ...],
) -> None:
    payload = bytes(range(256)) * 10
    headers = {"k" * 200: "v" * 3000, "a": "ü"}
    wire = encode_frame(payload, seqid=-123456, headers=headers, transforms=transforms, flags=9)
    apache = THeaderTransport(TMemoryBuffer(wire), (THeaderClientType.HEADERS,))
    assert apache.read(len(payload)) == payload
    assert apache.get_headers() == {k.encode(): v.encode() for k, v in headers.items()}
    assert apache.sequence_id == -123456
    assert apache.flags == 9
    assert apache.protocol_id == THeaderSubprotocolID.BINARY


class _Loopback(TTransportBase):
    """Reads from one byte string, collects what is written (an Apache server connection)."""

    def __init__(self, incoming: bytes) -> None:
        self._in = TMemoryBuffer(incoming)
        self.written = bytearray()

    def isOpen(self) -> bool:
        return True

    def read(self, sz: int) -> bytes:
        return self._in.read(sz)

    def write(self, buf: bytes) -> None:
        self.written += buf

    def flush(self) -> None:
        pass


def test_apache_server_echoes_seqid_and_flags_in_its_reply() -> None:
    request = encode_frame(
        b"\x80\x01\x00\x01\x00\x00\x00\x00\x00\x00\x00\x2a\x00", seqid=77, flags=5
    )
    conn = _Loopback(request)
    server = THeaderProtocol(conn, (THeaderClientType.HEADERS,))
    assert server.readMessageBegin() == ("", TMessageType.CALL, 42)
    server.set_header(b"status", b"ok")
    server.writeMessageBegin("", TMessageType.REPLY, 42)
    server.writeStructBegin("result")
    server.writeFieldStop()
    server.writeStructEnd()
    server.writeMessageEnd()
    server.trans.flush()
    reply = decode_frame(_body(bytes(conn.written)))
    # THeaderProtocol.writeMessageBegin copies the message seqid into the frame seqid;
    # the flags read from the request are written back unchanged
    assert reply.seqid == 42
    assert reply.flags == 5
    assert reply.headers == {"status": "ok"}


def test_apache_stops_at_unknown_info_id_and_so_do_we() -> None:
    # KEYVALUE(a=b), unknown info id 7 with junk, then a KEYVALUE that must be ignored
    block = b"\x00\x00" + b"\x01\x01\x01a\x01b" + b"\x07\xff\xff" + b"\x01\x01\x01c\x01d"
    body = raw_frame(block, b"PAYLOAD")
    got = decode_frame(body)
    assert got.headers == {"a": "b"}
    assert got.payload == b"PAYLOAD"
    apache = THeaderTransport(
        TMemoryBuffer(struct.pack("!I", len(body)) + body), (THeaderClientType.HEADERS,)
    )
    assert apache.read(7) == b"PAYLOAD"
    assert apache.get_headers() == {b"a": b"b"}


def test_padding_ends_info_sections_and_sections_merge() -> None:
    block = b"\x00\x00" + b"\x01\x01\x01a\x01b" + b"\x01\x01\x01c\x01d" + b"\x00\x01\x01\x01e\x01f"
    got = decode_frame(raw_frame(block))
    assert got.headers == {"a": "b", "c": "d"}


def test_apache_rejects_transforms_it_does_not_know() -> None:
    body = raw_frame(b"\x00\x01\x02")
    apache = THeaderTransport(
        TMemoryBuffer(struct.pack("!I", len(body)) + body), (THeaderClientType.HEADERS,)
    )
    with pytest.raises(TApplicationException):
        apache.read(1)
    with pytest.raises(FrameError, match=r"unsupported transform: expected ZLIB \(1\), found HMAC"):
        decode_frame(body)


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "expected at least 10 bytes of THeader fixed fields, found 0"),
        (b"\x0f\xff\x00", "expected at least 10 bytes"),
        (raw_frame(b"\x00\x00", magic=0x1234), "expected THeader magic 0x0fff, found 0x1234"),
        (raw_frame(b"\x00\x00", words=3), "expected a header block of 12 bytes, found only 4"),
        (raw_frame(b"", words=0), "expected a varint protocol id inside the header block"),
        (raw_frame(b"\x00\x80\x80\x80"), "transform count inside the header block"),
        (raw_frame(b"\xff\xff\xff\xff\xff\xff\x00\x00"), "varint protocol id of at most 5 bytes"),
        (raw_frame(b"\x00\xff\xff\xff\xff\xff\xff\x00"), "transform count of at most 5 bytes"),
        (
            raw_frame(b"\x01\x00"),
            r"unknown protocol id: expected 0 \(binary\) or 2 \(compact\), "
            r"found 1",
        ),
        (raw_frame(b"\x81\x01\x00"), "unknown protocol id.*found 129"),
        (raw_frame(b"\x00\x01\x03"), r"unsupported transform.*found SNAPPY \(3\)"),
        (raw_frame(b"\x00\x01\x02"), r"unsupported transform.*found HMAC \(2\)"),
        (raw_frame(b"\x00\x01\x09"), r"unknown transform.*found 9"),
        (raw_frame(b"\x00\x40\x01\x01"), "expected at most 2 transform ids"),
        (raw_frame(b"\x00\x00\x01\x05\x01a\x01b"), "expected room for 5 headers"),
        (raw_frame(b"\x00\x00\x01\x01\x09a\x01b"), "expected a header key of 9 bytes, found only"),
        (raw_frame(b"\x00\x00\x01\x01\x01a\x05b"), "expected a header value of 5 bytes"),
        (raw_frame(b"\x00\x00\x01\x01\xff\xff\xff\xff\xff\x7f"), "header key length of at most 5"),
        (raw_frame(b"\x00\x00\x01\x01\x02\xff\xfe\x01b"), "expected a utf-8 header key, found"),
        (raw_frame(b"\x00\x00\x01\x01\x01a\x02\xc3\x28"), "expected a utf-8 header value"),
        (raw_frame(b"\x00\x00\x01\xff\xff\xff\xff\x0f"), "expected at most 128 headers, found"),
        (raw_frame(b"\x00\x01\x01", b"not zlib"), "expected a zlib-compressed payload"),
        (raw_frame(b"\x00\x01\x01", zlib.compress(b"x" * 1000)[:-6]), "truncated"),
        (raw_frame(b"\x00\x01\x01", zlib.compress(b"x") + b"junk"), "4 trailing bytes"),
    ],
)
def test_decode_errors(body: bytes, message: str) -> None:
    with pytest.raises(FrameError, match=message):
        decode_frame(body)


def test_header_count_limit() -> None:
    headers = {f"k{i}": "v" for i in range(5)}
    body = _body(encode_frame(b"", seqid=0, headers=headers))
    assert decode_frame(body, limits=HeaderLimits(max_headers=5)).headers == headers
    with pytest.raises(FrameError, match="expected at most 4 headers, found 5"):
        decode_frame(body, limits=HeaderLimits(max_headers=4))


def test_header_count_limit_spans_sections() -> None:
    block = b"\x00\x00" + b"\x01\x01\x01a\x01b" + b"\x01\x02\x01c\x01d\x01e\x01f"
    assert len(decode_frame(raw_frame(block), limits=HeaderLimits(max_headers=3)).headers) == 3
    with pytest.raises(FrameError, match="expected at most 2 headers, found 3"):
        decode_frame(raw_frame(block), limits=HeaderLimits(max_headers=2))


def test_header_bytes_limit() -> None:
    body = _body(encode_frame(b"", seqid=0, headers={"big": "x" * 2000}))
    block = struct.unpack_from("!H", body, 8)[0] * 4
    assert decode_frame(body, limits=HeaderLimits(max_header_bytes=block)).headers
    with pytest.raises(
        FrameError, match=f"expected a header block of at most {block - 4} bytes, found {block}"
    ):
        decode_frame(body, limits=HeaderLimits(max_header_bytes=block - 4))
    with pytest.raises(FrameError, match="header block of at most 65536 bytes"):
        decode_frame(_body(encode_frame(b"", seqid=0, headers={"big": "x" * 70_000})))


def test_payload_limit_before_and_after_decompression() -> None:
    limits = HeaderLimits(max_payload=1000)
    assert decode_frame(_body(encode_frame(b"x" * 1000, seqid=1)), limits=limits)
    with pytest.raises(FrameError, match="payload of at most 1000 bytes, found 1001"):
        decode_frame(_body(encode_frame(b"x" * 1001, seqid=1)), limits=limits)
    exact = _body(encode_frame(b"x" * 1000, seqid=1, transforms=[1]))
    assert decode_frame(exact, limits=limits).payload == b"x" * 1000
    over = _body(encode_frame(b"x" * 1001, seqid=1, transforms=[1]))
    with pytest.raises(FrameError, match="decompressed payload of at most 1000 bytes"):
        decode_frame(over, limits=limits)


def zlib_bomb(size: int) -> bytes:
    """``size`` zero bytes, compressed without ever holding them in memory."""
    comp = zlib.compressobj(9)
    chunk = bytes(MiB)
    parts = [comp.compress(chunk) for _ in range(size // MiB)]
    parts.append(comp.flush())
    return b"".join(parts)


def test_zlib_bomb_is_refused_without_inflating_it() -> None:
    bomb = zlib_bomb(100 * MiB)
    assert len(bomb) < 200_000
    body = raw_frame(b"\x00\x01\x01", bomb)
    tracemalloc.start()
    try:
        with pytest.raises(FrameError, match="decompressed payload of at most 16777216 bytes"):
            decode_frame(body, limits=DEFAULT_LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 40 * MiB


def test_header_block_caches_never_leak_between_frames() -> None:
    """Encoded and parsed header blocks are reused; a caller changing its dict changes no other."""
    headers = {"meshkit-timeout-ms": "5000", "user-id": "42"}
    first = encode_frame(b"payload", seqid=1, headers=headers)
    assert encode_frame(b"payload", seqid=1, headers=dict(headers)) == first
    other = encode_frame(b"payload", seqid=1, headers={**headers, "user-id": "43"})
    assert other != first
    one = decode_frame(first[4:])
    one.headers["user-id"] = "changed"
    one.headers["extra"] = "x"
    again = decode_frame(first[4:])
    assert again.headers == headers
    assert decode_frame(other[4:]).headers["user-id"] == "43"
    # the same block under a stricter limit is still refused
    with pytest.raises(FrameError, match="at most 1 headers"):
        decode_frame(first[4:], limits=HeaderLimits(max_headers=1))


def test_blocks_with_a_trace_context_are_not_cached_but_round_trip() -> None:
    from meshkit.rpc import theader

    theader._BLOCKS.clear()
    theader._PARSED.clear()
    stable = {"meshkit-timeout-ms": "5000"}
    for i in range(3):
        traced = {**stable, "traceparent": f"00-{i + 1:032x}-{i + 1:016x}-01"}
        got = decode_frame(_body(encode_frame(b"p", seqid=i, headers=traced)))
        assert got.headers == traced
        got = decode_frame(_body(encode_frame(b"p", seqid=i, headers=stable)))
        assert got.headers == stable
    # one entry each: the repeating block, never the ones made unique by a span id
    assert len(theader._BLOCKS) == 1
    assert len(theader._PARSED) == 1
