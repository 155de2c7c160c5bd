"""Fixtures for the RPC interop and bad-input tests.

* an echo implementation with hooks (cancellation, unexpected exceptions, wrong types);
* ``start_server``: a meshkit :class:`RpcServer` on a free port, with a middleware that
  records the request headers of every call and sets ``x-served-by`` on every reply;
* ``apache_gen``: Apache Thrift Python code generated from ``examples/echo/echo.thrift``
  into a temporary directory by the ``thrift`` compiler (Debian ``thrift-compiler``);
* ``apache_server``: an Apache ``TThreadedServer`` speaking THeader, in a thread.

Fixture names are prefixed or specific so they do not shadow ``tests/conftest.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import thriftpy2
from prometheus_client import CollectorRegistry

from meshkit import Client
from meshkit.rpc.context import CallContext
from meshkit.rpc.pipeline import Next
from meshkit.rpc.server import RpcServer

ROOT = Path(__file__).resolve().parents[2]
ECHO_IDL = ROOT / "examples" / "echo" / "echo.thrift"
# A module name of our own: independent of the echo module other test files load.
echo_thrift = thriftpy2.load(str(ECHO_IDL), module_name="rpc_interop_echo_thrift")

#: Text an unexpected handler exception carries; it must never reach a client.
SECRET = "s3cr3t-db-password-in-exception-text"


class EchoImpl:
    """The echo service, with switches for misbehaviour and hooks to observe calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.slow_started = asyncio.Event()
        self.slow_cancelled = asyncio.Event()
        self.slow_finished = 0
        self.pings = 0

    async def echo(self, message: str) -> Any:
        self.calls.append(f"echo:{message}")
        if message == "raise":
            raise RuntimeError(f"unexpected failure: {SECRET}")
        if message == "wrong-type":
            return 12345  # the IDL says string
        if message == "none":
            return None
        return message

    def reverse(self, message: str) -> str:
        self.calls.append(f"reverse:{message}")
        if not message:
            raise echo_thrift.EchoError(reason="empty message")
        return message[::-1]

    async def slow(self, delay_ms: int) -> int:
        self.calls.append(f"slow:{delay_ms}")
        self.slow_started.set()
        try:
            await asyncio.sleep(delay_ms / 1000)
        except asyncio.CancelledError:
            self.slow_cancelled.set()
            raise
        self.slow_finished += 1
        return delay_ms

    async def ping(self) -> None:
        self.pings += 1


@dataclass
class Recorder:
    """What the recording middleware saw: the request headers of each call, in order."""

    headers: list[dict[str, str]] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)

    async def __call__(self, ctx: CallContext, call_next: Next) -> Any:
        self.headers.append(dict(ctx.headers))
        self.methods.append(ctx.method)
        ctx.response_headers["x-served-by"] = "meshkit"
        return await call_next(ctx)


@dataclass
class RunningServer:
    server: RpcServer
    impl: EchoImpl
    recorder: Recorder

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.server.port}"


StartServer = Callable[..., Awaitable[RunningServer]]


@pytest.fixture
def rpc_metrics() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
async def start_server(rpc_metrics: CollectorRegistry) -> AsyncIterator[StartServer]:
    """Start meshkit RpcServers for echo: ``await start_server(max_frame_size=..., ...)``."""
    running: list[RpcServer] = []

    async def start(impl: EchoImpl | None = None, **options: Any) -> RunningServer:
        impl = impl or EchoImpl()
        recorder = Recorder()
        options.setdefault("metrics_registry", rpc_metrics)
        if "middlewares" not in options:
            # default_middlewares() is a method: build a throwaway server to get the chain
            chain_options = {
                k: options.pop(k)
                for k in ("max_concurrency", "default_timeout", "tracer")
                if k in options
            }
            probe = RpcServer(echo_thrift.Echo, impl, name="echo", middlewares=[], **options)
            options["middlewares"] = [*probe.default_middlewares(**chain_options), recorder]
            await probe.close()
        server = RpcServer(echo_thrift.Echo, impl, name="echo", **options)
        await server.start("127.0.0.1", 0)
        running.append(server)
        return RunningServer(server, impl, recorder)

    yield start
    for server in running:
        await server.close()


@pytest.fixture
async def echo_server(start_server: StartServer) -> RunningServer:
    """One meshkit echo server with default limits."""
    return await start_server()


@pytest.fixture
async def make_client(rpc_metrics: CollectorRegistry) -> AsyncIterator[Callable[..., Client]]:
    """meshkit Clients for echo at an address; closed at teardown."""
    clients: list[Client] = []

    def make(addr: str, **options: Any) -> Client:
        options.setdefault("timeout", 5.0)
        options.setdefault("metrics_registry", rpc_metrics)
        client = Client(echo_thrift.Echo, "echo", addr=addr, **options)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


# ----------------------------------------------------------------- Apache Thrift code


@pytest.fixture(scope="session")
def apache_gen(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    """Apache Thrift Python code for echo.thrift, generated now (never committed).

    Returns the generated ``echo`` package; ``.Echo`` and ``.ttypes`` are loaded.
    """
    compiler = shutil.which("thrift")
    if compiler is None:
        pytest.fail(
            "the Apache Thrift compiler `thrift` is not on PATH: the interop tests generate "
            "Apache Python code with it (Debian: apt-get install -y thrift-compiler)"
        )
    out = tmp_path_factory.mktemp("apache_gen")
    package = out / "rpc_interop_apache_gen"
    package.mkdir()
    (package / "__init__.py").write_text("")
    proc = subprocess.run(
        [compiler, "--gen", "py", "-out", str(package), str(ECHO_IDL)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"thrift --gen py failed ({proc.returncode}): {proc.stderr or proc.stdout}")
    sys.path.insert(0, str(out))
    try:
        module = importlib.import_module("rpc_interop_apache_gen.echo")
        importlib.import_module("rpc_interop_apache_gen.echo.Echo")
        importlib.import_module("rpc_interop_apache_gen.echo.ttypes")
    finally:
        sys.path.remove(str(out))
    return module


class ApacheEchoHandler:
    """The Apache-side echo implementation; sees the request headers of each call."""

    def __init__(self, ttypes: ModuleType) -> None:
        self.ttypes = ttypes
        self.local = threading.local()
        self.headers: list[dict[bytes, bytes]] = []
        self.lock = threading.Lock()

    def _record(self) -> None:
        proto = self.local.proto
        with self.lock:
            self.headers.append(dict(proto.get_headers()))
        proto.set_header(b"x-served-by", b"apache")

    def echo(self, message: str) -> str:
        self._record()
        return message

    def reverse(self, message: str) -> str:
        self._record()
        if not message:
            raise self.ttypes.EchoError(reason="empty message")
        return message[::-1]

    def slow(self, delay_ms: int) -> int:
        self._record()
        time.sleep(delay_ms / 1000)  # Apache's server runs handlers in its own thread
        return delay_ms

    def ping(self) -> None:
        self._record()


@dataclass
class ApacheServer:
    port: int
    handler: ApacheEchoHandler

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
def apache_server(apache_gen: ModuleType) -> Iterator[ApacheServer]:
    """An Apache Thrift THeader echo server (TThreadedServer) in daemon threads."""
    from thrift.protocol.THeaderProtocol import THeaderProtocolFactory
    from thrift.server import TServer
    from thrift.transport import TSocket, TTransport

    handler = ApacheEchoHandler(apache_gen.ttypes)

    class Processor(apache_gen.Echo.Processor):  # type: ignore[name-defined,misc]
        """Makes the connection's protocol visible to the handler (for its headers)."""

        def process(self, iprot: Any, oprot: Any) -> Any:
            handler.local.proto = iprot
            return super().process(iprot, oprot)

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    server_socket = TSocket.TServerSocket(host="127.0.0.1", port=port)
    server_socket.handle = listener  # already listening: serve() below only accepts
    factory = THeaderProtocolFactory()
    server = TServer.TThreadedServer(
        Processor(handler),
        server_socket,
        TTransport.TTransportFactoryBase(),
        factory,
        daemon=True,
    )
    stopping = threading.Event()
    clients: list[Any] = []

    def serve() -> None:
        while not stopping.is_set():
            try:
                client = server_socket.accept()
            except OSError:
                return
            if stopping.is_set():
                client.close()
                return
            clients.append(client)
            threading.Thread(target=server.handle, args=(client,), daemon=True).start()

    thread = threading.Thread(target=serve, name="apache-thrift-server", daemon=True)
    thread.start()
    yield ApacheServer(port, handler)
    stopping.set()
    # wake the blocking accept, then close everything
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    thread.join(5)
    listener.close()
    for client in clients:
        # wakes the handler thread blocked in recv (close alone may not)
        handle = client.handle
        if handle is not None:
            with contextlib.suppress(OSError):
                handle.shutdown(socket.SHUT_RDWR)
        client.close()
