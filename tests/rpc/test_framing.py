"""FrameDecoder: transport detection, incremental splitting, unframed scanning, limits."""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import thriftpy2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from thrift.protocol.TCompactProtocol import TCompactProtocol as ApacheCompact
from thrift.Thrift import TMessageType as ApacheMessageType
from thrift.Thrift import TType
from thrift.transport.TTransport import TMemoryBuffer as ApacheMemoryBuffer
from thriftpy2.protocol import TBinaryProtocol, TCompactProtocol, TCyBinaryProtocol
from thriftpy2.thrift import TMessageType
from thriftpy2.transport import TCyMemoryBuffer, TMemoryBuffer
from waiting import finishes_within

from meshkit.errors import FrameError
from meshkit.rpc.framing import (
    Frame,
    FrameDecoder,
    OversizedFrame,
    TransportType,
    encode_like,
    unframed_message_length,
)
from meshkit.rpc.theader import HeaderLimits, ProtocolId, TransformId, encode_frame

MiB = 1024 * 1024

IDL = """
enum Color { RED = 1, GREEN = 2 }
struct Inner {
  1: i32 a,
  2: string s,
  3: bool flag,
  4: double d,
  5: Color color,
}
struct Outer {
  1: list<Inner> items,
  2: map<string, list<i64>> index,
  3: set<i16> small,
  4: Inner one,
  5: binary blob,
  7: list<list<string>> nested,
  8: byte b,
  9: list<bool> bools,
  10: map<string, string> empty,
  20: bool yes,
  21: bool no,
  300: map<i32, Inner> by_id,
  -1: i64 negative_id,
  1000: list<i32> many,
}
"""


@pytest.fixture(scope="module")
def idl(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    path: Path = tmp_path_factory.mktemp("idl") / "framing_test.thrift"
    path.write_text(IDL)
    return thriftpy2.load(str(path), module_name="framing_test_thrift")


def make_outer(idl: ModuleType, scale: int = 3) -> Any:
    inner = [
        idl.Inner(a=i * 1000 - 5, s="é" * i, flag=bool(i % 2), d=i / 3, color=idl.Color.GREEN)
        for i in range(scale)
    ]
    return idl.Outer(
        items=inner,
        index={f"k{i}": list(range(-i, i * 1000, 97)) for i in range(scale)},
        small={1, -2, 300},
        one=inner[-1] if inner else idl.Inner(),
        blob=bytes(range(256)),
        nested=[["a", "bc"], [], ["x" * 40] * 20],
        b=-7,
        bools=[True, False, True] * 7,
        empty={},
        yes=True,
        no=False,
        by_id={i: inn for i, inn in enumerate(inner)},
        negative_id=-(2**62),
        many=list(range(-50, 50)) * scale,
    )


def write_message(kind: str, obj: Any, seqid: int = 7, name: str = "doIt") -> bytes:
    if kind == "cybinary":
        buf: Any = TCyMemoryBuffer()
        proto: Any = TCyBinaryProtocol(buf)
    else:
        buf = TMemoryBuffer()
        proto = (TBinaryProtocol if kind == "binary" else TCompactProtocol)(buf)
    proto.write_message_begin(name, TMessageType.CALL, seqid)
    proto.write_struct(obj)
    proto.write_message_end()
    if kind == "cybinary":
        buf.flush()
    return buf.getvalue()


PROTO_OF = {"binary": ProtocolId.BINARY, "cybinary": ProtocolId.BINARY, "compact": 2}


def feed_bytewise(decoder: FrameDecoder, data: bytes) -> list[Frame]:
    out: list[Frame] = []
    for i in range(len(data)):
        out += decoder.feed(data[i : i + 1])
    return out


# ------------------------------------------------------------------ whole-frame detection


def test_many_header_frames_in_one_feed() -> None:
    frames = [
        encode_frame(f"payload {i}".encode(), seqid=i, headers={"i": str(i)}) for i in range(1000)
    ]
    decoder = FrameDecoder()
    got = decoder.feed(b"".join(frames) + frames[0][:7])
    assert [f.seqid for f in got] == list(range(1000))
    assert got[999] == Frame(
        TransportType.HEADER, ProtocolId.BINARY, b"payload 999", 999, {"i": "999"}, 0, ()
    )
    assert decoder.buffered == 7
    assert decoder.feed(frames[0][7:])[0].payload == b"payload 0"
    assert decoder.buffered == 0


def test_feed_empty() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"") == []
    assert decoder.feed(bytearray()) == []
    assert decoder.buffered == 0


def _stream_of_every_transport(idl: ModuleType) -> tuple[bytes, list[Frame]]:
    binary = write_message("binary", make_outer(idl), seqid=1)
    compact = write_message("compact", make_outer(idl), seqid=2)
    small = write_message("compact", idl.Inner(a=1), seqid=3)
    pieces = [
        (
            encode_frame(binary, seqid=10, headers={"h": "1"}),
            Frame(TransportType.HEADER, 0, binary, 10, {"h": "1"}, 0, ()),
        ),
        (
            encode_frame(compact, seqid=-11, protocol_id=2, transforms=[1], flags=3),
            Frame(TransportType.HEADER, 2, compact, -11, {}, 3, (1,)),
        ),
        (struct.pack("!I", len(binary)) + binary, Frame(TransportType.FRAMED, 0, binary)),
        (struct.pack("!I", len(compact)) + compact, Frame(TransportType.FRAMED, 2, compact)),
        (binary, Frame(TransportType.UNFRAMED, 0, binary)),
        (compact, Frame(TransportType.UNFRAMED, 2, compact)),
        (small, Frame(TransportType.UNFRAMED, 2, small)),
        (struct.pack("!I", len(small)) + small, Frame(TransportType.FRAMED, 2, small)),
    ]
    return b"".join(p for p, _ in pieces), [f for _, f in pieces]


def test_mixed_transports_on_one_stream(idl: ModuleType) -> None:
    stream, expected = _stream_of_every_transport(idl)
    assert FrameDecoder().feed(stream) == expected


def test_mixed_transports_fed_one_byte_at_a_time(idl: ModuleType) -> None:
    stream, expected = _stream_of_every_transport(idl)
    decoder = FrameDecoder()
    assert feed_bytewise(decoder, stream) == expected
    assert decoder.buffered == 0


@pytest.mark.parametrize(
    "kind",
    [
        "header",
        "header-zlib",
        "framed-binary",
        "framed-compact",
        "unframed-binary",
        "unframed-compact",
        "unframed-cybinary",
    ],
)
def test_split_at_every_byte_boundary(idl: ModuleType, kind: str) -> None:
    proto = "compact" if kind.endswith("compact") else "binary"
    if kind == "unframed-cybinary":
        proto = "cybinary"
    message = write_message(proto, make_outer(idl, 2), seqid=99)
    if kind.startswith("header"):
        transforms = [1] if kind.endswith("zlib") else []
        wire = encode_frame(message, seqid=5, headers={"a": "b"}, transforms=transforms)
    elif kind.startswith("framed"):
        wire = struct.pack("!I", len(message)) + message
    else:
        wire = message
    for cut in range(1, len(wire)):
        decoder = FrameDecoder()
        assert decoder.feed(wire[:cut]) == []
        assert decoder.buffered == cut
        got = decoder.feed(wire[cut:] + wire)
        assert [f.payload for f in got] == [message, message]
        assert decoder.buffered == 0
    decoder = FrameDecoder()
    got = feed_bytewise(decoder, wire * 2)
    assert [f.payload for f in got] == [message, message]


# ----------------------------------------------------------------- unframed scanning


@pytest.mark.parametrize("kind", ["binary", "cybinary", "compact"])
@pytest.mark.parametrize("scale", [0, 1, 5, 40])
def test_unframed_lengths_are_exact(idl: ModuleType, kind: str, scale: int) -> None:
    message = write_message(kind, make_outer(idl, scale))
    proto = PROTO_OF[kind]
    assert unframed_message_length(message, proto, limit=MiB) == len(message)
    assert unframed_message_length(message + b"\x00" * 9, proto, limit=MiB) == len(message)
    assert unframed_message_length(memoryview(message), proto, limit=MiB) == len(message)
    step = max(1, len(message) // 300)
    for cut in range(0, len(message), step):
        assert unframed_message_length(message[:cut], proto, limit=MiB) is None


def test_unframed_compact_written_by_apache() -> None:
    buf = ApacheMemoryBuffer()
    proto = ApacheCompact(buf)
    proto.writeMessageBegin("m" * 300, ApacheMessageType.ONEWAY, 2**31 - 1)
    proto.writeStructBegin("s")
    for fid, ttype in ((1, TType.BOOL), (17, TType.BOOL), (-3, TType.I16), (2000, TType.DOUBLE)):
        proto.writeFieldBegin("f", ttype, fid)
        if ttype == TType.BOOL:
            proto.writeBool(fid == 1)
        elif ttype == TType.I16:
            proto.writeI16(-32768)
        else:
            proto.writeDouble(1.5)
        proto.writeFieldEnd()
    proto.writeFieldBegin("l", TType.LIST, 2001)
    proto.writeListBegin(TType.MAP, 20)
    for i in range(20):
        proto.writeMapBegin(TType.I64, TType.SET, 1 if i else 0)
        if i:
            proto.writeI64(-(2**63))
            proto.writeSetBegin(TType.BOOL, 2)
            proto.writeBool(True)
            proto.writeBool(False)
            proto.writeSetEnd()
        proto.writeMapEnd()
    proto.writeListEnd()
    proto.writeFieldEnd()
    proto.writeFieldStop()
    proto.writeStructEnd()
    proto.writeMessageEnd()
    message = buf.getvalue()
    assert unframed_message_length(message + b"zz", 2, limit=MiB) == len(message)
    for cut in range(len(message)):
        assert unframed_message_length(message[:cut], 2, limit=MiB) is None


def nested_binary(depth: int) -> bytes:
    head = b"\x80\x01\x00\x01" + b"\x00\x00\x00\x01m" + b"\x00\x00\x00\x01"
    return head + b"\x0c\x00\x01" * (depth - 1) + b"\x00" * depth


def nested_compact(depth: int) -> bytes:
    head = b"\x82\x21\x01\x01m"
    return head + b"\x1c" * (depth - 1) + b"\x00" * depth


@pytest.mark.parametrize("nested", [nested_binary, nested_compact])
def test_nesting_deeper_than_max_depth(nested: Any) -> None:
    proto = 0 if nested is nested_binary else 2
    ok = nested(64)
    assert unframed_message_length(ok, proto, limit=MiB) == len(ok)
    deep = nested(65)
    with pytest.raises(FrameError, match="expected nesting of at most 64 levels"):
        unframed_message_length(deep, proto, limit=MiB)
    # the error comes as soon as the depth is reached, not when the message is complete
    with pytest.raises(FrameError, match="at most 10 levels"):
        unframed_message_length(nested(1000)[:200], proto, max_depth=10, limit=MiB)
    with pytest.raises(FrameError, match="at most 64 levels"):
        FrameDecoder().feed(deep)


def test_deeply_nested_lists() -> None:
    # a list<list<list<...>>> in binary: each level is type 15, elem type 15, size 1
    head = b"\x80\x01\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00"
    deep = head + b"\x0f\x00\x01" + b"\x0f\x00\x00\x00\x01" * 200
    with pytest.raises(FrameError, match="nesting"):
        unframed_message_length(deep, 0, limit=MiB)


@pytest.mark.parametrize(
    ("message", "proto", "error"),
    [
        # strict binary, absurd method name / string / list lengths
        (b"\x80\x01\x00\x01\x7f\xff\xff\xff", 0, OversizedFrame),
        (
            b"\x80\x01\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x0b\x00\x01\x7f\xff\xff\xff",
            0,
            OversizedFrame,
        ),
        (
            b"\x80\x01\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x0f\x00\x01\x0c\x7f\xff\xff\xff",
            0,
            OversizedFrame,
        ),
        (
            b"\x80\x01\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x0f\x00\x01\x08\x7f\xff\xff\xff",
            0,
            OversizedFrame,
        ),
        (
            b"\x80\x01\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x0d\x00\x01\x0b\x0b\x7f\xff\xff\xff",
            0,
            OversizedFrame,
        ),
        # compact: varint lengths of 2^31-1
        (b"\x82\x21\x01\xff\xff\xff\xff\x07", 2, OversizedFrame),
        (b"\x82\x21\x01\x00\x18\xff\xff\xff\xff\x07", 2, OversizedFrame),
        (b"\x82\x21\x01\x00\x19\xfc\xff\xff\xff\xff\x07", 2, OversizedFrame),
        (b"\x82\x21\x01\x00\x1b\xff\xff\xff\xff\x07\xcc", 2, OversizedFrame),
    ],
)
def test_absurd_lengths_fail_fast(message: bytes, proto: int, error: type[Exception]) -> None:
    # Refused from the declared length alone: no allocation of it, no loop over it.
    def check() -> None:
        with pytest.raises(error, match="exceeds the limit of 1048576"):
            unframed_message_length(message, proto, limit=MiB)
        decoder = FrameDecoder(max_frame_size=MiB)
        with pytest.raises(OversizedFrame) as info:
            decoder.feed(message)
        assert info.value.transport == TransportType.UNFRAMED
        assert info.value.seqid is None

    finishes_within(0.5, check)


@pytest.mark.parametrize(
    ("message", "proto", "match"),
    [
        (b"\x80\x01\x00\x09\x00\x00\x00\x00", 0, "expected a message type 1..4, found 9"),
        (b"\x80\x01\x00\x01\xff\xff\xff\xff", 0, "non-negative method name length, found -1"),
        (b"\x80\x02\x00\x01\x00\x00\x00\x00", 0, "expected strict binary version 0x8001"),
        (
            b"\x80\x01\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x01",
            0,
            "expected a binary Thrift type id, found 1",
        ),
        (
            b"\x80\x01\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x20\x00\x01",
            0,
            "expected a binary Thrift type id, found 32",
        ),
        (
            b"\x80\x01\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x0b\x00\x01\xff\xff\xff\xfe",
            0,
            "non-negative string length, found -2",
        ),
        (
            b"\x80\x01\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x0f\x00\x01\x08\x80\x00\x00\x00",
            0,
            "non-negative list/set size",
        ),
        (
            b"\x80\x01\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x0f\x00\x01\x63\x00\x00\x00\x01",
            0,
            "type id in a list/set, found 99",
        ),
        (
            b"\x80\x01\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x0d\x00\x01\x0b\x00\x00\x00\x00\x01",
            0,
            "type id in a map, found 0",
        ),
        (b"\x82\x22", 2, "expected compact protocol version 1, found 2"),
        (b"\x82\x01", 2, "expected a message type 1..4, found 0"),
        (b"\x82\x21\xff\xff\xff\xff\xff\xff", 2, "varint of at most 5 bytes"),
        (b"\x82\x21\x01\x00\x1e\x00", 2, "expected a compact Thrift type id, found 14"),
        (b"\x82\x21\x01\x00\x14\xff\xff\xff\x01", 2, "varint of at most 3 bytes"),
        (b"\x82\x21\x01\x00\x19\x10\x00", 2, "type id in a list/set, found 0"),
        (b"\x82\x21\x01\x00\x01\xff\xff\xff\x01", 2, "varint of at most 3 bytes"),
    ],
)
def test_malformed_unframed(message: bytes, proto: int, match: str) -> None:
    with pytest.raises(FrameError, match=match):
        unframed_message_length(message, proto, limit=MiB)
    detected = message[:2] == b"\x80\x01" or message[0] == 0x82
    with pytest.raises(FrameError, match=match if detected else "expected a positive frame"):
        FrameDecoder().feed(message)


def test_unknown_protocol_for_scanner() -> None:
    with pytest.raises(FrameError, match="found 1"):
        unframed_message_length(b"\x80\x01", 1, limit=MiB)


def test_unframed_message_over_the_frame_limit(idl: ModuleType) -> None:
    message = write_message("binary", make_outer(idl, 40))
    assert len(message) > 4096
    decoder = FrameDecoder(max_frame_size=4096)
    with pytest.raises(OversizedFrame, match="exceeds the limit of 4096"):
        for i in range(0, len(message), 100):
            decoder.feed(message[i : i + 100])
    assert decoder.buffered <= 4096 + 100


def test_trickled_big_unframed_message_is_not_quadratic() -> None:
    # a compact list of 200k i32 varints (about 600 KB) plus a 1 MB string, 64 bytes a feed
    buf = ApacheMemoryBuffer()
    proto = ApacheCompact(buf)
    proto.writeMessageBegin("m", ApacheMessageType.CALL, 1)
    proto.writeStructBegin("s")
    proto.writeFieldBegin("l", TType.LIST, 1)
    proto.writeListBegin(TType.I32, 200_000)
    for i in range(200_000):
        proto.writeI32(i * 7919)
    proto.writeListEnd()
    proto.writeFieldEnd()
    proto.writeFieldBegin("s", TType.STRING, 2)
    proto.writeBinary(b"x" * MiB)
    proto.writeFieldEnd()
    proto.writeFieldStop()
    proto.writeStructEnd()
    proto.writeMessageEnd()
    message = buf.getvalue()
    decoder = FrameDecoder()

    def feed_in_chunks() -> list[Frame]:
        got: list[Frame] = []
        for i in range(0, len(message), 64):
            got += decoder.feed(message[i : i + 64])
        return got

    # Rescanning from the start on every chunk (quadratic) would not finish in time.
    got = finishes_within(10, feed_in_chunks)
    assert [f.payload for f in got] == [message]


# ------------------------------------------------------------------ errors and limits


def test_oversized_header_frame_reports_its_seqid() -> None:
    frame = encode_frame(b"x" * 2000, seqid=-42, headers={"a": "b"})
    decoder = FrameDecoder(max_frame_size=1000)
    with pytest.raises(
        OversizedFrame, match=f"frame of {len(frame) - 4} bytes exceeds the limit of 1000"
    ) as info:
        decoder.feed(frame[:14])
    assert info.value.seqid == -42
    assert info.value.transport == TransportType.HEADER
    assert info.value.size == len(frame) - 4
    assert info.value.limit == 1000
    # the decoder is dead from now on
    with pytest.raises(OversizedFrame):
        decoder.feed(frame[14:])


def test_oversized_is_raised_as_soon_as_the_length_arrives() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"\x01\x00") == []
    with pytest.raises(OversizedFrame, match="frame of 16777217 bytes exceeds the limit") as info:
        decoder.feed(b"\x00\x01")
    assert info.value.seqid is None
    assert info.value.transport is None
    with pytest.raises(OversizedFrame) as info:
        FrameDecoder(max_frame_size=10).feed(b"\x00\x00\x00\x20\x80\x01")
    assert info.value.transport == TransportType.FRAMED
    assert info.value.seqid is None


def test_max_frame_size_is_inclusive() -> None:
    message = b"\x80\x01\x00\x01\x00\x00\x00\x00\x00\x00\x00\x01\x00"
    framed = struct.pack("!I", len(message)) + message
    assert FrameDecoder(max_frame_size=len(message)).feed(framed)[0].payload == message
    with pytest.raises(OversizedFrame):
        FrameDecoder(max_frame_size=len(message) - 1).feed(framed)
    assert FrameDecoder(max_frame_size=len(message)).feed(message)[0].payload == message
    with pytest.raises(OversizedFrame):
        FrameDecoder(max_frame_size=len(message) - 1).feed(message)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x00\x00\x00\x00", "expected a positive frame length, found 0"),
        (
            b"\x00\x00\x00\x10GARBAGE",
            "expected THeader, framed or unframed Thrift binary/compact, found bytes 0x47",
        ),
        (b"\x00\x00\x00\x10\x0f\xfe", "found bytes 0x0ffe"),
        (b"\x00\x00\x00\x10\x80\x02", "found bytes 0x8002"),
        (b"\x00\x00\x00\x01\x0f", "found bytes 0x0f"),
        (b"\x00\x00\x00\x10\x41", "found bytes 0x41"),
        (
            b"\xff\xff\xff\xff",
            "expected a positive frame length or an unframed Thrift message, found bytes 0xff",
        ),
        (b"\x80\x02", "found bytes 0x8002"),
    ],
)
def test_garbage(data: bytes, match: str) -> None:
    with pytest.raises(FrameError, match=match):
        FrameDecoder().feed(data)
    decoder = FrameDecoder()
    with pytest.raises(FrameError, match=match):
        feed_bytewise(decoder, data)


def test_http_request_is_garbage_not_a_huge_frame() -> None:
    with pytest.raises(FrameError, match="found bytes 0x2f204854 after a frame length") as info:
        FrameDecoder().feed(b"GET / HTTP/1.1\r\n")
    assert not isinstance(info.value, OversizedFrame)
    # byte by byte, the length prefix "GET " alone is already over the limit
    with pytest.raises(OversizedFrame, match="frame of 1195725856 bytes"):
        feed_bytewise(FrameDecoder(), b"GET / HTTP/1.1\r\n")


def test_garbage_after_good_frames() -> None:
    decoder = FrameDecoder()
    good = encode_frame(b"x", seqid=1)
    assert len(decoder.feed(good)) == 1
    with pytest.raises(FrameError):
        decoder.feed(good + b"\x00\x00\x00\x00")
    with pytest.raises(FrameError):
        decoder.feed(good)


def _header_frame(block: bytes, payload: bytes = b"", seqid: int = 3) -> bytes:
    block += b"\x00" * (-len(block) % 4)
    body = struct.pack("!HHiH", 0x0FFF, 0, seqid, len(block) // 4) + block + payload
    return struct.pack("!I", len(body)) + body


@pytest.mark.parametrize(
    ("wire", "limits", "match"),
    [
        (
            _header_frame(b"\x00\x00")[:-4] + b"\x00\x09\x00\x00",
            HeaderLimits(),
            "expected at most 2 transform ids in the header block",
        ),
        (
            encode_frame(b"", seqid=1, headers={str(i): "" for i in range(5)}),
            HeaderLimits(max_headers=4),
            "expected at most 4 headers, found 5",
        ),
        (
            encode_frame(b"", seqid=1, headers={"k": "v" * 100}),
            HeaderLimits(max_header_bytes=64),
            "expected a header block of at most 64 bytes",
        ),
        (_header_frame(b"\x03\x00"), HeaderLimits(), "unknown protocol id.*found 3"),
        (_header_frame(b"\x00\x01\x02"), HeaderLimits(), "unsupported transform.*HMAC"),
        (_header_frame(b"\x00\x01\x03"), HeaderLimits(), "unsupported transform.*SNAPPY"),
        (
            _header_frame(b"\xff\xff\xff\xff\xff\xff\x00"),
            HeaderLimits(),
            "varint protocol id of at most 5 bytes",
        ),
        (
            _header_frame(b"\x00\x00\x01\x01\x01\xff\x00"),
            HeaderLimits(),
            "expected a utf-8 header key",
        ),
        (_header_frame(b"\x00\x00\x01\x01\x20a"), HeaderLimits(), "header key of 32 bytes"),
    ],
)
def test_bad_header_frames(wire: bytes, limits: HeaderLimits, match: str) -> None:
    """A refused header block fails that frame only: the decoder puts it in ``rejected``
    (with its seq id, for the answer) and goes on with the next frame."""
    decoder = FrameDecoder(header_limits=limits)
    frames = decoder.feed(wire + encode_frame(b"next", seqid=2))
    assert [f.payload for f in frames] == [b"next"]
    [refused] = decoder.rejected
    assert re.search(match, refused.message)
    assert refused.seqid == struct.unpack_from("!i", wire, 8)[0]


def test_truncated_header_block() -> None:
    # header size says 8 words but the frame is only 14 bytes long
    body = struct.pack("!HHiH", 0x0FFF, 0, 1, 8) + b"\x00\x00\x00\x00"
    decoder = FrameDecoder()
    assert decoder.feed(struct.pack("!I", len(body)) + body) == []
    [refused] = decoder.rejected
    assert refused.message.startswith("expected a header block of 32 bytes, found only 4")
    assert refused.seqid == 1
    # a THeader frame too short for its fixed fields: refused, with no seq id to answer
    decoder = FrameDecoder()
    assert decoder.feed(b"\x00\x00\x00\x04\x0f\xff\x00\x00") == []
    [refused] = decoder.rejected
    assert "at least 10 bytes" in refused.message and refused.seqid is None


def test_zlib_bomb_through_the_decoder() -> None:
    comp = zlib.compressobj(9)
    chunk = bytes(MiB)
    bomb = b"".join([comp.compress(chunk) for _ in range(100)] + [comp.flush()])
    wire = _header_frame(b"\x00\x01\x01", bomb)
    decoder = FrameDecoder()
    assert decoder.feed(wire) == []
    [refused] = decoder.rejected
    assert "decompressed payload of at most 16777216 bytes" in refused.message


# ------------------------------------------------------------------------ encode_like


@pytest.mark.parametrize("transport", list(TransportType))
@pytest.mark.parametrize("proto", ["binary", "compact"])
def test_encode_like_round_trips(idl: ModuleType, transport: TransportType, proto: str) -> None:
    message = write_message(proto, make_outer(idl, 2), seqid=4)
    pid = PROTO_OF[proto]
    wire = encode_like(
        transport, pid, message, seqid=4, headers={"x": "y"}, transforms=[TransformId.ZLIB]
    )
    (frame,) = FrameDecoder().feed(wire)
    assert frame.transport == transport
    assert frame.protocol_id == pid
    assert frame.payload == message
    if transport == TransportType.HEADER:
        assert (frame.seqid, frame.headers, frame.transforms) == (4, {"x": "y"}, (1,))
    else:
        assert (frame.seqid, frame.headers, frame.transforms) == (None, {}, ())


# ------------------------------------------------------------------------ property test


_text = st.text(max_size=30)
_frames = st.lists(
    st.tuples(
        st.binary(max_size=300),
        st.dictionaries(_text, _text, max_size=6),
        st.integers(-(2**31), 2**31 - 1),
        st.booleans(),
        st.sampled_from([0, 2]),
        st.integers(0, 0xFFFF),
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=_frames, data=st.data())
def test_property_round_trip_with_random_splits(frames: list[Any], data: Any) -> None:
    wire = b"".join(
        encode_frame(
            payload,
            seqid=seqid,
            headers=headers,
            protocol_id=pid,
            transforms=[1] if compress else [],
            flags=flags,
        )
        for payload, headers, seqid, compress, pid, flags in frames
    )
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=12)))
    decoder = FrameDecoder()
    got: list[Frame] = []
    last = 0
    for cut in [*cuts, len(wire)]:
        got += decoder.feed(wire[last:cut])
        last = cut
    assert decoder.buffered == 0
    assert got == [
        Frame(
            TransportType.HEADER,
            pid,
            payload,
            seqid,
            headers,
            flags,
            (1,) if compress else (),
        )
        for payload, headers, seqid, compress, pid, flags in frames
    ]
