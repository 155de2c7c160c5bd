"""RPC core on loopback: calls, pipelining, thread-pool handlers, deadlines, retries, limits."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import pytest
from echo_support import EchoImpl, echo_thrift
from prometheus_client import CollectorRegistry, generate_latest

from meshkit import (
    Client,
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    Service,
    SyncClient,
    Unavailable,
    Unimplemented,
)
from meshkit.rpc.deadline import deadline_scope, remaining
from meshkit.rpc.endpoint import Endpoint, StaticResolver
from meshkit.rpc.server import RpcServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_echo_reverse_and_idl_exception(echo_service: Service) -> None:
    async with Client(echo_thrift.Echo, "echo", addr=f"127.0.0.1:{echo_service.port}") as client:
        assert await client.echo("hello") == "hello"
        assert await client.echo(message="kw") == "kw"
        assert await client.reverse("abc") == "cba"
        with pytest.raises(echo_thrift.EchoError) as info:
            await client.reverse("")
        assert info.value.reason == "empty message"
        assert await client.ping() is None


async def test_plain_def_handler_runs_in_thread_pool(echo_service: Service) -> None:
    async with Client(echo_thrift.Echo, "echo", addr=f"127.0.0.1:{echo_service.port}") as client:
        await asyncio.gather(*(client.reverse(f"m{i}") for i in range(20)))
    threads = echo_service.implementation.threads
    assert threads and all(name.startswith("meshkit-echo") for name in threads)
    assert threading.main_thread().name not in threads


async def test_pipelined_calls_on_one_connection_run_concurrently(echo_service: Service) -> None:
    async with Client(echo_thrift.Echo, "echo", addr=f"127.0.0.1:{echo_service.port}") as client:
        # 20 calls that each sleep 300 ms on the server: served one after another
        # they would take 6 s; concurrently they finish long before that.
        results = await asyncio.wait_for(
            asyncio.gather(*(client.slow(300) for _ in range(20))), timeout=5.0
        )
        assert results == [300] * 20
        assert len(echo_service.server.connections) == 1
        # Replies are matched by seq id even when they come back out of order.
        mixed = await asyncio.gather(client.slow(200), client.echo("fast"), client.slow(50))
        assert mixed == [200, "fast", 50]


async def test_client_arguments_are_checked(echo_service: Service) -> None:
    async with Client(echo_thrift.Echo, "echo", addr=f"127.0.0.1:{echo_service.port}") as client:
        with pytest.raises(InvalidArgument, match="no argument 'msg'"):
            await client.echo(msg="x")
        with pytest.raises(InvalidArgument, match="takes 1 arguments"):
            await client.echo("a", "b")
        with pytest.raises(InvalidArgument, match="expected one of the methods"):
            await client.call("nope")
        with pytest.raises(InvalidArgument, match="do not match the IDL"):
            await client.echo(12345)


async def test_deadline_cancels_handler_and_client_times_out(echo_service: Service) -> None:
    impl: EchoImpl = echo_service.implementation
    async with Client(echo_thrift.Echo, "echo", addr=f"127.0.0.1:{echo_service.port}") as client:
        with pytest.raises(DeadlineExceeded):
            await client.call("slow", 5000, timeout=0.2)
        # The server got the remaining budget and cancelled the handler itself.
        for _ in range(100):
            if impl.cancelled:
                break
            await asyncio.sleep(0.05)
        assert impl.cancelled == 1
        assert impl.finished == 0
        # The connection is still good after a timed-out call.
        assert await client.echo("after") == "after"


async def test_spent_budget_is_not_sent() -> None:
    client = Client(echo_thrift.Echo, "echo", addr="127.0.0.1:9")
    with deadline_scope(time.monotonic() - 1), pytest.raises(DeadlineExceeded, match="not sent"):
        await client.echo("x")
    await client.close()


async def test_a_budget_spent_before_an_attempt_leaves_is_not_sent(
    echo_service: Service,
) -> None:
    # The transport writes the budget left as each attempt leaves; none left: not sent.
    impl: EchoImpl = echo_service.implementation
    from meshkit.rpc.balancer import RoundRobin
    from meshkit.rpc.client import RpcClient
    from meshkit.rpc.pick import Pick

    class SpentDeadline:
        name = "spent"

        async def __call__(self, ctx: Any, call_next: Any) -> Any:
            ctx.deadline = time.monotonic() - 0.01
            return await call_next(ctx)

    resolver = StaticResolver([f"127.0.0.1:{echo_service.port}"])
    client = RpcClient(
        echo_thrift.Echo,
        "echo",
        resolver=resolver,
        middlewares=[SpentDeadline(), Pick(resolver, RoundRobin())],
        metrics_registry=CollectorRegistry(),
    )
    started = impl.started
    with pytest.raises(DeadlineExceeded, match="not sent"):
        await client.slow(1)
    assert impl.started == started  # the server never saw it
    await client.close()


async def test_nested_calls_inherit_the_remaining_budget(
    metrics_registry: CollectorRegistry,
) -> None:
    """A handler's own client calls carry what is left of the caller's budget."""
    seen: dict[str, Any] = {}
    backend = Service("backend", echo_thrift.Echo, registry=None, metrics_registry=metrics_registry)

    class Backend(EchoImpl):
        async def echo(self, message: str) -> str:
            seen["backend_budget"] = remaining()
            return message

    backend.implement(Backend())
    await backend.start(port=0, health_port=0)
    front = Service("front", echo_thrift.Echo, registry=None, metrics_registry=metrics_registry)

    class Front(EchoImpl):
        def __init__(self) -> None:
            super().__init__()
            self.client = Client(echo_thrift.Echo, "backend", addr=f"127.0.0.1:{backend.port}")

        async def echo(self, message: str) -> str:
            seen["front_budget"] = remaining()
            await asyncio.sleep(0.2)
            return await self.client.echo(message)

        def reverse(self, message: str) -> str:
            # A thread-pool handler: the SyncClient carries the budget from this thread.
            seen["thread_budget"] = remaining()
            with SyncClient(echo_thrift.Echo, "backend", addr=f"127.0.0.1:{backend.port}") as c:
                return str(c.echo(message[::-1]))

    front_impl = Front()
    front.implement(front_impl)
    await front.start(port=0, health_port=0)
    try:
        async with Client(echo_thrift.Echo, "front", addr=f"127.0.0.1:{front.port}") as client:
            assert await client.call("echo", "x", timeout=2.0) == "x"
            assert 1.5 < seen["front_budget"] <= 2.0
            # 200 ms were spent in front before it called backend.
            assert seen["backend_budget"] < seen["front_budget"] - 0.15
            assert await client.call("reverse", "ab", timeout=1.0) == "ba"
            assert 0 < seen["thread_budget"] <= 1.0
            assert seen["backend_budget"] <= seen["thread_budget"]
    finally:
        await front_impl.client.close()
        await front.stop()
        await backend.stop()


async def test_unknown_method_is_unimplemented(echo_service: Service, tmp_path: Any) -> None:
    import thriftpy2

    idl = tmp_path / "other.thrift"
    idl.write_text("service Echo { string echo(1: string message), string shout(1: string m) }")
    other = thriftpy2.load(str(idl), module_name="other_thrift")
    async with Client(other.Echo, "echo", addr=f"127.0.0.1:{echo_service.port}") as client:
        with pytest.raises(Unimplemented, match="'shout'"):
            await client.shout("x")
        assert await client.echo("still fine") == "still fine"


async def test_connect_failure_is_unavailable_and_retried_elsewhere(echo_service: Service) -> None:
    dead = f"127.0.0.1:{free_port()}"
    live = f"127.0.0.1:{echo_service.port}"
    async with Client(echo_thrift.Echo, "echo", addr=[dead, live]) as client:
        # Round robin hits the dead address every other call; each such call is
        # retried on the live one because the request never left.
        for i in range(6):
            assert await client.echo(str(i)) == str(i)
    async with Client(echo_thrift.Echo, "echo", addr=dead) as client:
        with pytest.raises(Unavailable, match="could not connect"):
            await client.echo("x")


async def test_concurrency_limit_sheds_with_resource_exhausted(
    metrics_registry: CollectorRegistry,
) -> None:
    impl = EchoImpl()
    server = RpcServer(
        echo_thrift.Echo, impl, name="limited", max_concurrency=2, metrics_registry=metrics_registry
    )
    await server.start()
    try:
        resolver = StaticResolver([Endpoint("127.0.0.1", server.port)])
        async with Client(echo_thrift.Echo, "limited", resolver=resolver) as client:
            results = await asyncio.gather(
                *(client.slow(300) for _ in range(5)), return_exceptions=True
            )
            shed = [r for r in results if isinstance(r, ResourceExhausted)]
            assert len(shed) == 3
            assert "concurrency limit of 2" in str(shed[0])
            assert results.count(300) == 2
    finally:
        await server.close()


async def test_drain_finishes_calls_in_flight(metrics_registry: CollectorRegistry) -> None:
    svc = Service("drainee", echo_thrift.Echo, registry=None, metrics_registry=metrics_registry)
    impl = EchoImpl()
    svc.implement(impl)
    await svc.start(port=0, health_port=0)
    async with Client(echo_thrift.Echo, "drainee", addr=f"127.0.0.1:{svc.port}") as client:
        calls = [asyncio.ensure_future(client.slow(400)) for _ in range(10)]
        await impl.slow_started.wait()
        await asyncio.sleep(0.05)
        assert svc.server is not None and svc.server.in_flight == 10
        finished = await svc.stop(drain_timeout=5.0)
        assert finished
        assert await asyncio.gather(*calls) == [400] * 10
        assert impl.cancelled == 0
        # New connections are refused once drained.
        with pytest.raises(Unavailable):
            await Client(echo_thrift.Echo, "drainee", addr=f"127.0.0.1:{svc.port}").echo("x")


async def test_drain_timeout_cancels_stragglers(metrics_registry: CollectorRegistry) -> None:
    svc = Service("straggler", echo_thrift.Echo, registry=None, metrics_registry=metrics_registry)
    impl = EchoImpl()
    svc.implement(impl)
    await svc.start(port=0, health_port=0)
    async with Client(echo_thrift.Echo, "straggler", addr=f"127.0.0.1:{svc.port}") as client:
        call = asyncio.ensure_future(client.slow(10_000))
        await impl.slow_started.wait()
        assert await svc.stop(drain_timeout=0.2) is False
        with pytest.raises(Unavailable):
            await call
        assert impl.cancelled == 1


def test_sync_client_threads() -> None:
    from meshkit.rpc.client import _LoopThread

    runner = _LoopThread.get()
    svc = Service("syncsvc", echo_thrift.Echo, registry=None, metrics_registry=CollectorRegistry())
    svc.implement(EchoImpl())
    runner.submit(lambda: svc.start(port=0, health_port=0))
    try:
        with SyncClient(echo_thrift.Echo, "syncsvc", addr=f"127.0.0.1:{svc.port}") as client:
            results: list[str] = []
            errors: list[BaseException] = []

            def work(n: int) -> None:
                try:
                    for i in range(50):
                        results.append(client.echo(f"{n}-{i}"))
                except BaseException as exc:  # pragma: no cover - reported below
                    errors.append(exc)

            threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert not errors
            assert sorted(results) == sorted(f"{n}-{i}" for n in range(8) for i in range(50))
            with pytest.raises(echo_thrift.EchoError):
                client.reverse("")
            with pytest.raises(DeadlineExceeded):
                client.call("slow", 2000, timeout=0.1)
    finally:
        runner.submit(svc.stop)


async def test_metrics_and_pipeline_description(
    echo_service: Service, metrics_registry: CollectorRegistry
) -> None:
    async with Client(
        echo_thrift.Echo,
        "echo",
        addr=f"127.0.0.1:{echo_service.port}",
        metrics_registry=metrics_registry,
    ) as client:
        assert client.pipeline.describe() == (
            "deadline → tracing → metrics → accesslog → retry → attempt-tracing → pick → transport"
        )
        await client.echo("x")
        with pytest.raises(echo_thrift.EchoError):
            await client.reverse("")
    assert echo_service.server is not None
    assert echo_service.server.pipeline.describe() == (
        "decode → deadline → concurrency → tracing → metrics → accesslog → handler"
    )
    text = generate_latest(metrics_registry).decode()
    assert 'meshkit_rpc_server_requests_total{code="OK",method="echo",service="echo"} 1.0' in text
    assert (
        'meshkit_rpc_server_requests_total{code="APP_ERROR",method="reverse",service="echo"} 1.0'
        in text
    )
    assert 'meshkit_rpc_client_requests_total{code="OK",method="echo",service="echo"} 1.0' in text
    assert 'meshkit_rpc_server_latency_seconds_count{method="echo",service="echo"} 1.0' in text
    assert 'meshkit_rpc_server_in_flight{service="echo"} 0.0' in text


async def test_custom_middleware_sees_every_call(metrics_registry: CollectorRegistry) -> None:
    seen: list[tuple[str, str]] = []

    async def audit(ctx: Any, call_next: Any) -> Any:
        seen.append((ctx.method, ctx.headers.get("user-id", "")))
        ctx.response_headers["x-audited"] = "1"
        return await call_next(ctx)

    impl = EchoImpl()
    probe = RpcServer(echo_thrift.Echo, impl, name="audited", metrics_registry=metrics_registry)
    server = RpcServer(
        echo_thrift.Echo,
        impl,
        name="audited",
        middlewares=[*probe.default_middlewares(), audit],
        metrics_registry=metrics_registry,
    )
    await probe.close()
    await server.start()
    try:
        async with Client(echo_thrift.Echo, "audited", addr=f"127.0.0.1:{server.port}") as client:
            await client.call("echo", "x", headers={"user-id": "42"})
        assert seen == [("echo", "42")]
        assert server.pipeline.names()[-2:] == ["audit", "handler"]
    finally:
        await server.close()
