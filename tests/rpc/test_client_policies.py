"""The default client chain wires the smart-client policies together."""

from __future__ import annotations

import asyncio

import pytest
from echo_support import EchoImpl, echo_thrift
from prometheus_client import CollectorRegistry

from meshkit import Client, InvalidArgument
from meshkit.rpc.balancer import PeakEwma
from meshkit.rpc.endpoint import Endpoint, StaticResolver
from meshkit.rpc.hedge import HedgePolicy
from meshkit.rpc.pick import Pick
from meshkit.rpc.route import RoutingTable
from meshkit.rpc.server import RpcServer


def named(name: str, delay: float = 0.0) -> EchoImpl:
    class Named(EchoImpl):
        async def echo(self, message: str) -> str:
            await asyncio.sleep(delay)
            return f"{message}@{name}"

    return Named()


async def test_default_chain_has_balancer_breakers_and_ejection() -> None:
    client = Client(echo_thrift.Echo, "echo", addr="127.0.0.1:1")
    (pick,) = [m for m in client.pipeline.middlewares if isinstance(m, Pick)]
    assert isinstance(pick.balancer, PeakEwma)
    kinds = {type(s).__name__ for s in pick.selectors}
    assert {"OutlierEjection", "CircuitBreakers"} <= kinds
    off = Client(echo_thrift.Echo, "echo", addr="127.0.0.1:1", breakers=False, outliers=False)
    (off_pick,) = [m for m in off.pipeline.middlewares if isinstance(m, Pick)]
    assert off_pick.selectors == ()
    with pytest.raises(InvalidArgument, match="fallbacks must name IDL methods"):
        Client(echo_thrift.Echo, "echo", addr="127.0.0.1:1", fallbacks={"nope": 1})


async def test_routing_hedging_and_fallbacks_through_the_default_chain() -> None:
    metrics = CollectorRegistry()
    servers = [
        RpcServer(echo_thrift.Echo, named("stable"), name="echo", metrics_registry=metrics),
        RpcServer(echo_thrift.Echo, named("canary"), name="echo", metrics_registry=metrics),
        RpcServer(echo_thrift.Echo, named("slow", 0.3), name="echo", metrics_registry=metrics),
    ]
    for server in servers:
        await server.start()
    try:
        resolver = StaticResolver(
            [
                Endpoint("127.0.0.1", servers[0].port, "s", tags={"canary": "false"}),
                Endpoint("127.0.0.1", servers[1].port, "c", tags={"canary": "true"}),
            ]
        )
        table = RoutingTable.from_dict(
            {"rules": [{"name": "beta", "target": {"canary": "true"}, "headers": {"user": "42"}}]}
        )
        async with Client(echo_thrift.Echo, "echo", resolver=resolver, routing=table) as client:
            assert await client.call("echo", "x", headers={"user": "42"}) == "x@canary"
            assert {await client.echo("y") for _ in range(10)} == {"y@stable"}

        # Hedging: a slow instance and a fast one; the hedge answers first.
        both = StaticResolver([f"127.0.0.1:{servers[2].port}", f"127.0.0.1:{servers[0].port}"])
        policy = HedgePolicy(methods={"echo"}, min_delay=0.02, max_delay=0.05)
        async with Client(
            echo_thrift.Echo,
            "echo",
            resolver=both,
            idempotent=["echo"],
            hedge=policy,
            balancer=None,
        ) as client:
            replies = await asyncio.gather(*(client.echo(str(i)) for i in range(10)))
            assert all(r.endswith("@stable") for r in replies)

        # Fallback: nothing listens there; the fallback value is returned instead.
        async with Client(
            echo_thrift.Echo, "echo", addr="127.0.0.1:1", fallbacks={"echo": "degraded"}
        ) as client:
            assert await client.echo("z") == "degraded"
    finally:
        for server in servers:
            await server.close()


async def test_cancelled_caller_does_not_cancel_a_shared_connect() -> None:
    server = RpcServer(
        echo_thrift.Echo, EchoImpl(), name="echo", metrics_registry=CollectorRegistry()
    )
    await server.start()
    try:
        async with Client(echo_thrift.Echo, "echo", addr=f"127.0.0.1:{server.port}") as client:
            first = asyncio.ensure_future(client.echo("a"))
            second = asyncio.ensure_future(client.echo("b"))
            await asyncio.sleep(0)
            first.cancel()
            assert await second == "b"
    finally:
        await server.close()
