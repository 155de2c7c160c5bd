"""Handler and reply failures that must fail one call, never the server or the caller's wait:
a handler raising SystemExit (sync or async), a reply that cannot be framed."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path
from typing import Any

import pytest
import thriftpy2
from prometheus_client import CollectorRegistry
from waiting import wait_until

from meshkit import Client, Internal, InvalidArgument, Unimplemented
from meshkit.rpc.context import CallContext
from meshkit.rpc.pipeline import Next

ECHO_IDL = Path(__file__).resolve().parents[2] / "examples" / "echo" / "echo.thrift"


class ExitingImpl:
    """``sys.exit()`` from a plain-def (thread pool) and an async handler."""

    def reverse(self, message: str) -> str:
        if message == "exit":
            sys.exit(2)
        return message[::-1]

    async def echo(self, message: str) -> str:
        if message == "exit":
            raise SystemExit(3)
        return message

    async def slow(self, delay_ms: int) -> int:
        return delay_ms

    async def ping(self) -> None:
        return None


@pytest.mark.parametrize("method", ["reverse", "echo"])
async def test_system_exit_in_a_handler_fails_only_that_call(
    start_server: Any, make_client: Any, method: str
) -> None:
    running = await start_server(ExitingImpl())
    client = make_client(running.addr)
    with pytest.raises(Internal, match=f"{method} failed with an unexpected SystemExit"):
        await getattr(client, method)("exit")
    assert await client.echo("still serving") == "still serving"


class BadResponseHeader:
    """A middleware that sets a response header the frame cannot carry."""

    name = "bad-header"

    def __init__(self, value: Any) -> None:
        self.value = value

    async def __call__(self, ctx: CallContext, call_next: Next) -> Any:
        result = await call_next(ctx)
        if ctx.method == "echo" and ctx.args.message == "bad":
            ctx.response_headers["x-bad"] = self.value
        return result


@pytest.mark.parametrize("value", [42, "v" * 300_000], ids=["not-text", "too-big"])
async def test_a_reply_that_cannot_be_framed_is_answered_internal(
    start_server: Any, make_client: Any, value: Any
) -> None:
    probe = await start_server()
    chain = [*probe.server.pipeline.middlewares, BadResponseHeader(value)]
    running = await start_server(middlewares=chain)
    client = make_client(running.addr, timeout=5.0)
    # without an answer the call would fail DEADLINE_EXCEEDED after its 5 s
    with pytest.raises(Internal, match="the reply of echo could not be framed"):
        await client.echo("bad")
    assert await client.echo("fine") == "fine"


async def test_drain_serves_a_call_that_arrives_after_it_started(
    start_server: Any, make_client: Any
) -> None:
    """A call already on its way when the drain starts (the goaway has not reached its
    client) and longer than ``client_close_grace`` is served within the drain timeout, not
    cancelled when the grace ends; drain() says it finished."""
    running = await start_server()
    running.server.client_close_grace = 0.2
    client = make_client(running.addr, timeout=10.0)
    assert await client.echo("warm") == "warm"  # an open connection from a meshkit peer
    call = asyncio.create_task(client.slow(1000))  # leaves on the client's next flush
    await asyncio.sleep(0)  # the call task runs up to its send
    drained = asyncio.create_task(running.server.drain(timeout=30))
    assert await call == 1000
    assert await drained is True
    assert not running.impl.slow_cancelled.is_set()


async def test_cancel_works_after_a_first_call_to_an_unknown_method(
    start_server: Any, tmp_path: Path
) -> None:
    """Rolling deploy: a client built from a newer IDL first calls a method the server
    lacks. Its features are announced on that first frame only; the server must still
    take them, so a call the caller gives up on is cancelled on the server too."""
    idl = tmp_path / "echo_v2.thrift"
    idl.write_text(ECHO_IDL.read_text() + "\nservice EchoV2 extends Echo { string newer() }\n")
    v2 = thriftpy2.load(str(idl), module_name="echo_v2_hardening_thrift")
    running = await start_server()
    client = Client(
        v2.EchoV2, "echo", addr=running.addr, timeout=30.0, metrics_registry=CollectorRegistry()
    )
    try:
        with pytest.raises(Unimplemented):
            await client.newer()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(client.slow(60_000), 0.2)  # the caller gives up
        await wait_until(running.impl.slow_cancelled.is_set, "the server-side handler cancelled")
    finally:
        await client.close()


class BigReplyImpl(ExitingImpl):
    async def echo(self, message: str) -> str:
        return "x" * (512 * 1024) if message == "big" else message

    async def slow(self, delay_ms: int) -> int:
        await asyncio.sleep(delay_ms / 1000)
        return delay_ms


async def test_a_reply_over_the_frame_limit_fails_only_its_call(
    start_server: Any, make_client: Any
) -> None:
    """A reply larger than the frame limit (here 256 KiB on both sides) would make the
    client drop the connection and fail every call on it: the server answers that call
    INTERNAL instead, and the calls beside it get their replies."""
    running = await start_server(BigReplyImpl(), max_frame_size=256 * 1024)
    client = make_client(running.addr, max_frame_size=256 * 1024)
    assert await client.echo("warm") == "warm"
    slow = [asyncio.create_task(client.slow(300)) for _ in range(3)]
    await asyncio.sleep(0.05)
    with pytest.raises(Internal, match="exceeds the frame limit of 262144 bytes"):
        await client.echo("big")
    assert await asyncio.gather(*slow) == [300, 300, 300]


@pytest.mark.parametrize("bad", ["too-many-headers", "oversized"])
async def test_one_refused_call_does_not_fail_the_calls_beside_it(
    start_server: Any, make_client: Any, bad: str
) -> None:
    """A meshkit client multiplexes every caller on one connection: a call the server
    refuses (a header block over the limits, or a frame over the size limit) fails alone.
    The calls in flight beside it are answered, not cancelled with the connection."""
    running = await start_server(BigReplyImpl(), max_frame_size=256 * 1024)
    client = make_client(running.addr)
    assert await client.echo("warm") == "warm"
    slow = [asyncio.create_task(client.slow(300)) for _ in range(3)]
    await asyncio.sleep(0.05)
    with pytest.raises(InvalidArgument):
        if bad == "oversized":
            await client.echo("x" * (300 * 1024))
        else:
            await client.call("echo", "x", headers={f"h{i}": "v" for i in range(200)})
    assert await asyncio.gather(*slow) == [300, 300, 300]
    assert await client.echo("again") == "again"
