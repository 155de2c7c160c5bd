"""Bad input on the wire: the server answers or closes one connection, and keeps serving.

Requests are written on raw sockets. Well-formed frames are built with Apache Thrift's own
``THeaderProtocol`` (over a memory buffer) and replies are parsed with it, so the checks do
not rely on meshkit's encoder or decoder; broken frames are built by hand.

Two families of bad input:

* the byte stream can no longer be followed (garbage, bad frame length, oversized frame):
  the server answers first when it can, reads nothing more, lets the calls already running
  answer, and closes that connection;
* the frame's bounds are known but its header block is refused (bad transform or protocol
  id, too many or too big headers, undecompressable payload), or the frame is fine but the
  message is not (garbled payload, unknown method, wrong types, failing handler, spent
  deadline): the server answers a ``TApplicationException`` for that seq id and the same
  connection keeps working.

After every bad input a fresh meshkit client still gets answers. The last part turns the
tables: a meshkit client against fake servers that misbehave.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import thriftpy2
from thrift.protocol.THeaderProtocol import THeaderProtocol
from thrift.Thrift import TApplicationException, TMessageType, TType
from thrift.transport.THeaderTransport import THeaderClientType, THeaderSubprotocolID
from thrift.transport.TTransport import TMemoryBuffer

from meshkit import (
    Client,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    MeshkitError,
    StatusCode,
    Unavailable,
)
from meshkit.rpc.context import CANCEL_KEY, STATUS_KEY, TIMEOUT_KEY
from meshkit.rpc.theader import HeaderLimits

ECHO_IDL = Path(__file__).resolve().parents[2] / "examples" / "echo" / "echo.thrift"
# thriftpy2 caches modules by name: this is the module the conftest servers use
echo_thrift = thriftpy2.load(str(ECHO_IDL), module_name="rpc_interop_echo_thrift")
RunningServer = Any  # fixture value, see conftest.py

SECRET = "s3cr3t-db-password-in-exception-text"  # what conftest's EchoImpl leaks if it can
MiB = 1024 * 1024
TIMEOUT_APP_EXC = 12  # fbthrift's TApplicationException TIMEOUT, used by meshkit

ALL_CLIENT_TYPES = (
    THeaderClientType.HEADERS,
    THeaderClientType.FRAMED_BINARY,
    THeaderClientType.UNFRAMED_BINARY,
    THeaderClientType.FRAMED_COMPACT,
    THeaderClientType.UNFRAMED_COMPACT,
)

# ------------------------------------------------------------------- wire helpers

FieldWriter = Callable[[Any], None]


def string_field(value: str, fid: int = 1) -> FieldWriter:
    def write(proto: Any) -> None:
        proto.writeFieldBegin("message", TType.STRING, fid)
        proto.writeString(value)
        proto.writeFieldEnd()

    return write


def i32_field(value: int, fid: int = 1) -> FieldWriter:
    def write(proto: Any) -> None:
        proto.writeFieldBegin("delay_ms", TType.I32, fid)
        proto.writeI32(value)
        proto.writeFieldEnd()

    return write


def message(
    method: str,
    *fields: FieldWriter,
    seqid: int = 1,
    mtype: int = TMessageType.CALL,
    protocol: str = "binary",
    headers: dict[str, str] | None = None,
    transport: str = "header",
) -> bytes:
    """One request built by Apache Thrift: a THeader frame (default) or a framed message."""
    buf = TMemoryBuffer()
    if transport == "header":
        proto: Any = THeaderProtocol(
            buf,
            (THeaderClientType.HEADERS,),
            default_protocol=THeaderSubprotocolID.COMPACT
            if protocol == "compact"
            else THeaderSubprotocolID.BINARY,
        )
        for key, value in (headers or {}).items():
            proto.set_header(key.encode(), value.encode())
    else:
        from thrift.protocol.TBinaryProtocol import TBinaryProtocol

        proto = TBinaryProtocol(buf)
    proto.writeMessageBegin(method, mtype, seqid)
    proto.writeStructBegin(f"{method}_args")
    for write in fields:
        write(proto)
    proto.writeFieldStop()
    proto.writeStructEnd()
    proto.writeMessageEnd()
    proto.trans.flush()
    body = buf.getvalue()
    if transport == "framed":
        return struct.pack("!I", len(body)) + body
    return body


def payload_of(frame: bytes) -> bytes:
    """The Thrift message inside a THeader frame built by :func:`message` (no transforms)."""
    (words,) = struct.unpack_from("!H", frame, 12)
    return frame[14 + words * 4 :]


def _layered(payload: bytes, layers: int) -> bytes:
    """``payload`` zlib-compressed ``layers`` times with stored blocks (output ≈ input)."""
    for _ in range(layers):
        payload = zlib.compress(payload, 0)
    return payload


def header_frame(
    payload: bytes, *, seqid: int = 1, block: bytes = b"\x00\x00", words: int | None = None
) -> bytes:
    """A hand-made THeader frame: ``block`` is the raw header block (padded to 4 bytes)."""
    block += b"\x00" * (-len(block) % 4)
    if words is None:
        words = len(block) // 4
    rest = struct.pack("!HHiH", 0x0FFF, 0, seqid, words) + block + payload
    return struct.pack("!I", len(rest)) + rest


def varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def kv_block(headers: list[tuple[bytes, bytes]], *, protocol: int = 0) -> bytes:
    block = bytearray((protocol, 0, 1))
    block += varint(len(headers))
    for key, value in headers:
        block += varint(len(key)) + key + varint(len(value)) + value
    return bytes(block)


def zlib_bomb(size: int) -> bytes:
    """zlib data that inflates to ``size`` zero bytes, built without allocating ``size``."""
    comp = zlib.compressobj(9)
    chunk = bytes(MiB)
    parts = [comp.compress(chunk) for _ in range(size // MiB)]
    parts.append(comp.flush())
    return b"".join(parts)


@dataclass
class Reply:
    name: str
    mtype: int
    seqid: int
    frame_seqid: int
    headers: dict[str, str]
    exc: TApplicationException | None
    success: Any = None
    error: Any = None


def parse_reply(data: bytes) -> Reply:
    """Parse one reply (any transport) with Apache Thrift."""
    proto = THeaderProtocol(TMemoryBuffer(data), ALL_CLIENT_TYPES)
    name, mtype, seqid = proto.readMessageBegin()
    reply = Reply(
        name=name.decode() if isinstance(name, bytes) else name,
        mtype=mtype,
        seqid=seqid,
        frame_seqid=proto.trans.sequence_id,
        headers={k.decode(): v.decode() for k, v in proto.get_headers().items()},
        exc=None,
    )
    if mtype == TMessageType.EXCEPTION:
        reply.exc = TApplicationException()
        reply.exc.read(proto)
        return reply
    # a result struct: field 0 success (string or i32), field 1 error (EchoError)
    proto.readStructBegin()
    while True:
        _, ftype, fid = proto.readFieldBegin()
        if ftype == TType.STOP:
            break
        if fid == 0 and ftype == TType.STRING:
            reply.success = proto.readString()
        elif fid == 0 and ftype == TType.I32:
            reply.success = proto.readI32()
        elif fid == 1 and ftype == TType.STRUCT:  # EchoError {1: string reason}
            proto.readStructBegin()
            while True:
                _, etype, eid = proto.readFieldBegin()
                if etype == TType.STOP:
                    break
                if eid == 1 and etype == TType.STRING:
                    reply.error = proto.readString()
                else:
                    proto.skip(etype)
                proto.readFieldEnd()
            proto.readStructEnd()
        else:
            proto.skip(ftype)
        proto.readFieldEnd()
    proto.readStructEnd()
    return reply


async def read_frame(reader: asyncio.StreamReader, timeout: float = 10.0) -> bytes:
    """One length-prefixed reply (THeader or framed)."""
    head = await asyncio.wait_for(reader.readexactly(4), timeout)
    (size,) = struct.unpack("!I", head)
    return head + await asyncio.wait_for(reader.readexactly(size), timeout)


async def read_until_closed(reader: asyncio.StreamReader, timeout: float = 10.0) -> bytes:
    """Everything the server sends until it closes; fails the test if it never closes."""
    chunks: list[bytes] = []
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), timeout)
            if not chunk:
                break
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


@pytest.fixture
async def connect() -> AsyncIterator[
    Callable[[int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]
]:
    writers: list[asyncio.StreamWriter] = []

    async def open_(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writers.append(writer)
        return reader, writer

    yield open_
    for writer in writers:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@pytest.fixture
def assert_serving(make_client: Callable[..., Client]) -> Callable[[Any], Awaitable[None]]:
    """A fresh meshkit client (fresh connection) still gets correct answers."""

    async def check(running: Any) -> None:
        assert running.server.serving
        client = make_client(running.addr, timeout=5.0)
        assert await client.echo("still serving") == "still serving"
        with pytest.raises(echo_thrift.EchoError):
            await client.reverse("")

    return check


async def exchange(
    writer: asyncio.StreamWriter, reader: asyncio.StreamReader, data: bytes
) -> Reply:
    writer.write(data)
    await writer.drain()
    return parse_reply(await read_frame(reader))


async def assert_connection_works(
    writer: asyncio.StreamWriter, reader: asyncio.StreamReader, *, transport: str = "header"
) -> None:
    reply = await exchange(
        writer, reader, message("echo", string_field("same conn"), seqid=99, transport=transport)
    )
    assert reply.mtype == TMessageType.REPLY
    assert reply.success == "same conn"
    assert reply.seqid == 99


async def wait_for_connections(running: Any, count: int) -> None:
    async def poll() -> None:
        while len(running.server.connections) != count:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), 10)


def assert_exception_reply_or_nothing(data: bytes, seqid: int) -> None:
    """What arrived before a close: nothing, or one TApplicationException for ``seqid``."""
    if not data:
        return
    reply = parse_reply(data)
    assert reply.mtype == TMessageType.EXCEPTION
    assert reply.frame_seqid == seqid


# -------------------------------------------------- streams that cannot be followed


GARBAGE = {
    "http-request": b"GET / HTTP/1.1\r\nHost: example\r\n\r\n",
    "high-bit-bytes": bytes(range(255, 127, -1)),
    "length-then-junk": struct.pack("!I", 16) + b"\xde\xad\xbe\xef" * 4,
    "tls-client-hello": bytes.fromhex("16030100c4010000c00303") + bytes(32),
    "binary-version-2": b"\x80\x02\x00\x01" + b"\x00" * 20,
}


@pytest.mark.parametrize("data", list(GARBAGE.values()), ids=list(GARBAGE))
async def test_garbage_closes_only_that_connection(
    echo_server: RunningServer, connect: Any, assert_serving: Any, data: bytes
) -> None:
    bystander_reader, bystander_writer = await connect(echo_server.port)
    reader, writer = await connect(echo_server.port)
    writer.write(data)
    assert await read_until_closed(reader) == b""
    # another connection opened before is untouched, and new ones are served
    await assert_connection_works(bystander_writer, bystander_reader)
    await assert_serving(echo_server)
    assert echo_server.impl.calls == ["echo:same conn", "echo:still serving", "reverse:"]


async def test_zero_length_frame_closes(
    echo_server: RunningServer, connect: Any, assert_serving: Any
) -> None:
    reader, writer = await connect(echo_server.port)
    writer.write(b"\x00\x00\x00\x00")
    assert await read_until_closed(reader) == b""
    await assert_serving(echo_server)


@pytest.mark.parametrize("seqid", [1, 0x7FFFFFFF, -5])
async def test_oversized_theader_frame_answered_for_its_seqid_then_closed(
    start_server: Any, connect: Any, assert_serving: Any, seqid: int
) -> None:
    running = await start_server(max_frame_size=1024)
    reader, writer = await connect(running.port)
    # only the 4-byte length and the 10 fixed THeader bytes of a 4 KiB frame
    writer.write(struct.pack("!IHHiH", 4096, 0x0FFF, 0, seqid, 1))
    data = await read_until_closed(reader)
    reply = parse_reply(data)
    assert reply.mtype == TMessageType.EXCEPTION
    assert reply.frame_seqid == seqid
    assert reply.seqid == seqid
    assert reply.exc is not None
    assert reply.exc.type == TApplicationException.PROTOCOL_ERROR
    assert "1024" in reply.exc.message
    assert reply.headers[STATUS_KEY] == StatusCode.INVALID_ARGUMENT.value
    assert running.impl.calls == []
    await assert_serving(running)


async def test_twenty_mib_theader_frame_to_default_server(
    echo_server: RunningServer, connect: Any, assert_serving: Any
) -> None:
    """A 20 MiB frame to the default 16 MiB limit: refused from its first bytes."""
    reader, writer = await connect(echo_server.port)
    # Apache's own client refuses to send such a frame: write its beginning by hand
    call = payload_of(message("echo", string_field("x" * 4000), seqid=42))
    writer.write(struct.pack("!IHHiH", 20 * MiB, 0x0FFF, 0, 42, 1) + b"\x00" * 4 + call)
    data = await read_until_closed(reader)
    reply = parse_reply(data)
    assert reply.frame_seqid == 42
    assert reply.exc is not None
    assert reply.exc.type == TApplicationException.PROTOCOL_ERROR
    assert str(16 * MiB) in reply.exc.message
    assert echo_server.impl.calls == []
    await assert_serving(echo_server)


async def test_twenty_mib_call_from_meshkit_client(
    echo_server: RunningServer, make_client: Callable[..., Client], assert_serving: Any
) -> None:
    client = make_client(echo_server.addr, timeout=30.0)
    with pytest.raises(MeshkitError) as info:
        await asyncio.wait_for(client.echo("x" * (20 * MiB)), 20)
    assert info.value.code in (StatusCode.INVALID_ARGUMENT, StatusCode.UNAVAILABLE)
    assert echo_server.impl.calls == []
    await assert_serving(echo_server)


async def test_client_next_call_after_oversized_rejection_succeeds(
    echo_server: RunningServer, make_client: Callable[..., Client]
) -> None:
    client = make_client(echo_server.addr, timeout=30.0)
    with pytest.raises(InvalidArgument):
        await client.echo("x" * (20 * MiB))
    assert await client.echo("next") == "next"


async def test_oversized_framed_message_closes(
    start_server: Any, connect: Any, assert_serving: Any
) -> None:
    running = await start_server(max_frame_size=1024)
    reader, writer = await connect(running.port)
    writer.write(message("echo", string_field("y" * 4000), transport="framed"))
    assert await read_until_closed(reader) == b""
    await assert_serving(running)


ABSURD_UNFRAMED = {
    # strict binary: CALL "echo" seqid 1, field 1 string of 2 GiB - 16 bytes
    "binary-huge-string": b"\x80\x01\x00\x01\x00\x00\x00\x04echo\x00\x00\x00\x01"
    + b"\x0b\x00\x01\x7f\xff\xff\xf0abc",
    "binary-negative-string": b"\x80\x01\x00\x01\x00\x00\x00\x04echo\x00\x00\x00\x01"
    + b"\x0b\x00\x01\xff\xff\xff\xffabc",
    "binary-huge-name": b"\x80\x01\x00\x01\x7f\xff\xff\xffecho",
    "binary-huge-list": b"\x80\x01\x00\x01\x00\x00\x00\x04echo\x00\x00\x00\x01"
    + b"\x0f\x00\x01\x0b\x7f\xff\xff\xff",
    # compact: CALL seqid 1 "echo", field 1 (delta) binary with a 2 GiB varint length
    "compact-huge-string": b"\x82\x21\x01\x04echo\x18\xff\xff\xff\xff\x07abc",
    "binary-deep-nesting": b"\x80\x01\x00\x01\x00\x00\x00\x04echo\x00\x00\x00\x01"
    + b"\x0c\x00\x01" * 200,
}


@pytest.mark.parametrize("data", list(ABSURD_UNFRAMED.values()), ids=list(ABSURD_UNFRAMED))
async def test_unframed_message_with_absurd_sizes_closes(
    echo_server: RunningServer, connect: Any, assert_serving: Any, data: bytes
) -> None:
    reader, writer = await connect(echo_server.port)
    writer.write(data)
    assert_exception_reply_or_nothing(await read_until_closed(reader), seqid=0)
    assert echo_server.impl.calls == []
    await assert_serving(echo_server)


async def test_frame_trickling_in_is_served(echo_server: RunningServer, connect: Any) -> None:
    """A frame that arrives in pieces is waited for, not refused."""
    reader, writer = await connect(echo_server.port)
    frame = message("echo", string_field("slowly"), seqid=5)
    for i in range(0, len(frame), 7):
        writer.write(frame[i : i + 7])
        await writer.drain()
        await asyncio.sleep(0.01)
    reply = parse_reply(await read_frame(reader))
    assert reply.success == "slowly"
    assert reply.frame_seqid == 5


@pytest.mark.parametrize("cut", [3, 14, 30, -1])
async def test_client_closing_mid_frame_leaves_server_healthy(
    echo_server: RunningServer, connect: Any, assert_serving: Any, cut: int
) -> None:
    _reader, writer = await connect(echo_server.port)
    await wait_for_connections(echo_server, 1)
    writer.write(message("echo", string_field("never finished"))[:cut])
    await writer.drain()
    await asyncio.sleep(0.05)
    assert len(echo_server.server.connections) == 1  # still waiting for the rest
    writer.close()
    await writer.wait_closed()
    await wait_for_connections(echo_server, 0)
    assert echo_server.impl.calls == []
    await assert_serving(echo_server)


def _bad_header_frames() -> dict[str, Callable[[], bytes]]:
    """Builders (some frames are costly to build) of frames with a refused header block."""
    call = payload_of(message("echo", string_field("hi"), seqid=7))
    big_value = b"v" * (70 * 1024)
    frames: dict[str, Callable[[], bytes]] = {
        "unknown-transform": lambda: header_frame(call, seqid=7, block=b"\x00\x01\x05"),
        "snappy-transform": lambda: header_frame(call, seqid=7, block=b"\x00\x01\x03"),
        "hmac-transform": lambda: header_frame(call, seqid=7, block=b"\x00\x01\x02"),
        "json-protocol-id": lambda: header_frame(call, seqid=7, block=b"\x01\x00"),
        "protocol-id-99": lambda: header_frame(call, seqid=7, block=b"\x63\x00"),
        "overlong-varint": lambda: header_frame(
            call, seqid=7, block=b"\x80\x80\x80\x80\x80\x80\x00"
        ),
        "too-many-headers": lambda: header_frame(
            call, seqid=7, block=kv_block([(b"k%d" % i, b"v") for i in range(200)])
        ),
        "header-block-too-big": lambda: header_frame(
            call, seqid=7, block=kv_block([(b"k", big_value)])
        ),
        "header-size-beyond-frame": lambda: header_frame(call, seqid=7, words=200),
        "header-value-past-block": lambda: header_frame(
            call, seqid=7, block=b"\x00\x00\x01\x01\x01k\x7f"
        ),
        "invalid-utf8-header": lambda: header_frame(
            call, seqid=7, block=kv_block([(b"\xff\xfe", b"v")])
        ),
        "corrupt-zlib": lambda: header_frame(
            b"\x78\x9c" + b"\xff" * 40, seqid=7, block=b"\x00\x01\x01"
        ),
        "truncated-zlib": lambda: header_frame(
            zlib.compress(call)[:-6], seqid=7, block=b"\x00\x01\x01"
        ),
        "zlib-bomb-64MiB": lambda: header_frame(
            zlib_bomb(64 * MiB), seqid=7, block=b"\x00\x01\x01"
        ),
        # zlib twice: the outer layer is small, the inner one inflates to 64 MiB
        "nested-zlib-bomb": lambda: header_frame(
            zlib.compress(zlib_bomb(64 * MiB)), seqid=7, block=b"\x00\x02\x01\x01"
        ),
        # 20 stored zlib layers of a 1 MiB call: each layer fits the limit, together they
        # are 20 MiB of inflating (1000 such layers kept the event loop busy for seconds)
        "zlib-layers-over-one-budget": lambda: header_frame(
            _layered(payload_of(message("echo", string_field("x" * MiB), seqid=7)), 20),
            seqid=7,
            block=b"\x00\x14" + b"\x01" * 20,
        ),
    }
    return frames


BAD_HEADER_FRAMES = _bad_header_frames()


@pytest.mark.parametrize("case", list(BAD_HEADER_FRAMES))
async def test_bad_theader_header_block_is_refused_and_the_connection_goes_on(
    echo_server: RunningServer, connect: Any, case: str
) -> None:
    """The frame's bounds and seq id are known: that call is answered with its error, the
    call sent right behind it in the same write is served, and the connection goes on."""
    reader, writer = await connect(echo_server.port)
    behind = message("echo", string_field("behind"), seqid=8)
    writer.write(BAD_HEADER_FRAMES[case]() + behind)
    await writer.drain()
    replies = {r.frame_seqid: r for r in [parse_reply(await read_frame(reader)) for _ in "ab"]}
    assert replies[7].mtype == TMessageType.EXCEPTION
    assert replies[7].headers[STATUS_KEY] == StatusCode.INVALID_ARGUMENT.value
    assert "[INVALID_ARGUMENT] [INVALID_ARGUMENT]" not in replies[7].exc.message
    assert replies[8].success == "behind"
    assert echo_server.impl.calls == ["echo:behind"]
    await assert_connection_works(writer, reader)


async def test_header_limits_are_configurable(start_server: Any, connect: Any) -> None:
    running = await start_server(
        header_limits=HeaderLimits(max_headers=4, max_header_bytes=256, max_payload=64 * 1024)
    )
    ok = message("echo", string_field("ok"), headers={f"h{i}": "v" for i in range(4)})
    cases = [
        message("echo", string_field("x"), headers={f"h{i}": "v" for i in range(5)}),
        message("echo", string_field("x"), headers={"big": "v" * 300}),
        message("echo", string_field("x" * (65 * 1024))),
        header_frame(zlib_bomb(MiB), block=b"\x00\x01\x01"),
    ]
    reader, writer = await connect(running.port)
    for frame in cases:
        assert (await exchange(writer, reader, ok)).success == "ok"
        refused = await exchange(writer, reader, frame)
        assert refused.mtype == TMessageType.EXCEPTION and refused.frame_seqid == 1
    assert (await exchange(writer, reader, ok)).success == "ok"
    assert running.impl.calls == ["echo:ok"] * (len(cases) + 1)


# -------------------------------------------- bad messages in good frames: recoverable


def _garbled_payloads() -> dict[str, tuple[bytes, int]]:
    """Frames (and the seq id expected in the reply) whose Thrift message is broken."""
    good = message("echo", string_field("hello"), seqid=11)
    call = payload_of(good)
    compact_call = payload_of(message("echo", string_field("hello"), protocol="compact"))
    at = call.rindex(b"\x0b\x00\x01")  # the string field's header: make its type 0x1f
    bad_type = call[:at] + b"\x1f" + call[at + 1 :]
    return {
        "truncated-message": (header_frame(call[:-6], seqid=11), 11),
        "random-bytes": (header_frame(bytes(range(1, 60)), seqid=11), 11),
        "binary-payload-declared-compact": (header_frame(call, seqid=11, block=b"\x02\x00"), 11),
        "compact-payload-declared-binary": (header_frame(compact_call, seqid=11), 11),
        "unknown-field-type": (header_frame(bad_type, seqid=11), 11),
        "reply-instead-of-call": (
            message("echo", string_field("hello"), seqid=11, mtype=TMessageType.REPLY),
            11,
        ),
        "empty-payload": (header_frame(b"", seqid=11), 11),
    }


GARBLED = _garbled_payloads()


@pytest.mark.parametrize("case", list(GARBLED))
async def test_garbled_message_in_theader_frame_gets_protocol_error(
    echo_server: RunningServer, connect: Any, assert_serving: Any, case: str
) -> None:
    frame, seqid = GARBLED[case]
    reader, writer = await connect(echo_server.port)
    reply = await exchange(writer, reader, frame)
    assert reply.mtype == TMessageType.EXCEPTION
    assert reply.frame_seqid == seqid
    assert reply.exc is not None
    assert reply.exc.type == TApplicationException.PROTOCOL_ERROR
    assert reply.headers[STATUS_KEY] == StatusCode.INVALID_ARGUMENT.value
    assert echo_server.impl.calls == []
    await assert_connection_works(writer, reader)
    await assert_serving(echo_server)


async def test_garbled_framed_message_gets_protocol_error(
    echo_server: RunningServer, connect: Any
) -> None:
    good = message("echo", string_field("hello"), transport="framed")
    truncated = good[4:-5]
    reader, writer = await connect(echo_server.port)
    reply = await exchange(writer, reader, struct.pack("!I", len(truncated)) + truncated)
    assert reply.mtype == TMessageType.EXCEPTION
    assert reply.exc is not None
    assert reply.exc.type == TApplicationException.PROTOCOL_ERROR
    await assert_connection_works(writer, reader, transport="framed")


async def test_stray_cancel_frames_are_ignored_and_empty_frames_refused(
    echo_server: RunningServer, connect: Any
) -> None:
    """Cancels for no call in flight do nothing; an empty frame that is no cancel is an error."""
    cancel = kv_block([(CANCEL_KEY.encode(), b"1")])
    reader, writer = await connect(echo_server.port)
    for seqid in (0, 12345, -1):
        writer.write(header_frame(b"", seqid=seqid, block=cancel))
    reply = await exchange(
        writer, reader, header_frame(b"", seqid=8, block=kv_block([(b"user-id", b"7")]))
    )
    assert reply.mtype == TMessageType.EXCEPTION
    assert reply.frame_seqid == 8
    assert reply.exc is not None
    assert reply.exc.type == TApplicationException.PROTOCOL_ERROR
    # a call that happens to carry the cancel key is still a call
    call = payload_of(message("echo", string_field("not a cancel"), seqid=9))
    reply = await exchange(writer, reader, header_frame(call, seqid=9, block=cancel))
    assert (reply.mtype, reply.success) == (TMessageType.REPLY, "not a cancel")
    await assert_connection_works(writer, reader)


async def test_bytes_after_the_message_are_refused(
    echo_server: RunningServer, connect: Any
) -> None:
    call = payload_of(message("echo", string_field("hello"), seqid=3))
    reader, writer = await connect(echo_server.port)
    reply = await exchange(writer, reader, header_frame(call + b"JUNKJUNK", seqid=3))
    assert reply.mtype == TMessageType.EXCEPTION


@pytest.mark.parametrize("protocol", ["binary", "compact"])
async def test_unknown_method_keeps_connection(
    echo_server: RunningServer, connect: Any, protocol: str
) -> None:
    reader, writer = await connect(echo_server.port)
    reply = await exchange(writer, reader, message("launch_missiles", seqid=21, protocol=protocol))
    assert reply.mtype == TMessageType.EXCEPTION
    assert reply.name == "launch_missiles"
    assert (reply.seqid, reply.frame_seqid) == (21, 21)
    assert reply.exc is not None
    assert reply.exc.type == TApplicationException.UNKNOWN_METHOD
    assert "launch_missiles" in reply.exc.message
    assert reply.headers[STATUS_KEY] == StatusCode.UNIMPLEMENTED.value
    await assert_connection_works(writer, reader)


async def test_wrong_argument_types_are_answered(
    echo_server: RunningServer, connect: Any, assert_serving: Any
) -> None:
    """Fields of the wrong type are skipped (Thrift semantics): the handler sees None."""
    reader, writer = await connect(echo_server.port)
    # echo(message: string) sent an i32: skipped, echo(None) returns None: an empty result
    reply = await exchange(writer, reader, message("echo", i32_field(5), seqid=31))
    assert reply.mtype == TMessageType.REPLY
    assert reply.frame_seqid == 31
    assert reply.success is None
    # reverse(message: string) sent an i32: reverse(None) raises the declared EchoError
    reply = await exchange(writer, reader, message("reverse", i32_field(5), seqid=32))
    assert reply.mtype == TMessageType.REPLY
    assert reply.error == "empty message"
    # slow(delay_ms: i32) sent a string: slow(None) fails in the handler: INTERNAL_ERROR
    reply = await exchange(writer, reader, message("slow", string_field("soon"), seqid=33))
    assert reply.mtype == TMessageType.EXCEPTION
    assert reply.exc is not None
    assert reply.exc.type == TApplicationException.INTERNAL_ERROR
    assert reply.frame_seqid == 33
    assert echo_server.impl.calls == ["echo:None", "reverse:None", "slow:None"]
    await assert_connection_works(writer, reader)
    await assert_serving(echo_server)


async def test_meshkit_client_refuses_wrong_argument_types(
    echo_server: RunningServer, make_client: Callable[..., Client]
) -> None:
    client = make_client(echo_server.addr)
    with pytest.raises(InvalidArgument):
        await client.echo(123)
    with pytest.raises(InvalidArgument):
        await client.slow("soon")
    assert echo_server.impl.calls == []
    assert await client.echo("fine") == "fine"


async def test_handler_exception_is_internal_error_without_details(
    echo_server: RunningServer, connect: Any, make_client: Callable[..., Client]
) -> None:
    reader, writer = await connect(echo_server.port)
    reply = await exchange(writer, reader, message("echo", string_field("raise"), seqid=41))
    assert reply.mtype == TMessageType.EXCEPTION
    assert reply.frame_seqid == 41
    assert reply.exc is not None
    assert reply.exc.type == TApplicationException.INTERNAL_ERROR
    assert SECRET not in reply.exc.message
    assert "unexpected failure" not in reply.exc.message
    assert reply.headers[STATUS_KEY] == StatusCode.INTERNAL.value
    await assert_connection_works(writer, reader)

    client = make_client(echo_server.addr)
    with pytest.raises(Internal) as info:
        await client.echo("raise")
    assert SECRET not in str(info.value)
    assert await client.echo("after") == "after"


async def test_handler_returning_wrong_type_is_an_error(
    echo_server: RunningServer, connect: Any, make_client: Callable[..., Client]
) -> None:
    reader, writer = await connect(echo_server.port)
    reply = await exchange(writer, reader, message("echo", string_field("wrong-type"), seqid=51))
    assert reply.mtype == TMessageType.EXCEPTION
    assert reply.frame_seqid == 51
    assert reply.exc is not None
    assert reply.exc.type == TApplicationException.INTERNAL_ERROR
    assert "12345" not in reply.exc.message
    await assert_connection_works(writer, reader)

    client = make_client(echo_server.addr)
    with pytest.raises(Internal):
        await client.echo("wrong-type")
    # a handler returning None for a non-void method: the reply has no result
    with pytest.raises(Internal):
        await client.echo("none")
    assert await client.echo("after") == "after"


async def test_half_closed_client_still_gets_its_reply(
    echo_server: RunningServer, connect: Any
) -> None:
    reader, writer = await connect(echo_server.port)
    writer.write(message("echo", string_field("bye"), seqid=61))
    writer.write_eof()
    reply = parse_reply(await read_frame(reader))
    assert reply.success == "bye"


# ---------------------------------------------------------------- deadlines on the wire


@pytest.mark.parametrize("budget", ["0", "-5"])
async def test_spent_budget_is_refused_without_running_the_handler(
    echo_server: RunningServer, connect: Any, budget: str
) -> None:
    reader, writer = await connect(echo_server.port)
    frame = message("slow", i32_field(1), seqid=71, headers={TIMEOUT_KEY: budget})
    reply = await exchange(writer, reader, frame)
    assert reply.mtype == TMessageType.EXCEPTION
    assert reply.frame_seqid == 71
    assert reply.exc is not None
    assert reply.exc.type == TIMEOUT_APP_EXC
    assert reply.headers[STATUS_KEY] == StatusCode.DEADLINE_EXCEEDED.value
    assert echo_server.impl.calls == []
    await assert_connection_works(writer, reader)


@pytest.mark.parametrize("budget", ["soon", "9" * 400])  # 400 digits: no float holds it
async def test_unparsable_budget_means_no_budget(
    echo_server: RunningServer, connect: Any, budget: str
) -> None:
    reader, writer = await connect(echo_server.port)
    frame = message("slow", i32_field(1), seqid=72, headers={TIMEOUT_KEY: budget})
    reply = await exchange(writer, reader, frame)
    assert reply.mtype == TMessageType.REPLY
    assert reply.success == 1


async def test_slow_handler_is_cancelled_when_the_budget_runs_out(
    echo_server: RunningServer, connect: Any
) -> None:
    reader, writer = await connect(echo_server.port)
    frame = message("slow", i32_field(60_000), seqid=73, headers={TIMEOUT_KEY: "200"})
    reply = await exchange(writer, reader, frame)
    assert reply.mtype == TMessageType.EXCEPTION
    assert reply.frame_seqid == 73
    assert reply.exc is not None
    assert reply.exc.type == TIMEOUT_APP_EXC
    assert reply.headers[STATUS_KEY] == StatusCode.DEADLINE_EXCEEDED.value
    await asyncio.wait_for(echo_server.impl.slow_cancelled.wait(), 5)
    assert echo_server.impl.slow_finished == 0
    await assert_connection_works(writer, reader)


async def test_client_timeout_cancels_the_server_handler(
    echo_server: RunningServer, make_client: Callable[..., Client]
) -> None:
    client = make_client(echo_server.addr, timeout=0.3)
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(client.slow(60_000), 10)
    await asyncio.wait_for(echo_server.impl.slow_cancelled.wait(), 5)
    assert echo_server.impl.slow_finished == 0
    assert await client.echo("after") == "after"


async def test_server_default_timeout_applies_without_a_budget(
    start_server: Any, connect: Any
) -> None:
    running = await start_server(default_timeout=0.2)
    reader, writer = await connect(running.port)
    reply = await exchange(writer, reader, message("slow", i32_field(60_000), seqid=74))
    assert reply.exc is not None
    assert reply.exc.type == TIMEOUT_APP_EXC
    await asyncio.wait_for(running.impl.slow_cancelled.wait(), 5)


# ------------------------------------------------ meshkit client against bad servers

ServerHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def fake_server() -> AsyncIterator[Callable[[ServerHandler], Awaitable[str]]]:
    servers: list[asyncio.Server] = []
    tasks: set[asyncio.Task[None]] = set()

    async def start(handler: ServerHandler) -> str:
        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            tasks.add(task)
            try:
                await handler(reader, writer)
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(run, "127.0.0.1", 0)
        servers.append(server)
        return f"127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for server in servers:
        server.close()
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> int:
    """Read one THeader request; return its seq id."""
    frame = await read_frame(reader, timeout=30)
    return struct.unpack_from("!i", frame, 8)[0]


def exception_reply(seqid: int, kind: int, text: str) -> bytes:
    buf = TMemoryBuffer()
    proto = THeaderProtocol(buf, (THeaderClientType.HEADERS,))
    proto.writeMessageBegin("echo", TMessageType.EXCEPTION, seqid)
    TApplicationException(kind, text).write(proto)
    proto.writeMessageEnd()
    proto.trans.flush()
    return buf.getvalue()


def _replies() -> dict[str, Callable[[int], bytes]]:
    return {
        "garbage": lambda seqid: b"\xff\xfe" * 32,
        "zero-length": lambda seqid: b"\x00\x00\x00\x00",
        "oversized": lambda seqid: struct.pack("!IHHiH", 0x7FFFFFF0, 0x0FFF, 0, seqid, 1),
        "not-theader": lambda seqid: message("echo", string_field("?"), transport="framed"),
        "garbled-payload": lambda seqid: header_frame(b"\x80\x01\x00\x02junk", seqid=seqid),
        "bad-header-block": lambda seqid: header_frame(b"", seqid=seqid, block=b"\x00\x01\x09"),
    }


REPLIES = _replies()


@pytest.mark.parametrize("case", list(REPLIES))
async def test_client_fails_fast_on_a_malformed_reply(
    fake_server: Any, make_client: Callable[..., Client], case: str
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seqid = await read_request(reader)
        writer.write(REPLIES[case](seqid))
        await writer.drain()
        await reader.read()  # hold the connection open: the client must not wait for more

    client = make_client(await fake_server(handler), timeout=60.0)
    with pytest.raises(MeshkitError) as info:
        await asyncio.wait_for(client.echo("hi"), 10)
    assert isinstance(info.value, (Unavailable, Internal))
    if case == "bad-header-block":  # its bounds are known: that call fails, not the connection
        assert isinstance(info.value, Internal)
        assert "header block was refused" in info.value.message


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        (TApplicationException.INTERNAL_ERROR, Internal),
        (TApplicationException.PROTOCOL_ERROR, InvalidArgument),
        (TIMEOUT_APP_EXC, DeadlineExceeded),
    ],
)
async def test_client_maps_foreign_application_exceptions(
    fake_server: Any, make_client: Callable[..., Client], kind: int, error: type[Exception]
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            seqid = await read_request(reader)
            writer.write(exception_reply(seqid, kind, "from a foreign server"))
            await writer.drain()

    client = make_client(await fake_server(handler))
    for _ in range(2):  # the connection stays usable
        with pytest.raises(error) as info:
            await asyncio.wait_for(client.echo("hi"), 10)
        assert "from a foreign server" in str(info.value)


async def test_client_deadline_when_the_server_never_replies(
    fake_server: Any, make_client: Callable[..., Client]
) -> None:
    received = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        received.set()
        await reader.read()

    client = make_client(await fake_server(handler), timeout=0.3)
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(client.echo("hi"), 10)
    assert received.is_set()


async def test_client_ignores_a_reply_for_another_seqid(
    fake_server: Any, make_client: Callable[..., Client]
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seqid = await read_request(reader)
        writer.write(exception_reply(seqid + 1000, TApplicationException.INTERNAL_ERROR, "?"))
        await writer.drain()
        await reader.read()

    client = make_client(await fake_server(handler), timeout=0.3)
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(client.echo("hi"), 10)


@pytest.mark.parametrize("partial", [False, True], ids=["nothing-sent", "half-a-reply"])
async def test_client_unavailable_when_the_server_closes_mid_call(
    fake_server: Any, make_client: Callable[..., Client], partial: bool
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seqid = await read_request(reader)
        if partial:
            writer.write(exception_reply(seqid, TApplicationException.INTERNAL_ERROR, "x")[:9])
            await writer.drain()
        # returning closes the connection

    client = make_client(await fake_server(handler), timeout=60.0)
    with pytest.raises(Unavailable):
        await asyncio.wait_for(client.echo("hi"), 10)


async def test_client_unavailable_when_the_server_closes_at_once(
    fake_server: Any, make_client: Callable[..., Client]
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        return None

    addr = await fake_server(handler)
    client = make_client(addr, timeout=60.0)
    with pytest.raises(Unavailable):
        await asyncio.wait_for(client.echo("hi"), 10)
