"""Echo servers for bench/rpc.py, one per process.

    python bench/_servers.py KIND LOOP --report-fd FD

Writes ``PORT <n>`` to FD once the server accepts connections (or ``ERROR <text>`` and
exits 1), then serves until killed; stdout is left to the libraries' own logging. KIND is
one of meshkit, thriftpy2_aio, thriftpy2_sync, grpcio_aio, raw_asyncio; LOOP is asyncio or
uvloop (ignored by thriftpy2_sync).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import time
from collections.abc import Callable

from _common import (
    HOST,
    RAW_HDR,
    FrameProtocol,
    die_with_parent,
    err_text,
    free_port,
    grpc_messages,
    load_echo,
    pin_meshkit_loop,
    run_loop,
)

Report = Callable[[int], None]


class Reporter:
    def __init__(self, fd: int) -> None:
        self.f = os.fdopen(fd, "w", buffering=1, encoding="utf-8")

    def __call__(self, port: int) -> None:
        self.f.write(f"PORT {port}\n")
        self.f.flush()

    def error(self, text: str) -> None:
        self.f.write(f"ERROR {text}\n")
        self.f.flush()


async def _forever() -> None:
    await asyncio.Event().wait()


# --- (a)/(b) meshkit: Service with the full default pipeline ---------------------------


async def serve_meshkit(report: Report) -> None:
    from meshkit import Service

    try:  # what Service.run() does before serving; best effort, the module may move
        from meshkit.logs import configure_logging

        configure_logging(service="echo")
    except Exception as exc:
        print(f"bench: meshkit logging not configured: {err_text(exc)}", file=sys.stderr)

    echo = load_echo()
    svc = Service("echo", echo.Echo, version="bench", registry=None)

    @svc.implement
    class Impl:  # meshkit wants every IDL method; only echo is measured
        async def echo(self, message):
            return message

        async def reverse(self, message):
            if not message:
                raise echo.EchoError(reason="empty message")
            return message[::-1]

        async def slow(self, delay_ms):
            await asyncio.sleep(delay_ms / 1000)
            return delay_ms

        async def ping(self):
            return None

    port = free_port()
    task = asyncio.ensure_future(svc.serve(host=HOST, port=port, health_port=0))
    deadline = time.monotonic() + 15.0
    while True:
        if task.done():
            task.result()  # raises what serve() raised
            raise RuntimeError("Service.serve() returned before accepting connections")
        try:
            _, writer = await asyncio.open_connection(HOST, port)
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"meshkit server not listening on {port} after 15 s") from None
            await asyncio.sleep(0.02)
            continue
        writer.close()
        break
    report(port)
    await task


# --- (c) bare thriftpy2 aio: binary protocol, framed transport ---------------------------


async def serve_thriftpy2_aio(report: Report) -> None:
    from thriftpy2.contrib.aio.processor import TAsyncProcessor
    from thriftpy2.contrib.aio.protocol.binary import TAsyncBinaryProtocolFactory
    from thriftpy2.contrib.aio.server import TAsyncServer
    from thriftpy2.contrib.aio.socket import TAsyncServerSocket
    from thriftpy2.contrib.aio.transport.framed import TAsyncFramedTransportFactory

    echo = load_echo()

    class Handler:
        async def echo(self, message):
            return message

    # make_server() refuses port 0 and wraps every connection in wait_for(client_timeout):
    # build the same objects by hand with port 0 and no per-connection time limit.
    trans = TAsyncServerSocket(host=HOST, port=0, client_timeout=None)
    server = TAsyncServer(
        TAsyncProcessor(echo.Echo, Handler()),
        trans,
        itrans_factory=TAsyncFramedTransportFactory(),
        iprot_factory=TAsyncBinaryProtocolFactory(),
        loop=asyncio.get_running_loop(),
    )
    trans.listen()
    srv = await trans.accept(server.handle)
    report(trans.raw_sock.getsockname()[1])
    async with srv:
        await _forever()


# --- (d) bare thriftpy2 sync: Cython binary protocol, Cython framed transport, threads ------


def serve_thriftpy2_sync(report: Report) -> None:
    from thriftpy2.protocol import TCyBinaryProtocolFactory
    from thriftpy2.server import TThreadedServer
    from thriftpy2.thrift import TProcessor
    from thriftpy2.transport import TCyFramedTransportFactory, TServerSocket

    echo = load_echo()

    class Handler:
        def echo(self, message):
            return message

    trans = TServerSocket(host=HOST, port=0, client_timeout=None)
    server = TThreadedServer(
        TProcessor(echo.Echo, Handler()),
        trans,
        iprot_factory=TCyBinaryProtocolFactory(),
        itrans_factory=TCyFramedTransportFactory(),
        daemon=True,
    )
    trans.listen()
    trans.listen = lambda: None  # serve() listens again; we already bound port 0
    report(trans.sock.getsockname()[1])
    server.serve()


# --- (e) grpcio aio: unary echo, protobuf message with one bytes field ---------------------


async def serve_grpcio_aio(report: Report) -> None:
    import grpc

    req_cls, rep_cls = grpc_messages()

    async def echo(request, context):
        return rep_cls(message=request.message)

    handler = grpc.method_handlers_generic_handler(
        "meshkit.bench.Echo",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(
                echo,
                request_deserializer=req_cls.FromString,
                response_serializer=rep_cls.SerializeToString,
            )
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"{HOST}:0")
    await server.start()
    report(port)
    await server.wait_for_termination()


# --- (f) raw asyncio Protocol: length-prefixed frames, echo id + payload --------------------


class RawEchoProtocol(FrameProtocol):
    def frames_received(self, frames: list[tuple[int, bytes]]) -> None:
        pack = RAW_HDR.pack
        out = []
        for rid, payload in frames:
            out.append(pack(4 + len(payload), rid))
            out.append(payload)
        self.transport.write(b"".join(out))


async def serve_raw_asyncio(report: Report) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(RawEchoProtocol, HOST, 0, family=socket.AF_INET)
    report(server.sockets[0].getsockname()[1])
    async with server:
        await _forever()


ASYNC_SERVERS = {
    "meshkit": serve_meshkit,
    "thriftpy2_aio": serve_thriftpy2_aio,
    "grpcio_aio": serve_grpcio_aio,
    "raw_asyncio": serve_raw_asyncio,
}


def main() -> int:
    die_with_parent()
    ap = argparse.ArgumentParser()
    ap.add_argument("kind")
    ap.add_argument("loop")
    ap.add_argument("--report-fd", type=int, required=True)
    args = ap.parse_args()
    kind, loop = args.kind, args.loop
    pin_meshkit_loop(loop)
    report = Reporter(args.report_fd)
    try:
        if kind == "thriftpy2_sync":
            serve_thriftpy2_sync(report)
        elif kind in ASYNC_SERVERS:
            run_loop(lambda: ASYNC_SERVERS[kind](report), loop)
        else:
            raise ValueError(f"unknown server kind {kind!r}")
    except KeyboardInterrupt:
        return 0
    except BaseException as exc:
        report.error(err_text(exc))
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
