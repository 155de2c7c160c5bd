"""Echo load generators for bench/rpc.py, one process per (implementation, loop).

    python bench/_clients.py IMPL LOOP --payloads 100,4096 --concurrency 1,16 \
        --duration S --warmup S --report-fd FD

Imports its libraries first, then reads ``<port> <server pid>`` from stdin (so its start-up
overlaps the server's), runs every (payload, concurrency) cell in turn and writes one JSON
object per cell to FD (stdout is left to the libraries' own logging). Async implementations
run all their cells on one event loop of the requested kind; nothing else shares it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from _common import (
    GRPC_METHOD,
    HOST,
    RAW_HDR,
    FrameProtocol,
    die_with_parent,
    err_text,
    grpc_messages,
    load_echo,
    loop_kind,
    machine_busy_seconds,
    pin_meshkit_loop,
    proc_cpu_seconds,
    run_loop,
)

SETUP_TIMEOUT = 15.0  # connecting C clients
DRAIN_TIMEOUT = 10.0  # in-flight calls after the window (every call has a 5 s timeout)
CALL_TIMEOUT = 5.0

AsyncCall = Callable[[Any], Awaitable[Any]]
SyncCall = Callable[[Any], Any]


class CellFailed(Exception):
    pass


def make_payload(impl: str, size: int) -> str | bytes:
    text = ("0123456789abcdefghijklmnopqrstuvwxyz" * (size // 36 + 1))[:size]
    return text.encode() if impl in ("grpcio_aio", "raw_asyncio") else text


# --- async clients: each returns (one callable per concurrent caller, async close) ---------


async def setup_meshkit(port: int, conc: int):
    from meshkit import Client

    echo = load_echo()
    client = Client(echo.Echo, "echo", addr=f"{HOST}:{port}", timeout=CALL_TIMEOUT)
    # one client object, multiplexed: every task calls through it
    return [client.echo] * conc, client.close


async def setup_thriftpy2_aio(port: int, conc: int):
    from thriftpy2.contrib.aio.protocol.binary import TAsyncBinaryProtocolFactory
    from thriftpy2.contrib.aio.rpc import make_client
    from thriftpy2.contrib.aio.transport.framed import TAsyncFramedTransportFactory

    echo = load_echo()
    clients = []
    try:
        # one in-flight call per connection: C client objects, one connection each
        for _ in range(conc):
            clients.append(
                await make_client(
                    echo.Echo,
                    HOST,
                    port,
                    proto_factory=TAsyncBinaryProtocolFactory(),
                    trans_factory=TAsyncFramedTransportFactory(),
                    timeout=int(CALL_TIMEOUT * 1000),
                    connect_timeout=int(CALL_TIMEOUT * 1000),
                )
            )
    except BaseException:
        for c in clients:
            c.close()
        raise

    async def close() -> None:
        for c in clients:
            c.close()

    return [c.echo for c in clients], close


async def setup_grpcio_aio(port: int, conc: int):
    import grpc

    req_cls, rep_cls = grpc_messages()
    channel = grpc.aio.insecure_channel(f"{HOST}:{port}")
    try:
        await asyncio.wait_for(channel.channel_ready(), SETUP_TIMEOUT)
    except BaseException:
        await channel.close()
        raise
    stub = channel.unary_unary(
        GRPC_METHOD,
        request_serializer=req_cls.SerializeToString,
        response_deserializer=rep_cls.FromString,
    )

    async def call(payload: bytes) -> bytes:
        reply = await stub(req_cls(message=payload), timeout=CALL_TIMEOUT)
        return reply.message

    # one channel (one HTTP/2 connection), multiplexed
    return [call] * conc, channel.close


class RawClientProtocol(FrameProtocol):
    """Pipelined length-prefixed frames on one connection; responses matched by id."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: dict[int, asyncio.Future] = {}
        self.next_id = 0
        self.loop = asyncio.get_running_loop()

    def connection_lost(self, exc) -> None:
        err = ConnectionError(f"raw_asyncio connection lost: {exc}")
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(err)
        self.pending.clear()

    def frames_received(self, frames: list[tuple[int, bytes]]) -> None:
        pending = self.pending
        for rid, payload in frames:
            fut = pending.pop(rid, None)
            if fut is not None and not fut.done():
                fut.set_result(payload)

    async def call(self, payload: bytes) -> bytes:
        rid = self.next_id
        self.next_id = (rid + 1) & 0xFFFFFFFF
        fut = self.loop.create_future()
        self.pending[rid] = fut
        self.transport.write(RAW_HDR.pack(4 + len(payload), rid) + payload)
        return await fut


async def setup_raw_asyncio(port: int, conc: int):
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_connection(RawClientProtocol, HOST, port)

    async def close() -> None:
        transport.close()

    return [proto.call] * conc, close


ASYNC_SETUPS = {
    "meshkit": setup_meshkit,
    "thriftpy2_aio": setup_thriftpy2_aio,
    "grpcio_aio": setup_grpcio_aio,
    "raw_asyncio": setup_raw_asyncio,
}


# --- sync clients: each returns (one callable per thread, close) ---------------------------


def setup_meshkit_sync(port: int, conc: int, loop: str):
    # SyncClient runs its own background loop; main() set MESHKIT_UVLOOP so that it is
    # the same kind as the server's. Check, where the loop can be seen.
    from meshkit import SyncClient

    echo = load_echo()
    client = SyncClient(echo.Echo, "echo", addr=f"{HOST}:{port}", timeout=CALL_TIMEOUT)
    bg_loop = getattr(getattr(client, "_runner", None), "loop", None)
    if isinstance(bg_loop, asyncio.AbstractEventLoop) and loop_kind(bg_loop) != loop:
        client.close()
        raise CellFailed(f"SyncClient runs on {loop_kind(bg_loop)}, not {loop}")
    # thread-safe and multiplexed: every thread calls through the one client
    return [client.echo] * conc, client.close


def setup_thriftpy2_sync(port: int, conc: int, loop: str):
    from thriftpy2.protocol import TCyBinaryProtocolFactory
    from thriftpy2.rpc import make_client
    from thriftpy2.transport import TCyFramedTransportFactory

    echo = load_echo()
    clients = []
    try:
        for _ in range(conc):  # one client (one connection) per thread
            clients.append(
                make_client(
                    echo.Echo,
                    HOST,
                    port,
                    proto_factory=TCyBinaryProtocolFactory(),
                    trans_factory=TCyFramedTransportFactory(),
                    timeout=int(CALL_TIMEOUT * 1000),
                )
            )
    except BaseException:
        for c in clients:
            c.close()
        raise

    def close() -> None:
        for c in clients:
            c.close()

    return [c.echo for c in clients], close


SYNC_SETUPS = {
    "meshkit_sync": setup_meshkit_sync,
    "thriftpy2_sync": setup_thriftpy2_sync,
}


# --- measurement -----------------------------------------------------------------------------


class Window:
    """The measured window: wall time, server/client/machine CPU at its start and end."""

    def __init__(self, server_pid: int) -> None:
        self.pid = server_pid

    def _snap(self) -> tuple[float, float, float, float]:
        return (
            proc_cpu_seconds(self.pid),
            time.process_time(),
            machine_busy_seconds(),
            time.perf_counter(),
        )

    def start(self) -> None:
        self.begin = self._snap()

    def stop(self) -> None:
        self.end = self._snap()


def summarize(lats: list[float], w: Window) -> dict[str, Any]:
    n = len(lats)
    if n == 0:
        raise CellFailed("no call completed in the measured window")
    lats.sort()
    server_cpu, client_cpu, busy, window = (b - a for a, b in zip(w.begin, w.end, strict=True))
    # whatever else ran on the machine meanwhile (other processes, steal): a noise gauge
    other = max(0.0, busy - server_cpu - client_cpu) / (window * (os.cpu_count() or 1))

    def pct(q: float) -> float:
        return lats[min(n - 1, max(0, math.ceil(q * n) - 1))] * 1e3

    return {
        "calls": n,
        "window_s": round(window, 4),
        "calls_per_s": round(n / window, 1),
        "p50_ms": round(pct(0.50), 4),
        "p99_ms": round(pct(0.99), 4),
        "server_cpu_us_per_call": round(server_cpu / n * 1e6, 2),
        "client_cpu_us_per_call": round(client_cpu / n * 1e6, 2),
        "other_cpu_pct": round(other * 100, 1),
    }


async def _run_for(tasks: list[asyncio.Task], seconds: float) -> None:
    """Let the workers run for `seconds`; raise at once if one of them fails."""
    done, _ = await asyncio.wait(tasks, timeout=seconds, return_when=asyncio.FIRST_EXCEPTION)
    for t in done:
        exc = t.exception()
        if exc is not None:
            raise exc
        raise CellFailed("worker stopped early")


async def async_cell(
    impl: str, port: int, pid: int, payload: Any, conc: int, warmup: float, duration: float
) -> dict[str, Any]:
    callers, close = await asyncio.wait_for(ASYNC_SETUPS[impl](port, conc), SETUP_TIMEOUT)
    lats: list[float] = []
    rec = False
    stop = False
    perf = time.perf_counter

    async def worker(call: AsyncCall) -> None:
        append = lats.append
        while not stop:
            t0 = perf()
            got = await call(payload)
            t1 = perf()
            if got != payload:
                raise CellFailed(f"echo mismatch: sent {len(payload)} chars, got {got!r:.60}")
            if rec:
                append(t1 - t0)

    tasks = [asyncio.ensure_future(worker(c)) for c in callers]
    try:
        await _run_for(tasks, warmup)
        window = Window(pid)
        window.start()
        rec = True
        await _run_for(tasks, duration)
        rec = False
        window.stop()
        stop = True
        _, pending = await asyncio.wait(tasks, timeout=DRAIN_TIMEOUT)
        if pending:
            raise CellFailed(
                f"{len(pending)} calls still in flight {DRAIN_TIMEOUT} s after the end"
            )
        for t in tasks:
            if t.exception() is not None:
                raise t.exception()
        return summarize(lats, window)
    finally:
        stop = True
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.wait_for(close(), SETUP_TIMEOUT)


def sync_cell(
    impl: str,
    loop: str,
    port: int,
    pid: int,
    payload: Any,
    conc: int,
    warmup: float,
    duration: float,
) -> dict[str, Any]:
    callers, close = SYNC_SETUPS[impl](port, conc, loop)
    lats: list[float] = []
    errors: list[BaseException] = []
    failed = threading.Event()
    flags = {"rec": False, "stop": False}
    perf = time.perf_counter

    def worker(call: SyncCall) -> None:
        append = lats.append
        try:
            while not flags["stop"]:
                t0 = perf()
                got = call(payload)
                t1 = perf()
                if got != payload:
                    raise CellFailed(f"echo mismatch: sent {len(payload)} chars, got {got!r:.60}")
                if flags["rec"]:
                    append(t1 - t0)
        except BaseException as exc:
            errors.append(exc)
            failed.set()

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in callers]
    try:
        for t in threads:
            t.start()
        if failed.wait(warmup):
            raise errors[0]
        window = Window(pid)
        window.start()
        flags["rec"] = True
        if failed.wait(duration):
            raise errors[0]
        flags["rec"] = False
        window.stop()
        flags["stop"] = True
        deadline = time.monotonic() + DRAIN_TIMEOUT
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in threads):
            raise CellFailed(f"calls still in flight {DRAIN_TIMEOUT} s after the end")
        if errors:
            raise errors[0]
        return summarize(lats, window)
    finally:
        flags["stop"] = True
        close()


def prepare(impl: str) -> None:
    """Import what the cells need before the server is up, so start-ups overlap."""
    load_echo()
    if impl in ("meshkit", "meshkit_sync"):
        from meshkit import Client, SyncClient  # noqa: F401

        try:  # as inside a service (Service.run() configures logging); best effort
            from meshkit.logs import configure_logging

            configure_logging(service="bench-client")
        except Exception as exc:
            print(f"bench: meshkit logging not configured: {err_text(exc)}", file=sys.stderr)
    elif impl == "grpcio_aio":
        import grpc.aio  # noqa: F401

        grpc_messages()
    elif impl == "thriftpy2_aio":
        import thriftpy2.contrib.aio.rpc
    elif impl == "thriftpy2_sync":
        import thriftpy2.rpc  # noqa: F401


def main() -> int:
    die_with_parent()
    ap = argparse.ArgumentParser()
    ap.add_argument("impl", choices=[*ASYNC_SETUPS, *SYNC_SETUPS])
    ap.add_argument("loop")
    ap.add_argument("--payloads", default="100,4096")
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--duration", type=float, required=True)
    ap.add_argument("--warmup", type=float, required=True)
    ap.add_argument("--report-fd", type=int, required=True)
    args = ap.parse_args()
    impl, loop = args.impl, args.loop
    pin_meshkit_loop(loop)
    report = os.fdopen(args.report_fd, "w", buffering=1, encoding="utf-8")
    cells = [
        (int(p), int(c)) for p in args.payloads.split(",") for c in args.concurrency.split(",")
    ]

    prep_error = None
    try:
        prepare(impl)
    except Exception as exc:
        prep_error = err_text(exc)

    line = sys.stdin.readline().split()
    if len(line) != 2:
        return 2  # the server never came up; the parent reports why
    port, pid = int(line[0]), int(line[1])

    def emit(size: int, conc: int, result: dict[str, Any] | None, error: str | None) -> None:
        cell = {"impl": impl, "loop": loop, "payload": size, "concurrency": conc}
        cell.update(result or {})
        cell["error"] = error
        report.write(json.dumps(cell) + "\n")
        report.flush()

    def run_all(run_cell: Callable[[int, int], dict[str, Any]]) -> None:
        for size, conc in cells:
            if prep_error is not None:
                emit(size, conc, None, prep_error)
                continue
            try:
                emit(size, conc, run_cell(size, conc), None)
            except Exception as exc:
                emit(size, conc, None, err_text(exc))

    if impl in SYNC_SETUPS:
        run_all(
            lambda size, conc: sync_cell(
                impl,
                loop,
                port,
                pid,
                make_payload(impl, size),
                conc,
                args.warmup,
                args.duration,
            )
        )
    else:
        # One loop for all this implementation's cells (grpc.aio does not like loop changes).
        async def all_cells() -> None:
            async def one(size: int, conc: int) -> dict[str, Any]:
                return await async_cell(
                    impl, port, pid, make_payload(impl, size), conc, args.warmup, args.duration
                )

            for size, conc in cells:
                if prep_error is not None:
                    emit(size, conc, None, prep_error)
                    continue
                try:
                    emit(size, conc, await one(size, conc), None)
                except Exception as exc:
                    emit(size, conc, None, err_text(exc))

        run_loop(all_cells, loop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
