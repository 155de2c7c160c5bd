"""A multiplexed client connection and the per-endpoint connection pool.

Many calls share one connection: each request carries a seq id, replies are
matched by it in any order. A call's timeout is one timer on the loop (no
per-read ``wait_for``). Writes made in the same loop iteration leave in one
``write`` call.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable

import structlog

from ..errors import DeadlineExceeded, FrameError, Internal, Unavailable
from .context import CANCEL_FEATURE, CANCEL_KEY, FEATURES_KEY, GOAWAY_KEY
from .endpoint import Endpoint
from .framing import Frame, FrameDecoder
from .theader import DEFAULT_LIMITS, HeaderLimits, encode_frame
from .timers import DeadlineTimers

RECV_BUFFER_SIZE = 64 * 1024
# Frames queued before a write is forced within a loop iteration.
_FLUSH_FRAMES = 8

log = structlog.get_logger("meshkit.rpc.client")

_SEQ_MASK = 0x7FFFFFFF


class ConnectionUnavailable(Unavailable):
    """The call could not be handed to the peer. ``sent`` says whether bytes left."""

    def __init__(self, message: str, *, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent


class ClientConnection(asyncio.BufferedProtocol):
    """One TCP connection to one endpoint, carrying many calls at once."""

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        service: str,
        max_frame_size: int,
        header_limits: HeaderLimits = DEFAULT_LIMITS,
        on_close: Callable[[ClientConnection], None] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.service = service
        self.decoder = FrameDecoder(max_frame_size=max_frame_size, header_limits=header_limits)
        self.pending: dict[int, asyncio.Future[Frame]] = {}
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.goaway = False
        # Whether this connection told the server what it supports (first frame), and
        # whether the server said it honours per-call cancel frames.
        self.announced = False
        self.peer_cancels = False
        self._on_close = on_close
        self._seqid = 0
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._loop = asyncio.get_event_loop()
        self._timers: DeadlineTimers[int] = DeadlineTimers(self._expire, self._loop)
        self._rview = memoryview(bytearray(RECV_BUFFER_SIZE))
        self._close_reason = "connection closed"

    @property
    def usable(self) -> bool:
        """Open and not asked by the server to go away."""
        return not self.closed and not self.goaway

    # -- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses but behave as one.
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get_buffer(self, sizehint: int) -> memoryview:
        # One preallocated receive buffer: the default Protocol path allocates
        # (and, at 256 KiB, mmaps) a fresh bytes object for every recv.
        return self._rview

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._rview[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        try:
            frames = self.decoder.feed(data)
        except FrameError as exc:
            self._fail_all(f"{self.endpoint.address} sent a malformed frame: {exc}", sent=True)
            self.close()
            return
        pending = self.pending
        if self.decoder.rejected:
            self._fail_rejected()
        for frame in frames:
            if frame.seqid is None:
                # Legacy transports carry the seq id only inside the message; a
                # THeader server always echoes it in the frame.
                self._fail_all(f"{self.endpoint.address} replied without THeader", sent=True)
                self.close()
                return
            fut = pending.pop(frame.seqid, None)
            if fut is not None and not fut.done():
                fut.set_result(frame)
            headers = frame.headers
            if headers:
                if GOAWAY_KEY in headers:
                    self.goaway = True
                features = headers.get(FEATURES_KEY)
                if features is not None:
                    self.peer_cancels = CANCEL_FEATURE in features.split(",")
        if self.goaway and not self.pending:
            self.close()

    def _fail_rejected(self) -> None:
        """Replies whose header block the decoder refused fail their own calls only."""
        rejected, self.decoder.rejected = self.decoder.rejected, []
        for exc in rejected:
            fut = self.pending.pop(exc.seqid, None) if exc.seqid is not None else None
            if fut is not None and not fut.done():
                fut.set_exception(
                    Internal(
                        f"{self.endpoint.address} sent a reply whose header block was refused: "
                        f"{exc.message}"
                    )
                )

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        reason = self._close_reason if exc is None else f"{type(exc).__name__}: {exc}"
        self._fail_all(f"connection to {self.endpoint.address} lost ({reason})", sent=True)
        if self._on_close is not None:
            self._on_close(self)

    # -- calls ------------------------------------------------------------

    def next_seqid(self) -> int:
        # Seq id 0 is reserved for frames the server sends on its own (goaway).
        self._seqid = (self._seqid & _SEQ_MASK) % _SEQ_MASK + 1
        return self._seqid

    def send(self, seqid: int, frame: bytes, deadline: float | None) -> asyncio.Future[Frame]:
        """Write one request frame; return the future of its reply.

        The caller calls :meth:`settle` once the future is done (cheaper than a
        done-callback, which would cost the loop one more scheduled handle per call).
        """
        if not self.usable:
            raise ConnectionUnavailable(
                f"connection to {self.endpoint.address} is closing", sent=False
            )
        fut: asyncio.Future[Frame] = self._loop.create_future()
        self.pending[seqid] = fut
        if deadline is not None:
            timers = self._timers  # timers.add(), inlined: this runs on every call
            timers[seqid] = deadline
            if deadline < timers.next_fire:
                timers.arm(deadline)
        self._write(frame)
        return fut

    def settle(self, seqid: int) -> None:
        """The caller is done with ``seqid``: drop its deadline."""
        self._timers.pop(seqid, None)

    def send_oneway(self, frame: bytes) -> None:
        if not self.usable:
            raise ConnectionUnavailable(
                f"connection to {self.endpoint.address} is closing", sent=False
            )
        self._write(frame)

    def forget(self, seqid: int) -> None:
        """Drop a call whose caller stopped waiting (e.g. cancelled).

        A meshkit server that said it honours cancel frames is told, so it stops
        the handler instead of finishing work nobody will read.
        """
        if self.pending.pop(seqid, None) is not None and self.peer_cancels and self.usable:
            self._write(encode_frame(b"", seqid=seqid, headers={CANCEL_KEY: "1"}))
        if self.goaway and not self.pending:
            self.close()

    def _expire(self, seqid: int) -> None:
        fut = self.pending.pop(seqid, None)
        if fut is not None and not fut.done():
            fut.set_exception(
                DeadlineExceeded(
                    f"no reply from {self.service} at {self.endpoint.address} within the deadline"
                )
            )

    def _fail_all(self, message: str, *, sent: bool) -> None:
        self._timers.close()
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(ConnectionUnavailable(message, sent=sent))

    def _write(self, data: bytes) -> None:
        out = self._out
        out.append(data)
        # Small batches, so the server starts on the first requests while later ones
        # are still being encoded (see ServerConnection._write for the measurements).
        if len(out) >= _FLUSH_FRAMES:
            self._flush()
            return
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out = self._out
        if not out:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self._flush()
            self.transport.close()
        self.closed = True


class ConnectionPool:
    """Connections per endpoint, opened lazily, shared by all calls of a client."""

    def __init__(
        self,
        *,
        service: str,
        connect_timeout: float = 1.0,
        connections_per_endpoint: int = 1,
        max_frame_size: int = 16 * 1024 * 1024,
        header_limits: HeaderLimits = DEFAULT_LIMITS,
        on_count_change: Callable[[int], None] | None = None,
    ) -> None:
        self.service = service
        self.connect_timeout = connect_timeout
        self.size = max(1, connections_per_endpoint)
        self.max_frame_size = max_frame_size
        self.header_limits = header_limits
        self._conns: dict[tuple[str, int], list[ClientConnection]] = {}
        self._connecting: dict[tuple[str, int], asyncio.Future[ClientConnection]] = {}
        self._on_count_change = on_count_change
        self._closed = False

    def _count(self) -> int:
        return sum(len(v) for v in self._conns.values())

    def get_ready(self, endpoint: Endpoint) -> ClientConnection | None:
        """A usable open connection to ``endpoint`` without waiting, if there is one."""
        conns = self._conns.get((endpoint.host, endpoint.port))
        if not conns:
            return None
        best: ClientConnection | None = None
        for conn in conns:
            if conn.usable and (best is None or len(conn.pending) < len(best.pending)):
                best = conn
        if best is not None and len(conns) < self.size and best.pending:
            return None  # room for another connection and this one is busy
        return best

    async def get(self, endpoint: Endpoint) -> ClientConnection:
        conn = self.get_ready(endpoint)
        if conn is not None:
            return conn
        key = (endpoint.host, endpoint.port)
        opening = self._connecting.get(key)
        if opening is None:
            # The connect runs in its own task shared by every caller that needs this
            # endpoint, so one caller being cancelled (a lost hedge, a timeout) does not
            # cancel the connect for the others.
            opening = asyncio.ensure_future(self._open(endpoint))
            self._connecting[key] = opening
            opening.add_done_callback(lambda _t: self._connecting.pop(key, None))
        return await asyncio.shield(opening)

    async def _open(self, endpoint: Endpoint) -> ClientConnection:
        if self._closed:
            raise ConnectionUnavailable(f"client for {self.service} is closed", sent=False)
        loop = asyncio.get_running_loop()
        try:
            _transport, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: ClientConnection(
                        endpoint,
                        service=self.service,
                        max_frame_size=self.max_frame_size,
                        header_limits=self.header_limits,
                        on_close=self._forget,
                    ),
                    endpoint.host,
                    endpoint.port,
                ),
                self.connect_timeout,
            )
        except TimeoutError:
            raise ConnectionUnavailable(
                f"could not connect to {self.service} at {endpoint.address} within "
                f"{self.connect_timeout:.2f} s",
                sent=False,
            ) from None
        except OSError as exc:
            raise ConnectionUnavailable(
                f"could not connect to {self.service} at {endpoint.address}: {exc.strerror or exc}",
                sent=False,
            ) from None
        key = (endpoint.host, endpoint.port)
        conns = self._conns.setdefault(key, [])
        conns[:] = [c for c in conns if not c.closed]
        conns.append(conn)
        if self._on_count_change is not None:
            self._on_count_change(self._count())
        return conn

    def _forget(self, conn: ClientConnection) -> None:
        key = (conn.endpoint.host, conn.endpoint.port)
        conns = self._conns.get(key)
        if conns and conn in conns:
            conns.remove(conn)
            if not conns:
                del self._conns[key]
            if self._on_count_change is not None:
                self._on_count_change(self._count())

    def retain_only(self, endpoints: set[tuple[str, int]]) -> None:
        """Close idle connections to endpoints that left discovery."""
        for key, conns in list(self._conns.items()):
            if key not in endpoints:
                for conn in list(conns):
                    if not conn.pending:
                        conn.close()

    async def close(self) -> None:
        self._closed = True
        for conns in list(self._conns.values()):
            for conn in list(conns):
                conn.close()
        self._conns.clear()
        await asyncio.sleep(0)
