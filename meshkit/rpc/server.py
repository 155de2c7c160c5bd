"""The asyncio RPC server: THeader (and legacy framed/unframed) over ``asyncio.Protocol``.

Each connection decodes frames as bytes arrive and runs every request as its own
task, so pipelined requests on one connection are served concurrently and
answered by seq id in completion order. Replies leave in the transport (THeader,
framed, unframed) and protocol (binary, compact) the request came in.

Bad input never takes the server down: a malformed message gets a
``TApplicationException`` when the frame boundary is still known, and a broken
stream (garbage, oversized frame) closes only that connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

import structlog
from prometheus_client import CollectorRegistry
from thriftpy2.thrift import TApplicationException, TMessageType

from ..errors import FrameError, InvalidArgument, MeshkitError, StatusCode
from .accesslog import AccessLog
from .adaptive import AdaptiveLimit
from .codec import encode_message, read_message
from .concurrency import ConcurrencyLimit
from .context import (
    CALLER_KEY,
    CANCEL_FEATURE,
    CANCEL_KEY,
    FEATURES_KEY,
    GOAWAY_KEY,
    STATUS_KEY,
    TIMEOUT_KEY,
    CallContext,
)
from .deadline import ServerDeadline
from .framing import (
    Frame,
    FrameDecoder,
    OversizedFrame,
    TransportType,
    encode_like,
)
from .handler import Decode, Handler, MethodTable
from .metrics import MetricsMiddleware, RpcMetrics
from .pipeline import Middleware, Pipeline
from .theader import DEFAULT_LIMITS, HeaderLimits, encode_frame
from .tracing import TracerHook, Tracing

RECV_BUFFER_SIZE = 64 * 1024
# Frames queued before a write is forced within a loop iteration (see _write).
_FLUSH_FRAMES = 8

log = structlog.get_logger("meshkit.rpc.server")

# Sent unsolicited to meshkit clients when a drain starts (seq id 0 is never a call's).
GOAWAY_FRAME = encode_frame(b"", seqid=0, headers={GOAWAY_KEY: "1"})
# The answer to a meshkit client's first frame: this server honours cancel frames.
FEATURES_FRAME = encode_frame(b"", seqid=0, headers={FEATURES_KEY: CANCEL_FEATURE})

DEFAULT_MAX_FRAME = 16 * 1024 * 1024

# TApplicationException types; 11 and 12 are fbthrift's LOADSHEDDING and TIMEOUT.
_APP_EXC_TYPE = {
    StatusCode.UNIMPLEMENTED: TApplicationException.UNKNOWN_METHOD,
    StatusCode.INVALID_ARGUMENT: TApplicationException.PROTOCOL_ERROR,
    StatusCode.RESOURCE_EXHAUSTED: 11,
    StatusCode.DEADLINE_EXCEEDED: 12,
}


def application_exception(error: MeshkitError) -> TApplicationException:
    kind = _APP_EXC_TYPE.get(error.code, TApplicationException.INTERNAL_ERROR)
    return TApplicationException(kind, f"[{error.code.value}] {error.message}")


class RpcServer:
    """Serve one Thrift service on one port.

    ``middlewares`` replaces the default server chain
    (decode → deadline → concurrency → tracing → metrics → accesslog) when given;
    :meth:`default_middlewares` builds the defaults for you to extend.
    """

    def __init__(
        self,
        service: Any,
        implementation: Any,
        *,
        name: str,
        middlewares: Sequence[Middleware] | None = None,
        max_frame_size: int = DEFAULT_MAX_FRAME,
        header_limits: HeaderLimits = DEFAULT_LIMITS,
        max_concurrency: int = 1024,
        max_pending_per_connection: int = 1024,
        default_timeout: float | None = None,
        executor: Executor | None = None,
        max_workers: int = 32,
        tracer: TracerHook | None = None,
        metrics_registry: CollectorRegistry | None = None,
        adaptive_concurrency: bool = False,
    ) -> None:
        self.name = name
        self.metrics_registry = metrics_registry
        self.table = MethodTable(service, implementation)
        self.max_frame_size = max_frame_size
        self.header_limits = header_limits
        self.max_pending_per_connection = max_pending_per_connection
        self._own_executor = executor is None
        self.executor = executor or ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix=f"meshkit-{name}"
        )
        self.metrics = RpcMetrics.get("server", metrics_registry)
        if middlewares is None:
            middlewares = self.default_middlewares(
                max_concurrency=max_concurrency,
                default_timeout=default_timeout,
                tracer=tracer,
                adaptive_concurrency=adaptive_concurrency,
            )
        self.pipeline = Pipeline(
            middlewares, Handler(self.table, self.executor), terminal_name="handler"
        )
        self.connections: set[ServerConnection] = set()
        self.in_flight = 0
        self.draining = False
        # How long a drain waits for meshkit clients to close their connections.
        self.client_close_grace = 1.0
        self._idle = asyncio.Event()
        self._idle.set()
        self._server: asyncio.base_events.Server | None = None
        self._port: int | None = None
        self._connections_gauge = self.metrics.connections.labels(name)

    def default_middlewares(
        self,
        *,
        max_concurrency: int = 1024,
        default_timeout: float | None = None,
        tracer: TracerHook | None = None,
        adaptive_concurrency: bool = False,
    ) -> list[Middleware]:
        """The default server chain; ``adaptive_concurrency`` swaps the fixed limit for
        :class:`~meshkit.rpc.adaptive.AdaptiveLimit` (Gradient2) capped at ``max_concurrency``.
        """
        if tracer is None:
            from ..tracing.otel import OTelHook

            tracer = OTelHook()
        limit: Middleware = (
            AdaptiveLimit(
                max_limit=max_concurrency,
                initial=min(64, max_concurrency),
                min_limit=min(4, max_concurrency),
                service=self.name,
                metrics_registry=self.metrics_registry,
            )
            if adaptive_concurrency
            else ConcurrencyLimit(max_concurrency)
        )
        return [
            Decode(self.table),
            ServerDeadline(default_timeout),  # before the limit: it sees deadline drops
            limit,
            Tracing(tracer, "server"),
            MetricsMiddleware(self.metrics, self.name),
            AccessLog("server"),
        ]

    # -- lifecycle -------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Bind and start accepting connections."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: ServerConnection(self), host, port, reuse_address=True, backlog=1024
        )
        self._port = int(self._server.sockets[0].getsockname()[1])

    @property
    def port(self) -> int:
        """The bound port (still known after the server closed)."""
        if self._port is None:
            raise RuntimeError("the server has not started")
        return self._port

    @property
    def serving(self) -> bool:
        return self._server is not None and self._server.is_serving()

    async def drain(self, timeout: float) -> bool:
        """Stop accepting, answer every call already received, then close connections.

        meshkit clients are told to go away (a ``meshkit-goaway`` frame, and the same
        header on every reply): they stop sending on the connection and close it
        themselves once their calls are answered, so no request is ever caught by a
        server-side close. Calls that still arrive on open connections are served.
        Other clients' connections are closed as soon as they are idle. Returns
        ``True`` when every call finished within ``timeout``.
        """
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.start_drain()
        # Until every connection is gone: serve what is in flight (to the deadline), and
        # give meshkit clients a moment after their last reply to close their side. A call
        # that arrives meanwhile (sent before the goaway reached its client) is served
        # too, not cut off by the close while time is left.
        grace_end = loop.time() + self.client_close_grace
        while self.connections or self.in_flight:
            now = loop.time()
            if now >= deadline or (not self.in_flight and now >= grace_end):
                break
            if self.in_flight:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._idle.wait(), deadline - now)
            else:
                await asyncio.sleep(0.01)
        finished = not self.in_flight
        if not finished:
            log.warning(
                "drain timed out", service=self.name, timeout=timeout, in_flight=self.in_flight
            )
        await self.close()
        return finished

    async def close(self) -> None:
        """Close at once: calls still running are cancelled."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.abort_calls()
            conn.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None
        if self._own_executor:
            self.executor.shutdown(wait=False, cancel_futures=True)

    # -- bookkeeping used by connections ----------------------------------

    def _call_started(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def _call_finished(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()


class ServerConnection(asyncio.BufferedProtocol):
    """One client connection: frame decoding, request tasks, batched replies."""

    def __init__(self, server: RpcServer) -> None:
        self.server = server
        self.decoder = FrameDecoder(
            max_frame_size=server.max_frame_size, header_limits=server.header_limits
        )
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        # Request tasks and their frame seq ids (for cancel frames).
        self.tasks: dict[asyncio.Task[None], int] = {}
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._reading_paused = False
        self._writing_paused = False
        self._closing = False
        self._eof = False
        self.meshkit_peer = False  # a meshkit client: it understands a goaway frame
        self._loop = asyncio.get_event_loop()
        self._rview = memoryview(bytearray(RECV_BUFFER_SIZE))

    # -- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses but behave as one.
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "")
        self.server.connections.add(self)
        self.server._connections_gauge.inc()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self in self.server.connections:
            self.server.connections.discard(self)
            self.server._connections_gauge.dec()
        # The caller is gone: nobody can receive these replies.
        for task in list(self.tasks):
            task.cancel()

    def get_buffer(self, sizehint: int) -> memoryview:
        # One preallocated receive buffer: the default Protocol path allocates
        # (and, at 256 KiB, mmaps) a fresh bytes object for every recv.
        return self._rview

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._rview[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        if self._closing:
            return
        decoder = self.decoder
        try:
            frames = decoder.feed(data)
        except FrameError as exc:
            for frame in decoder.completed:  # the calls before the bad data are served
                self._dispatch(frame)
            self._refuse_rejected()
            if isinstance(exc, OversizedFrame):
                self._reject_stream(exc, seqid=exc.seqid, transport_type=exc.transport)
            else:
                self._reject_stream(exc, seqid=None, transport_type=None)
            return
        for frame in frames:
            self._dispatch(frame)
        if decoder.rejected:
            self._refuse_rejected()

    def _refuse_rejected(self) -> None:
        """Answer each THeader frame whose header block the decoder refused with its error;
        the connection and the other calls on it go on."""
        rejected, self.decoder.rejected = self.decoder.rejected, []
        for exc in rejected:
            log.warning("refused a frame", peer=self.peer, error=exc.message)
            if exc.seqid is None:
                continue
            payload = encode_message(
                "", TMessageType.EXCEPTION, exc.seqid, application_exception(exc), 0
            )
            headers = {STATUS_KEY: exc.code.value}
            self._write(
                encode_like(TransportType.HEADER, 0, payload, seqid=exc.seqid, headers=headers)
            )

    def eof_received(self) -> bool:
        """The client half-closed: answer what it already sent, then close."""
        self._eof = True
        if not self.tasks:
            self._flush()
            return False
        return True  # keep the write side open until the calls finish

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._update_reading()

    # -- requests ---------------------------------------------------------

    def _dispatch(self, frame: Frame) -> None:
        seqid = frame.seqid if frame.seqid is not None else 0
        headers = frame.headers
        if headers and CANCEL_KEY in headers and not frame.payload:
            self._cancel(frame.seqid)
            return
        # Before the message is read: a client announces its features on its first frame
        # only, and that frame may be refused (an unknown method, say).
        if not self.meshkit_peer and headers and frame.transport is TransportType.HEADER:
            if FEATURES_KEY in headers:
                self.meshkit_peer = True
                self._write(FEATURES_FRAME)
            elif CALLER_KEY in headers or TIMEOUT_KEY in headers:
                self.meshkit_peer = True
        try:
            reader = read_message(frame.payload, frame.protocol_id)
        except FrameError as exc:
            log.warning("malformed message", peer=self.peer, error=str(exc))
            self._reply_error(frame, "", seqid, exc)
            return
        if frame.seqid is None:
            seqid = reader.seqid
        if reader.mtype not in (TMessageType.CALL, TMessageType.ONEWAY):
            self._reply_error(
                frame,
                reader.name,
                seqid,
                InvalidArgument(f"expected a CALL or ONEWAY message, found type {reader.mtype}"),
            )
            return
        spec = self.server.table.get(reader.name)
        if spec is None:
            self._reply_error(
                frame, reader.name, seqid, self.server.table.unknown_method(reader.name)
            )
            return
        ctx = CallContext(
            service=self.server.name,
            method=reader.name,
            headers=headers,
            peer=self.peer,
            caller=headers.get(CALLER_KEY, "") if headers else "",
            oneway=spec.oneway,
            raw=reader,
        )
        self.server._call_started()
        task = self._loop.create_task(self._run(ctx, frame, seqid, reader.seqid))
        self.tasks[task] = seqid
        task.add_done_callback(self._call_done)
        self._update_reading()

    def _cancel(self, seqid: int | None) -> None:
        """A meshkit client stopped waiting for call ``seqid``: stop its handler."""
        if not seqid:
            return
        for task, task_seqid in self.tasks.items():
            if task_seqid == seqid:
                task.cancel()
                return

    async def _run(self, ctx: CallContext, frame: Frame, seqid: int, msg_seqid: int) -> None:
        try:
            result = await self.server.pipeline(ctx)
            if ctx.oneway:
                return
            try:
                payload = encode_message(
                    ctx.method, TMessageType.REPLY, msg_seqid, result, frame.protocol_id
                )
            except Exception as exc:
                log.error(
                    "handler returned a value that does not match the IDL",
                    service=self.server.name,
                    method=ctx.method,
                    error=f"{type(exc).__name__}: {exc}",
                )
                raise MeshkitError(
                    f"{ctx.method} returned a value that does not match its IDL type"
                ) from None
        except asyncio.CancelledError:
            return
        except MeshkitError as exc:
            if ctx.oneway:
                return
            ctx.response_headers[STATUS_KEY] = exc.code.value
            payload = self._exception_payload(
                ctx.method, msg_seqid, frame, application_exception(exc)
            )
        except TApplicationException as exc:
            if ctx.oneway:
                return
            payload = self._exception_payload(ctx.method, msg_seqid, frame, exc)
        except (Exception, SystemExit, KeyboardInterrupt) as exc:
            # SystemExit/KeyboardInterrupt raised by a handler (sys.exit() in a library, say)
            # fail that call; let out of this task they would end the server's event loop.
            log.exception(
                "unhandled exception in handler", service=self.server.name, method=ctx.method
            )
            if ctx.oneway:
                return
            ctx.response_headers[STATUS_KEY] = StatusCode.INTERNAL.value
            message = (
                f"[INTERNAL] {ctx.method} failed with an unexpected {type(exc).__name__}; "
                "details are in the server log"
            )
            payload = self._exception_payload(
                ctx.method,
                msg_seqid,
                frame,
                TApplicationException(TApplicationException.INTERNAL_ERROR, message),
            )
        if self.server.draining:
            ctx.response_headers[GOAWAY_KEY] = "1"
        try:
            reply = encode_like(
                frame.transport,
                frame.protocol_id,
                payload,
                seqid=seqid,
                headers=ctx.response_headers,
                transforms=frame.transforms,
            )
        except Exception as exc:  # e.g. a middleware set a header that is not text
            reply = self._unframable_reply(ctx, frame, seqid, msg_seqid, exc)
        if len(reply) > self.server.max_frame_size + 4:
            # A client reading with the same limit would drop the connection, failing every
            # call on it: only this call fails.
            too_big = FrameError(
                f"a reply of {len(reply) - 4} bytes exceeds the frame limit of "
                f"{self.server.max_frame_size} bytes"
            )
            reply = self._unframable_reply(ctx, frame, seqid, msg_seqid, too_big, public=True)
        self._write(reply)

    def _unframable_reply(
        self,
        ctx: CallContext,
        frame: Frame,
        seqid: int,
        msg_seqid: int,
        exc: Exception,
        public: bool = False,
    ) -> bytes:
        """An INTERNAL answer for a call whose reply could not be framed (the caller would
        otherwise wait for its deadline), carrying no header but the status. ``public``:
        ``exc``'s text holds no data of the call and goes to the caller too."""
        log.error(
            "reply could not be framed",
            service=self.server.name,
            method=ctx.method,
            error=f"{type(exc).__name__}: {exc}",
        )
        if public:
            detail = getattr(exc, "message", str(exc))
        else:
            detail = f"{type(exc).__name__}; details are in the server log"
        message = f"[INTERNAL] the reply of {ctx.method} could not be framed ({detail})"
        payload = self._exception_payload(
            ctx.method,
            msg_seqid,
            frame,
            TApplicationException(TApplicationException.INTERNAL_ERROR, message),
        )
        headers = {STATUS_KEY: StatusCode.INTERNAL.value}
        if self.server.draining:
            headers[GOAWAY_KEY] = "1"
        return encode_like(
            frame.transport,
            frame.protocol_id,
            payload,
            seqid=seqid,
            headers=headers,
            transforms=frame.transforms,
        )

    def _call_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.pop(task, None)
        self.server._call_finished()
        self._update_reading()
        if self.server.draining or self._eof:
            self.drain_if_idle()

    @staticmethod
    def _exception_payload(
        method: str, msg_seqid: int, frame: Frame, exc: TApplicationException
    ) -> bytes:
        return encode_message(method, TMessageType.EXCEPTION, msg_seqid, exc, frame.protocol_id)

    def _reply_error(self, frame: Frame, method: str, seqid: int, error: MeshkitError) -> None:
        headers = {STATUS_KEY: error.code.value}
        payload = self._exception_payload(method, seqid, frame, application_exception(error))
        self._write(
            encode_like(frame.transport, frame.protocol_id, payload, seqid=seqid, headers=headers)
        )

    def _reject_stream(
        self, error: FrameError, *, seqid: int | None, transport_type: TransportType | None
    ) -> None:
        """The byte stream cannot be followed any further: answer if we can, read nothing
        more, let the calls already running answer, then close."""
        log.warning("closing connection after a bad frame", peer=self.peer, error=error.message)
        if seqid is not None and transport_type is TransportType.HEADER:
            # goaway: this connection closes next, the client must not send on it again.
            headers = {STATUS_KEY: error.code.value, GOAWAY_KEY: "1"}
            payload = encode_message(
                "", TMessageType.EXCEPTION, seqid, application_exception(error), 0
            )
            self._write(encode_like(transport_type, 0, payload, seqid=seqid, headers=headers))
        self._flush()
        self._closing = True  # no more reading
        transport = self.transport
        if transport is None:
            return
        running = list(self.tasks)
        if not running:
            transport.close()
            return
        transport.pause_reading()

        def close(_: object) -> None:
            self._flush()
            transport.close()

        asyncio.gather(*running, return_exceptions=True).add_done_callback(close)

    # -- output and flow control ------------------------------------------

    def _write(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        out = self._out
        out.append(data)
        # Replies leave in small batches: one write per loop iteration would make the
        # peer wait for the whole batch, so client and server would take turns instead
        # of working at once (measured with bench/rpc.py at C=16 on 2 cores: about 6k
        # calls/s with one write per iteration, 14k-17k with a write every 8 frames;
        # 1, 2, 4, 12 and 16 frames, and half the calls in flight, all did worse).
        if len(out) >= _FLUSH_FRAMES:
            self._flush()
            return
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._out or self.transport is None or self.transport.is_closing():
            self._out.clear()
            return
        data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out.clear()
        self.transport.write(data)

    def _update_reading(self) -> None:
        if self.transport is None or self._closing:
            return
        should_pause = self._writing_paused or (
            len(self.tasks) >= self.server.max_pending_per_connection
        )
        if should_pause and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        elif not should_pause and self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()

    # -- shutdown -----------------------------------------------------------

    def start_drain(self) -> None:
        """Tell a meshkit client to go away; close other idle connections now."""
        if self.meshkit_peer and self.transport is not None and not self._closing:
            self._write(GOAWAY_FRAME)
            self._flush()
            return
        self.drain_if_idle()

    def drain_if_idle(self) -> None:
        """While draining, close this connection once it has no call in progress.

        A meshkit client closes its side itself after the goaway; the server
        closes what is left when the drain ends.
        """
        if self.meshkit_peer and self.server.draining and not self._eof:
            return
        if not self.tasks and not self._out and self.transport is not None:
            self._closing = True
            self.transport.close()

    def abort_calls(self) -> None:
        for task in list(self.tasks):
            task.cancel()

    def close(self) -> None:
        if self.transport is not None:
            self._flush()
            self._closing = True
            self.transport.close()
