"""Tail keeping in unsampled traces: errors and slow calls still reach the collector.

With head sampling at 0 every trace is unsampled; meshkit's RPC spans of such a trace are
kept only in outline (:mod:`meshkit.tracing.tailspan`) and built in full only when they
end in error or run slow. These tests follow that through real services to the bundled
collector.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from echo_support import EchoImpl, echo_thrift
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client import CollectorRegistry
from tracing_support import flushed, get_json, get_trace, traced_echo

from meshkit import Client, Service
from meshkit.tracing.collector import Collector
from meshkit.tracing.otel import OTelHook
from meshkit.tracing.provider import TraceSettings, build_provider


class Back(EchoImpl):
    async def echo(self, message: str) -> str:
        span = trace.get_current_span()
        span.set_attribute("user.note", message)
        if message == "fail":
            raise RuntimeError("back failed on purpose")
        if message == "marked":  # an error the handler reports without raising
            span.set_status(StatusCode.ERROR, "marked by the handler")
            span.add_event("user.event", {"n": 1})
        return message


class Front(EchoImpl):
    def __init__(self) -> None:
        super().__init__()
        self.back: Client | None = None

    async def echo(self, message: str) -> str:
        assert self.back is not None
        return str(await self.back.echo(message))


async def _services(provider: Any) -> AsyncIterator[Client]:
    hook = OTelHook(tracer_provider=provider)
    started: list[Service] = []
    front = Front()
    try:
        for name, impl in (("back", Back()), ("front", front)):
            svc = Service(
                name,
                echo_thrift.Echo,
                registry=None,
                tracer=hook,
                metrics_registry=CollectorRegistry(),
            )
            svc.implement(impl)
            await svc.start(port=0, health_port=0)
            started.append(svc)
            client = Client(
                echo_thrift.Echo,
                name,
                addr=f"127.0.0.1:{svc.port}",
                tracer=hook,
                caller="front" if name == "back" else "caller",
                metrics_registry=CollectorRegistry(),
            )
            await client.start()
            if name == "back":
                front.back = client
            else:
                yield client
                await client.close()
    finally:
        if front.back is not None:
            await front.back.close()
        for svc in reversed(started):
            await svc.stop(drain_timeout=1.0)


@pytest.fixture
async def unsampled(collector: Collector) -> AsyncIterator[tuple[Client, Any]]:
    """caller → front → back, head sampling 0, spans exported to the bundled collector."""
    provider = build_provider(
        TraceSettings(endpoint=collector.url + "/v1/traces", sample=0.0),
        service="tail-test",
        metrics_registry=CollectorRegistry(),
    )
    try:
        async for client in _services(provider):
            yield client, provider
    finally:
        await asyncio.to_thread(provider.shutdown)


async def test_an_error_in_an_unsampled_trace_reaches_the_collector(
    unsampled: tuple[Client, Any], collector: Collector
) -> None:
    client, provider = unsampled
    assert await client.echo("fine") == "fine"
    with pytest.raises(Exception, match="INTERNAL"):
        await client.echo("fail")
    await asyncio.to_thread(provider.force_flush)  # (its export thread posts to this loop)
    await flushed(collector)

    status, found = await get_json(f"{collector.url}/api/traces?errors=1")
    assert status == 200
    assert len(found["traces"]) == 1  # the failing call only; the fine one left nothing
    trace_id = found["traces"][0]["trace_id"]
    status, body = await get_trace(collector.url, trace_id)
    assert status == 200
    spans = {(s["service"], s["kind"]): s for s in body["spans"]}
    # every hop that saw the error kept its span: caller → front → back and back
    assert set(spans) == {
        ("caller", "CLIENT"),
        ("front", "SERVER"),
        ("front", "CLIENT"),
        ("back", "SERVER"),
    }
    for span in spans.values():
        assert span["error"], span
        assert span["attrs"]["meshkit.kept"] == "error"
        assert span["attrs"]["rpc.method"] == "echo"
        assert span["attrs"]["meshkit.status_code"] != "OK"
    back = spans[("back", "SERVER")]
    assert back["attrs"]["user.note"] == "fail"  # what the handler set, though unsampled
    assert back["attrs"]["meshkit.caller"] == "front"
    assert back["attrs"]["meshkit.deadline_ms"] > 0
    # one tree, each span within its parent's time
    assert back["parent_id"] == spans[("front", "CLIENT")]["span_id"]
    assert spans[("front", "CLIENT")]["parent_id"] == spans[("front", "SERVER")]["span_id"]
    assert spans[("front", "SERVER")]["parent_id"] == spans[("caller", "CLIENT")]["span_id"]
    outer = spans[("caller", "CLIENT")]
    assert outer["start_us"] <= back["start_us"]
    assert back["start_us"] + back["duration_us"] <= outer["start_us"] + outer["duration_us"] + 1


@pytest.fixture
async def in_memory() -> AsyncIterator[tuple[Client, InMemorySpanExporter, Any]]:
    exporter = InMemorySpanExporter()
    provider = build_provider(
        TraceSettings(sample=0.0), exporter=exporter, metrics_registry=CollectorRegistry()
    )
    try:
        async for client in _services(provider):
            yield client, exporter, provider
    finally:
        provider.shutdown()


async def test_an_error_status_set_by_a_handler_keeps_the_span(
    in_memory: tuple[Client, InMemorySpanExporter, Any],
) -> None:
    client, exporter, provider = in_memory
    assert await client.echo("marked") == "marked"  # the call itself succeeds
    provider.force_flush()
    (span,) = exporter.get_finished_spans()  # only back's server span erred
    assert span.kind.name == "SERVER"
    assert span.attributes is not None
    assert span.attributes["meshkit.kept"] == "error"
    assert span.attributes["user.note"] == "marked"
    assert span.attributes["meshkit.status_code"] == "OK"
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "marked by the handler"
    assert [e.name for e in span.events] == ["user.event"]
    assert not span.context.trace_flags.sampled


async def test_spans_user_code_starts_in_an_unsampled_trace_follow_the_same_rule(
    in_memory: tuple[Client, InMemorySpanExporter, Any],
) -> None:
    client, exporter, provider = in_memory
    tracer = provider.get_tracer("app")
    with tracer.start_as_current_span("fine-work"):
        await client.echo("fine")
    with pytest.raises(RuntimeError), tracer.start_as_current_span("failing-work"):
        await client.echo("ok")
        raise RuntimeError("the application's own failure")
    provider.force_flush()
    names = [s.name for s in exporter.get_finished_spans()]
    # the application's failing span is kept; meshkit's spans under it did not err
    assert names == ["failing-work"]
    (kept,) = exporter.get_finished_spans()
    assert kept.attributes is not None and kept.attributes["meshkit.kept"] == "error"


async def test_a_tail_span_is_not_recording_yet_carries_the_trace() -> None:
    exporter = InMemorySpanExporter()
    provider = build_provider(
        TraceSettings(sample=0.0), exporter=exporter, metrics_registry=CollectorRegistry()
    )
    seen: dict[str, Any] = {}

    class Looking(EchoImpl):
        async def echo(self, message: str) -> str:
            span = trace.get_current_span()
            seen["recording"] = span.is_recording()
            seen["context"] = span.get_span_context()
            return message

    hook = OTelHook(tracer_provider=provider)
    async with traced_echo(hook, Looking()) as client:
        assert await client.echo("x") == "x"
    provider.force_flush()
    assert seen["recording"] is False
    assert seen["context"].is_valid and not seen["context"].trace_flags.sampled
    assert list(exporter.get_finished_spans()) == []
    provider.shutdown()
