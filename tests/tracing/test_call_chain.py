"""Done-when: a request through three meshkit services is one trace in the collector.

front (async handler) → middle (plain-def handler, run in the thread pool, calling on
with a SyncClient) → back (first attempt fails UNAVAILABLE, the idempotent call is
retried). The caller is an application instrumented with the OpenTelemetry SDK: its
trace id must be the one every meshkit span carries.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
from echo_support import echo_thrift
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import CollectorRegistry
from tracing_support import flushed, get_json, get_trace

from meshkit import Client, Service, SyncClient, Unavailable
from meshkit.tracing.collector import Collector
from meshkit.tracing.otel import OTelHook
from meshkit.tracing.provider import TraceSettings, build_provider


class Back:
    def __init__(self) -> None:
        self.calls = 0

    async def echo(self, message: str) -> str:
        self.calls += 1
        if self.calls == 1:
            raise Unavailable("back is warming up (first call fails on purpose)")
        await asyncio.sleep(0.002)
        return message

    def reverse(self, message: str) -> str:
        return message[::-1]

    async def slow(self, delay_ms: int) -> int:
        return delay_ms

    async def ping(self) -> None:
        return None


class Middle(Back):
    def __init__(self) -> None:
        super().__init__()
        self.back: SyncClient | None = None
        self.threads: set[str] = set()

    def reverse(self, message: str) -> str:  # plain def: runs in the server's thread pool
        self.threads.add(threading.current_thread().name)
        assert self.back is not None
        return str(self.back.echo(message))[::-1]


class Front(Back):
    def __init__(self) -> None:
        super().__init__()
        self.middle: Client | None = None

    async def echo(self, message: str) -> str:
        assert self.middle is not None
        return str(await self.middle.reverse(message))


@pytest.fixture
async def chain(collector: Collector) -> AsyncIterator[dict[str, Any]]:
    """front → middle → back, every span exported to the collector by meshkit's provider."""
    provider = build_provider(
        TraceSettings(endpoint=collector.url + "/v1/traces"),
        service="chain-test",
        metrics_registry=CollectorRegistry(),
    )
    hook = OTelHook(tracer_provider=provider)
    started: list[Service] = []
    impls = {"back": Back(), "middle": Middle(), "front": Front()}
    try:
        for name in ("back", "middle", "front"):
            svc = Service(
                name,
                echo_thrift.Echo,
                registry=None,
                tracer=hook,
                metrics_registry=CollectorRegistry(),
            )
            svc.implement(impls[name])
            await svc.start(port=0, health_port=0)
            started.append(svc)
            if name == "back":
                impls["middle"].back = await asyncio.to_thread(  # type: ignore[attr-defined]
                    SyncClient,
                    echo_thrift.Echo,
                    "back",
                    addr=f"127.0.0.1:{svc.port}",
                    tracer=hook,
                    caller="middle",
                    idempotent=["echo"],
                    metrics_registry=CollectorRegistry(),
                )
            elif name == "middle":
                impls["front"].middle = svc_client = Client(  # type: ignore[attr-defined]
                    echo_thrift.Echo,
                    "middle",
                    addr=f"127.0.0.1:{svc.port}",
                    tracer=hook,
                    caller="front",
                    metrics_registry=CollectorRegistry(),
                )
                await svc_client.start()
        yield {"front": started[-1], "impls": impls, "provider": provider}
    finally:
        middle_client = impls["front"].middle  # type: ignore[attr-defined]
        if middle_client is not None:
            await middle_client.close()
        back_client = impls["middle"].back  # type: ignore[attr-defined]
        if back_client is not None:
            await asyncio.to_thread(back_client.close)
        for svc in reversed(started):
            await svc.stop(drain_timeout=1.0)
        await asyncio.to_thread(provider.shutdown)


def _contains(parent: dict[str, Any], child: dict[str, Any]) -> bool:
    # Same process, same clock: a child runs within its parent (1 µs of rounding allowed).
    return (
        child["start_us"] >= parent["start_us"] - 1
        and child["start_us"] + child["duration_us"]
        <= parent["start_us"] + parent["duration_us"] + 1
    )


async def test_three_services_one_trace_continuing_an_otel_sdk_caller(
    chain: dict[str, Any], collector: Collector
) -> None:
    # The caller: an app with its own OpenTelemetry SDK provider, exporting to the same
    # collector, calling front through a meshkit client inside its own span. (Its export
    # runs in the SDK's thread: the collector serves on this test's event loop.)
    user = TracerProvider(resource=Resource.create({"service.name": "shop-web"}))
    user.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(collector.url + "/v1/traces")))
    front_port = chain["front"].port
    async with Client(
        echo_thrift.Echo,
        "front",
        addr=f"127.0.0.1:{front_port}",
        tracer=OTelHook(tracer_provider=user),
        caller="",  # not a meshkit service (in-process, the default would be "front")
        timeout=5.0,
        metrics_registry=CollectorRegistry(),
    ) as client:
        with user.get_tracer("shop").start_as_current_span("checkout") as root:
            assert await client.echo("abc") == "cba"  # reversed by middle
    trace_id = format(root.get_span_context().trace_id, "032x")
    await asyncio.to_thread(chain["provider"].force_flush)
    await asyncio.to_thread(user.force_flush)
    user.shutdown()
    await flushed(collector)

    status, body = await get_trace(collector.url, trace_id)
    assert status == 200, body
    spans = body["spans"]
    by_id = {s["span_id"]: s for s in spans}

    def one(service: str, name: str, kind: str) -> list[dict[str, Any]]:
        return [
            s for s in spans if s["service"] == service and s["name"] == name and s["kind"] == kind
        ]

    (checkout,) = [s for s in spans if s["name"] == "checkout"]
    assert checkout["parent_id"] == "" and checkout["service"] == "shop-web"
    (front_client,) = one("shop-web", "front/echo", "CLIENT")
    (front_server,) = one("front", "front/echo", "SERVER")
    (middle_client,) = one("front", "middle/reverse", "CLIENT")
    (middle_server,) = one("middle", "middle/reverse", "SERVER")
    (back_call,) = one("middle", "back/echo", "CLIENT")
    (back_retry,) = one("middle", "back/echo retry 1", "CLIENT")
    back_servers = one("back", "back/echo", "SERVER")
    assert len(back_servers) == 2
    first, second = sorted(back_servers, key=lambda s: s["start_us"])

    # parent/child links: the OTel caller's span id is continued by meshkit
    assert front_client["parent_id"] == checkout["span_id"]
    assert front_server["parent_id"] == front_client["span_id"]
    assert middle_client["parent_id"] == front_server["span_id"]
    assert middle_server["parent_id"] == middle_client["span_id"]
    assert back_call["parent_id"] == middle_server["span_id"]  # context followed into the thread
    assert first["parent_id"] == back_call["span_id"]  # attempt 0 travels on the call span
    assert back_retry["parent_id"] == back_call["span_id"]  # the retry is a child of the call
    assert second["parent_id"] == back_retry["span_id"]
    assert chain["impls"]["middle"].threads and all(
        t.startswith("meshkit-middle") for t in chain["impls"]["middle"].threads
    )

    # timing: every span lies within its parent
    for span in spans:
        if span["parent_id"]:
            assert _contains(by_id[span["parent_id"]], span), (span["name"], span["service"])
    assert back_retry["start_us"] >= first["start_us"] + first["duration_us"]

    # attributes the on-call engineer needs
    assert first["error"] and first["attrs"]["meshkit.status_code"] == "UNAVAILABLE"
    assert not second["error"] and second["attrs"]["meshkit.status_code"] == "OK"
    assert back_call["attrs"]["meshkit.attempts"] == 2
    assert back_retry["attrs"]["meshkit.attempt"] == 1
    assert back_call["attrs"]["net.peer.name"].startswith("127.0.0.1:")
    assert back_call["attrs"]["meshkit.instance"]
    assert [e["name"] for e in back_call["events"]] == ["retry"]
    assert 0 < front_client["deadline_ms"] <= 5000
    assert 0 < front_server["deadline_ms"] <= front_client["deadline_ms"]
    assert front_server["attrs"]["meshkit.instance"] == chain["front"].instance.instance_id
    assert middle_server["attrs"]["meshkit.caller"] == "front"

    # one trace, found by search, with every service in it
    status, found = await get_json(f"{collector.url}/api/traces?service=back&errors=1")
    assert status == 200
    assert [t["trace_id"] for t in found["traces"]] == [trace_id]
    assert found["traces"][0]["services"] == ["back", "front", "middle", "shop-web"]
    assert body["critical_path"][0] == checkout["span_id"]
    assert second["span_id"] in body["critical_path"]
