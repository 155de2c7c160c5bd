"""Interop with Apache Thrift (THeader and legacy transports) and thriftpy2 clients.

The Apache side is real Apache Thrift 0.25 Python code (``THeaderProtocol``,
``TFramedTransport``, ``TBufferedTransport`` over ``TSocket``) driving stubs the Apache
compiler generated from ``examples/echo/echo.thrift`` (see ``apache_gen`` in conftest).
Apache calls block: they run in a thread while the meshkit server runs on the test loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import thriftpy2
from prometheus_client import CollectorRegistry
from thrift.protocol.TBinaryProtocol import TBinaryProtocol
from thrift.protocol.TCompactProtocol import TCompactProtocol
from thrift.protocol.THeaderProtocol import THeaderProtocol
from thrift.Thrift import TApplicationException, TMessageType
from thrift.transport.THeaderTransport import (
    THeaderClientType,
    THeaderSubprotocolID,
    THeaderTransformID,
)
from thrift.transport.TSocket import TSocket
from thrift.transport.TTransport import TBufferedTransport, TFramedTransport
from thriftpy2.protocol import TCompactProtocolFactory
from thriftpy2.rpc import make_client as thriftpy2_make_client
from thriftpy2.transport import TBufferedTransportFactory, TFramedTransportFactory

from meshkit import Client, Unimplemented
from meshkit.rpc.balancer import RoundRobin
from meshkit.rpc.client import RpcClient
from meshkit.rpc.context import CALLER_KEY, TIMEOUT_KEY, CallContext
from meshkit.rpc.deadline import ClientDeadline
from meshkit.rpc.endpoint import StaticResolver
from meshkit.rpc.pick import Pick
from meshkit.rpc.pipeline import Next

ECHO_IDL = Path(__file__).resolve().parents[2] / "examples" / "echo" / "echo.thrift"
# thriftpy2 caches modules by name: this is the module the conftest servers use
echo_thrift = thriftpy2.load(str(ECHO_IDL), module_name="rpc_interop_echo_thrift")
# fixture values (see conftest.py)
RunningServer = Any
ApacheServer = Any

PROTOCOLS = {"binary": THeaderSubprotocolID.BINARY, "compact": THeaderSubprotocolID.COMPACT}

# ----------------------------------------------------------------------------- helpers


class RecordingSocket(TSocket):
    """A TSocket that keeps every byte it received (to look at the reply frames)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.received = bytearray()

    def read(self, sz: int) -> bytes:
        data: bytes = super().read(sz)
        self.received += data
        return data


@contextlib.contextmanager
def apache_header_client(
    gen: ModuleType, port: int, *, protocol: str = "binary", zlib: bool = False
) -> Iterator[tuple[Any, THeaderProtocol]]:
    """An Apache generated echo client over THeaderProtocol / TSocket."""
    sock = RecordingSocket("127.0.0.1", port)
    sock.setTimeout(5000)
    proto = THeaderProtocol(
        sock,
        allowed_client_types=(THeaderClientType.HEADERS,),
        default_protocol=PROTOCOLS[protocol],
    )
    if zlib:
        proto.add_transform(THeaderTransformID.ZLIB)
    sock.open()
    try:
        yield gen.Echo.Client(proto), proto
    finally:
        sock.close()


def call_unknown_method(proto: Any, name: str = "no_such_method", seqid: int = 7) -> Any:
    """Send a call to a method the IDL does not have; return the reply's header and body."""
    proto.writeMessageBegin(name, TMessageType.CALL, seqid)
    proto.writeStructBegin(f"{name}_args")
    proto.writeFieldStop()
    proto.writeStructEnd()
    proto.writeMessageEnd()
    proto.trans.flush()
    rname, mtype, rseqid = proto.readMessageBegin()
    exc = TApplicationException()
    if mtype == TMessageType.EXCEPTION:
        exc.read(proto)
    proto.readMessageEnd()
    return rname, mtype, rseqid, exc


def as_str_headers(headers: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in headers.items()}


# -------------------------------------------- Apache THeader client -> meshkit server


@pytest.mark.parametrize("zlib", [False, True], ids=["plain", "zlib"])
@pytest.mark.parametrize("protocol", ["binary", "compact"])
async def test_apache_theader_client_calls_meshkit_server(
    apache_gen: ModuleType, echo_server: RunningServer, protocol: str, zlib: bool
) -> None:
    def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        with apache_header_client(apache_gen, echo_server.port, protocol=protocol, zlib=zlib) as (
            client,
            proto,
        ):
            proto.set_header(b"user-id", b"42")
            proto.set_header(b"x-request", b"first")
            out["echo"] = client.echo("hello, thrift")
            out["echo_headers"] = as_str_headers(proto.get_headers())
            out["reply_protocol"] = proto.trans.protocol_id
            # protocol id, transform count and transforms of the first reply's header block
            out["reply_block"] = bytes(proto.trans._transport.received[14:17])

            out["big"] = client.echo("x" * 200_000)

            with pytest.raises(apache_gen.ttypes.EchoError) as info:
                client.reverse("")
            out["error_reason"] = info.value.reason
            out["error_headers"] = as_str_headers(proto.get_headers())

            out["reverse"] = client.reverse("abc")

            name, mtype, seqid, exc = call_unknown_method(proto)
            out["unknown"] = (name, mtype, seqid, exc.type, exc.message)
            out["unknown_headers"] = as_str_headers(proto.get_headers())

            client.ping()  # oneway: no reply is read
            # the same connection still works after all of the above
            proto.set_header(b"x-request", b"last")
            out["after"] = client.echo("still here")
        return out

    out = await asyncio.to_thread(scenario)

    assert out["echo"] == "hello, thrift"
    assert out["big"] == "x" * 200_000
    assert out["reply_protocol"] == PROTOCOLS[protocol]
    # the reply uses the request's protocol and transforms
    assert out["reply_block"][0] == PROTOCOLS[protocol]
    if zlib:
        assert out["reply_block"][1:3] == b"\x01\x01"
    else:
        assert out["reply_block"][1] == 0
    # the header the meshkit server set on the reply, read by the Apache client
    assert out["echo_headers"]["x-served-by"] == "meshkit"
    assert "meshkit-status" not in out["echo_headers"]

    # IDL exception: arrives as the Apache EchoError, a normal reply
    assert out["error_reason"] == "empty message"
    assert out["error_headers"]["x-served-by"] == "meshkit"
    assert out["reverse"] == "cba"

    name, mtype, seqid, exc_type, message = out["unknown"]
    assert name == "no_such_method"
    assert mtype == TMessageType.EXCEPTION
    assert seqid == 7
    assert exc_type == TApplicationException.UNKNOWN_METHOD
    assert "no_such_method" in message
    assert out["unknown_headers"]["meshkit-status"] == "UNIMPLEMENTED"

    assert out["after"] == "still here"

    # the request headers the Apache client set arrived in the meshkit middleware
    rec = echo_server.recorder
    assert rec.methods[0] == "echo"
    assert rec.headers[0]["user-id"] == "42"
    assert rec.headers[0]["x-request"] == "first"
    # Apache clears its write headers after each frame
    assert "user-id" not in rec.headers[1]
    assert rec.methods[-1] == "echo"
    assert rec.headers[-1] == {"x-request": "last"}
    assert "ping" in rec.methods
    assert echo_server.impl.pings == 1


async def test_apache_theader_client_sees_meshkit_error_status(
    apache_gen: ModuleType, echo_server: RunningServer
) -> None:
    """A handler failure reaches Apache as INTERNAL_ERROR with meshkit-status set."""

    def scenario() -> tuple[int, str, dict[str, str], str]:
        with apache_header_client(apache_gen, echo_server.port) as (client, proto):
            with pytest.raises(TApplicationException) as info:
                client.echo("raise")
            headers = as_str_headers(proto.get_headers())
            return info.value.type, info.value.message, headers, client.echo("ok")

    exc_type, message, headers, after = await asyncio.to_thread(scenario)
    assert exc_type == TApplicationException.INTERNAL_ERROR
    assert headers["meshkit-status"] == "INTERNAL"
    assert after == "ok"
    assert "RuntimeError" in message


async def test_apache_theader_client_spent_deadline_header(
    apache_gen: ModuleType, echo_server: RunningServer
) -> None:
    """An Apache client can send meshkit-timeout-ms itself; 0 is refused with TIMEOUT (12)."""

    def scenario() -> tuple[int, dict[str, str], str]:
        with apache_header_client(apache_gen, echo_server.port) as (client, proto):
            proto.set_header(TIMEOUT_KEY.encode(), b"0")
            with pytest.raises(TApplicationException) as info:
                client.slow(10)
            headers = as_str_headers(proto.get_headers())
            proto.set_header(TIMEOUT_KEY.encode(), b"5000")
            return info.value.type, headers, str(client.slow(1))

    exc_type, headers, after = await asyncio.to_thread(scenario)
    assert exc_type == 12
    assert headers["meshkit-status"] == "DEADLINE_EXCEEDED"
    assert after == "1"
    assert echo_server.impl.calls == ["slow:1"]


# ------------------------------------------------- legacy clients -> meshkit server


def _apache_legacy(kind: str, gen: ModuleType, port: int) -> tuple[Any, Callable[[], None]]:
    sock = TSocket("127.0.0.1", port)
    sock.setTimeout(5000)
    framing, protocol = kind.split("-")
    trans = TFramedTransport(sock) if framing == "framed" else TBufferedTransport(sock)
    proto = TBinaryProtocol(trans) if protocol == "binary" else TCompactProtocol(trans)
    trans.open()
    return gen.Echo.Client(proto), trans.close


def _thriftpy2_legacy(kind: str, port: int) -> tuple[Any, Callable[[], None]]:
    framing, protocol = kind.split("-")
    options: dict[str, Any] = {
        "trans_factory": TFramedTransportFactory()
        if framing == "framed"
        else TBufferedTransportFactory()
    }
    if protocol == "compact":
        options["proto_factory"] = TCompactProtocolFactory()
    client = thriftpy2_make_client(echo_thrift.Echo, "127.0.0.1", port, timeout=5000, **options)
    return client, client.close


LEGACY = [
    ("apache", "framed-binary"),
    ("apache", "buffered-binary"),
    ("apache", "framed-compact"),
    ("apache", "buffered-compact"),
    ("thriftpy2", "framed-binary"),
    ("thriftpy2", "buffered-binary"),
    ("thriftpy2", "framed-compact"),
    ("thriftpy2", "buffered-compact"),
]


def _legacy_client(
    library: str, kind: str, gen: ModuleType, port: int
) -> tuple[Any, Callable[[], None], type[Exception]]:
    if library == "apache":
        client, close = _apache_legacy(kind, gen, port)
        return client, close, gen.ttypes.EchoError
    client, close = _thriftpy2_legacy(kind, port)
    return client, close, echo_thrift.EchoError


@pytest.mark.parametrize(("library", "kind"), LEGACY, ids=[f"{a}-{b}" for a, b in LEGACY])
async def test_legacy_client_calls_meshkit_server(
    apache_gen: ModuleType, echo_server: RunningServer, library: str, kind: str
) -> None:
    def scenario() -> dict[str, Any]:
        client, close, error_cls = _legacy_client(library, kind, apache_gen, echo_server.port)
        try:
            out: dict[str, Any] = {"echo": client.echo("héllo")}
            with pytest.raises(error_cls) as info:
                client.reverse("")
            out["reason"] = info.value.reason
            out["reverse"] = client.reverse("legacy")
            out["slow"] = client.slow(3)
            out["big"] = client.echo("y" * 100_000)
            client.ping()
            out["after"] = client.echo("after ping")
            return out
        finally:
            close()

    out = await asyncio.to_thread(scenario)
    assert out == {
        "echo": "héllo",
        "reason": "empty message",
        "reverse": "ycagel",
        "slow": 3,
        "big": "y" * 100_000,
        "after": "after ping",
    }
    assert echo_server.impl.pings == 1
    # legacy transports carry no headers
    assert all(h == {} for h in echo_server.recorder.headers)


async def test_every_client_kind_shares_one_server_port(
    apache_gen: ModuleType,
    echo_server: RunningServer,
    make_client: Callable[..., Client],
) -> None:
    """All transports at once, interleaved, on one port, each on its own open connection."""
    clients = [_legacy_client(lib, kind, apache_gen, echo_server.port) for lib, kind in LEGACY]
    header_clients = [
        apache_header_client(apache_gen, echo_server.port, protocol=p, zlib=z)
        for p in ("binary", "compact")
        for z in (False, True)
    ]
    entered = [cm.__enter__() for cm in header_clients]
    meshkit_client = make_client(echo_server.addr)
    meshkit_compact = make_client(echo_server.addr, protocol="compact")

    def round_of_calls(i: int) -> list[str]:
        got = [c.echo(f"legacy-{n}-{i}") for n, (c, _close, _e) in enumerate(clients)]
        got += [c.reverse(f"header-{n}-{i}") for n, (c, _p) in enumerate(entered)]
        return got

    try:
        for i in range(3):
            legacy = asyncio.to_thread(round_of_calls, i)
            ours = asyncio.gather(
                meshkit_client.echo(f"meshkit-{i}"), meshkit_compact.reverse(f"compact-{i}")
            )
            got, (mine, compact) = await asyncio.gather(legacy, ours)
            assert got == [f"legacy-{n}-{i}" for n in range(len(clients))] + [
                f"header-{n}-{i}"[::-1] for n in range(len(entered))
            ]
            assert mine == f"meshkit-{i}"
            assert compact == f"compact-{i}"[::-1]
    finally:
        for _c, close, _e in clients:
            close()
        for cm in header_clients:
            cm.__exit__(None, None, None)


# ------------------------------------------------- meshkit client -> Apache server


@pytest.mark.parametrize("protocol", ["binary", "compact"])
async def test_meshkit_client_calls_apache_theader_server(
    apache_server: ApacheServer, make_client: Callable[..., Client], protocol: str
) -> None:
    client = make_client(apache_server.addr, caller="interop-test", protocol=protocol)

    assert await client.call("echo", "x", headers={"user-id": "42"}, timeout=2.0) == "x"
    assert await client.echo("z" * 100_000) == "z" * 100_000
    with pytest.raises(echo_thrift.EchoError) as info:
        await client.reverse("")
    assert info.value.reason == "empty message"
    assert await client.reverse("abc") == "cba"
    assert await client.slow(4) == 4
    await client.ping()  # oneway
    assert await client.echo("after ping") == "after ping"

    seen = [as_str_headers(h) for h in apache_server.handler.headers]
    first = seen[0]
    assert first["user-id"] == "42"
    assert first[CALLER_KEY] == "interop-test"
    assert 0 < int(first[TIMEOUT_KEY]) <= 2000
    # every call carries the caller and the client's default 5 s budget
    for headers in seen[1:]:
        assert headers[CALLER_KEY] == "interop-test"
        assert "user-id" not in headers
    assert 2000 < int(seen[1][TIMEOUT_KEY]) <= 5000
    # the oneway ping reached the handler too
    assert len(seen) == 7


async def test_meshkit_client_reads_apache_response_headers(
    apache_server: ApacheServer, rpc_metrics: CollectorRegistry
) -> None:
    """A client middleware sees the headers the Apache server put on its reply."""
    seen: list[dict[str, str]] = []

    async def capture(ctx: CallContext, call_next: Next) -> Any:
        try:
            return await call_next(ctx)
        finally:
            seen.append(dict(ctx.response_headers))

    resolver = StaticResolver([apache_server.addr])
    client = RpcClient(
        echo_thrift.Echo,
        "echo",
        resolver=resolver,
        middlewares=[ClientDeadline(5.0), capture, Pick(resolver, RoundRobin())],
        metrics_registry=rpc_metrics,
    )
    try:
        assert await client.echo("hi") == "hi"
        with pytest.raises(echo_thrift.EchoError):
            await client.reverse("")
    finally:
        await client.close()
    assert [h.get("x-served-by") for h in seen] == ["apache", "apache"]


async def test_meshkit_client_sends_no_cancel_frames_to_an_apache_server(
    apache_server: ApacheServer, rpc_metrics: CollectorRegistry
) -> None:
    """Cancel frames go only to servers that said they take them: Apache never does."""
    client = Client(echo_thrift.Echo, "echo", addr=apache_server.addr, metrics_registry=rpc_metrics)
    try:
        assert await client.echo("first") == "first"
        (conn,) = [c for conns in client.pool._conns.values() for c in conns]
        assert conn.announced and not conn.peer_cancels
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.slow(300), 0.05)
        # the same connection goes on working (an unexpected frame would have broken it)
        assert await client.echo("after") == "after"
        assert [c for conns in client.pool._conns.values() for c in conns] == [conn]
        assert conn.usable
    finally:
        await client.close()


async def test_meshkit_client_unknown_method_on_apache_server(
    apache_server: ApacheServer, rpc_metrics: CollectorRegistry
) -> None:
    """Apache's UNKNOWN_METHOD (no meshkit-status header) becomes Unimplemented."""
    idl = ECHO_IDL.read_text().replace(
        "service Echo {", "service Echo {\n  string shout(1: string message)\n"
    )
    bigger = thriftpy2.load_fp(io.StringIO(idl), module_name="rpc_interop_bigger_echo_thrift")
    client = Client(bigger.Echo, "echo", addr=apache_server.addr, metrics_registry=rpc_metrics)
    try:
        with pytest.raises(Unimplemented) as info:
            await client.shout("hey")
        assert "shout" in info.value.message
        # the Apache server skipped the unknown call's body: the connection still works
        assert await client.echo("fine") == "fine"
    finally:
        await client.close()


# ------------------------------------------------- meshkit client -> meshkit server


@pytest.mark.parametrize("protocol", ["binary", "compact"])
async def test_meshkit_client_protocols_against_meshkit_server(
    echo_server: RunningServer, make_client: Callable[..., Client], protocol: str
) -> None:
    client = make_client(echo_server.addr, caller="peer", protocol=protocol)
    assert await client.call("echo", "x", headers={"user-id": "42"}) == "x"
    with pytest.raises(echo_thrift.EchoError):
        await client.reverse("")
    assert await client.reverse("abc") == "cba"
    results = await asyncio.gather(*(client.echo(str(i)) for i in range(50)))
    assert results == [str(i) for i in range(50)]
    first = echo_server.recorder.headers[0]
    assert first["user-id"] == "42"
    assert first[CALLER_KEY] == "peer"
    assert int(first[TIMEOUT_KEY]) > 0
