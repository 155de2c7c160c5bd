"""etcd dies under load: no call fails (last known snapshot), and after it comes back
a newly registered instance starts taking calls."""

from __future__ import annotations

import asyncio
import collections
import time

from echo_support import EchoImpl, echo_thrift
from etcd_server import EtcdServer
from prometheus_client import CollectorRegistry

from meshkit import Client, Service
from meshkit.registry.etcd import EtcdRegistry


def named(name: str) -> type[EchoImpl]:
    class Named(EchoImpl):
        async def echo(self, message: str) -> str:
            return f"{message}@{name}"

    return Named


async def start(name: str, url: str) -> Service:
    svc = Service(
        "loaded",
        echo_thrift.Echo,
        registry=EtcdRegistry.from_url(url, ttl=3, connect_timeout=0.5),
        metrics_registry=CollectorRegistry(),
    )
    svc.implement(named(name))
    await svc.start(port=0, health_port=0)
    return svc


async def test_etcd_killed_under_load_no_call_fails_and_new_instances_seen_after(
    etcd: EtcdServer,
) -> None:
    services = [await start("a", etcd.url), await start("b", etcd.url)]
    client_registry = EtcdRegistry.from_url(etcd.url, connect_timeout=0.5)
    served: collections.Counter[str] = collections.Counter()
    errors: list[BaseException] = []
    stop = asyncio.Event()
    try:
        async with Client(echo_thrift.Echo, "loaded", registry=client_registry) as client:

            async def worker() -> None:
                while not stop.is_set():
                    try:
                        served[(await client.echo("x")).rsplit("@", 1)[1]] += 1
                    except Exception as exc:
                        errors.append(exc)
                    await asyncio.sleep(0.001)

            load = asyncio.gather(*(worker() for _ in range(4)))
            await asyncio.sleep(0.5)
            assert set(served) == {"a", "b"}
            await etcd.akill()
            await asyncio.sleep(2.0)  # calls keep flowing on the last known snapshot
            assert client.resolver.stale  # type: ignore[attr-defined]
            during = served.copy()
            await etcd.astart()
            services.append(await start("c", etcd.url))  # registers after the restart
            deadline = time.monotonic() + 20
            while served["c"] == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            stop.set()
            await load
            assert errors == [], errors[:3]
            assert during["a"] > 0 and during["b"] > 0
            assert served["c"] > 0, "the instance registered after the outage was never called"
            assert not client.resolver.stale  # type: ignore[attr-defined]
    finally:
        stop.set()
        for svc in services:
            await svc.stop(drain_timeout=1.0)
        await client_registry.close()
