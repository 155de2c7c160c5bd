"""Span plumbing: export queue drops, tail keeping, settings, log lines, HTTP, hedges."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import aiohttp
import pytest
import structlog
from echo_support import EchoImpl, echo_thrift
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status, StatusCode
from prometheus_client import CollectorRegistry
from tracing_support import traced_echo
from waiting import wait_until

from meshkit import Client, Service
from meshkit.errors import ConfigError
from meshkit.logs import configure_logging
from meshkit.rpc.hedge import HedgePolicy
from meshkit.tracing import add_trace_context, otel
from meshkit.tracing.export import ExportQueue
from meshkit.tracing.otel import OTelHook
from meshkit.tracing.provider import TraceSettings, build_provider
from meshkit.tracing.sampling import make_sampler


class BlockingExporter(SpanExporter):
    """Holds every export until released (a collector that stopped answering)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.exported: list[ReadableSpan] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.release.wait(10)
        self.exported.extend(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.release.set()


class FailingExporter(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        return None


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def test_full_queue_drops_and_counts_instead_of_blocking() -> None:
    registry = CollectorRegistry()
    exporter = BlockingExporter()
    queue = ExportQueue(exporter, max_queue=10, max_batch=5, delay=0.01, metrics_registry=registry)
    provider = TracerProvider()
    provider.add_span_processor(queue)
    tracer = provider.get_tracer("t")
    tracer.start_span("first").end()
    await wait_until(lambda: queue.queued == 0, "the exporter took the first span")
    for i in range(40):  # the exporter is stuck: 10 wait, the rest are dropped at once
        tracer.start_span(f"s{i}").end()
    assert queue.queued <= 10
    dropped = sample(registry, "meshkit_traces_spans_dropped_total", reason="queue_full")
    assert dropped >= 30
    exporter.release.set()
    await asyncio.to_thread(provider.force_flush)
    assert len(exporter.exported) + dropped == 41
    assert sample(registry, "meshkit_traces_spans_exported_total") == len(exporter.exported)
    provider.shutdown()
    tracer.start_span("late").end()
    assert sample(registry, "meshkit_traces_spans_dropped_total", reason="shutdown") == 1


def test_failed_exports_are_counted() -> None:
    registry = CollectorRegistry()
    provider = TracerProvider()
    provider.add_span_processor(ExportQueue(FailingExporter(), metrics_registry=registry))
    for _ in range(3):
        provider.get_tracer("t").start_span("x").end()
    provider.force_flush()
    assert sample(registry, "meshkit_traces_spans_dropped_total", reason="export_failed") == 3
    provider.shutdown()


def test_tail_keeping_exports_errors_and_slow_spans_of_unsampled_traces() -> None:
    registry = CollectorRegistry()
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=make_sampler(0.0, tail=True))
    provider.add_span_processor(ExportQueue(exporter, slow_after=0.05, metrics_registry=registry))
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("root") as root:
        assert root.is_recording() and not root.get_span_context().trace_flags.sampled
        with tracer.start_as_current_span("fails") as failing:
            failing.set_status(Status(StatusCode.ERROR, "boom"))
        tracer.start_span("fine").end()
        slow = tracer.start_span("slow", start_time=1_000_000_000)
        slow.end(end_time=1_100_000_000)
    provider.force_flush()
    kept = {s.name: s.attributes["meshkit.kept"] for s in exporter.get_finished_spans()}
    assert kept == {"fails": "error", "slow": "slow"}
    assert sample(registry, "meshkit_traces_spans_tail_kept_total", reason="error") == 1
    provider.shutdown()

    # tail=False: unsampled spans are not even recorded
    off = TracerProvider(sampler=make_sampler(0.0, tail=False))
    assert not off.get_tracer("t").start_span("x").is_recording()
    # ratio 1: everything sampled
    on = TracerProvider(sampler=make_sampler(1.0))
    assert on.get_tracer("t").start_span("x").get_span_context().trace_flags.sampled


@pytest.mark.parametrize(
    ("env", "word"),
    [
        ({"MESHKIT_TRACES": "127.0.0.1:4318"}, "OTLP/HTTP URL"),
        ({"MESHKIT_TRACES": "http://h:4318", "MESHKIT_TRACES_SAMPLE": "2"}, "between 0 and 1"),
        ({"MESHKIT_TRACES_SAMPLE": "half"}, "MESHKIT_TRACES_SAMPLE"),
        ({"MESHKIT_TRACES_TAIL": "maybe"}, "MESHKIT_TRACES_TAIL"),
        ({"MESHKIT_TRACES_SLOW_MS": "-1"}, "MESHKIT_TRACES_SLOW_MS"),
        ({"MESHKIT_TRACES_QUEUE": "0"}, "MESHKIT_TRACES_QUEUE"),
    ],
)
def test_bad_trace_settings_are_clear_errors(env: dict[str, str], word: str) -> None:
    with pytest.raises(ConfigError, match=word):
        TraceSettings.from_env(env)


def test_trace_settings_from_env() -> None:
    settings = TraceSettings.from_env(
        {
            "MESHKIT_TRACES": "http://127.0.0.1:4318",
            "MESHKIT_TRACES_SAMPLE": "0.01",
            "MESHKIT_TRACES_TAIL": "0",
            "MESHKIT_TRACES_SLOW_MS": "250",
        }
    )
    assert settings.endpoint == "http://127.0.0.1:4318/v1/traces"
    assert (settings.sample, settings.tail, settings.slow_ms) == (0.01, False, 250.0)
    custom = TraceSettings.from_env({"MESHKIT_TRACES": "https://tempo:4318/otlp/v1/traces"})
    assert custom.endpoint == "https://tempo:4318/otlp/v1/traces"
    assert TraceSettings.from_env({}).endpoint == ""


@pytest.fixture
def memory_hook() -> Iterator[tuple[OTelHook, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = build_provider(
        TraceSettings(), exporter=exporter, service="t", metrics_registry=CollectorRegistry()
    )
    yield OTelHook(tracer_provider=provider), exporter
    provider.shutdown()


@pytest.fixture
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.mark.usefixtures("_restore_logging")
async def test_log_lines_inside_a_call_carry_its_trace_and_span_ids(
    memory_hook: tuple[OTelHook, InMemorySpanExporter],
) -> None:
    hook, exporter = memory_hook
    out = io.StringIO()
    configure_logging(level="debug", stream=out, processors=[add_trace_context])
    log = structlog.get_logger("app")

    class Logging(EchoImpl):
        async def echo(self, message: str) -> str:
            log.info("handling", message=message)
            return message

    async with traced_echo(hook, Logging()) as client:
        await client.echo("hi")
    log.info("outside")
    hook._provider.force_flush()  # type: ignore[union-attr]
    spans = {s.kind.name: s for s in exporter.get_finished_spans()}
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    handling = next(r for r in records if r["event"] == "handling")
    server = spans["SERVER"].get_span_context()
    assert handling["trace_id"] == format(server.trace_id, "032x")
    assert handling["span_id"] == format(server.span_id, "016x")
    # the per-call access line ("RPC cost") of each side carries the trace id too
    access = [r for r in records if r["event"] == "rpc"]
    assert {r["side"] for r in access} == {"client", "server"}
    assert all(r["trace_id"] == handling["trace_id"] and "duration_ms" in r for r in access)
    outside = next(r for r in records if r["event"] == "outside")
    assert "trace_id" not in outside


async def test_health_endpoint_continues_an_incoming_trace(
    memory_hook: tuple[OTelHook, InMemorySpanExporter],
) -> None:
    hook, exporter = memory_hook
    previous = trace._TRACER_PROVIDER  # the HTTP middleware uses the global provider
    trace._TRACER_PROVIDER = hook._provider  # type: ignore[assignment]
    svc = Service("echo", echo_thrift.Echo, registry=None, metrics_registry=CollectorRegistry())
    svc.implement(EchoImpl())
    await svc.start(port=0, health_port=0)
    try:
        parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{svc.health_port}"
            async with session.get(url + "/info", headers={"traceparent": parent}) as resp:
                assert resp.status == 200
            async with session.get(url + "/health/live") as resp:  # a probe: no span
                assert resp.status == 200
    finally:
        await svc.stop(drain_timeout=1.0)
        trace._TRACER_PROVIDER = previous
    hook._provider.force_flush()  # type: ignore[union-attr]
    (span,) = [s for s in exporter.get_finished_spans() if s.name.startswith("GET")]
    assert span.name == "GET /info"
    assert format(span.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    assert format(span.parent.span_id, "016x") == "b7ad6b7169203331"  # type: ignore[union-attr]
    assert span.attributes["http.response.status_code"] == 200


class SlowFirst(EchoImpl):
    def __init__(self, calls: list[int]) -> None:
        super().__init__()
        self.calls = calls  # shared by both instances

    async def echo(self, message: str) -> str:
        self.calls.append(1)
        if len(self.calls) == 1:
            await asyncio.sleep(0.5)  # the first attempt is slow: the hedge wins
        return message


async def test_hedges_are_child_spans_of_the_logical_call(
    memory_hook: tuple[OTelHook, InMemorySpanExporter],
) -> None:
    hook, exporter = memory_hook
    services = []
    calls: list[int] = []
    for _ in range(2):
        svc = Service(
            "echo",
            echo_thrift.Echo,
            registry=None,
            tracer=hook,
            metrics_registry=CollectorRegistry(),
        )
        svc.implement(SlowFirst(calls))
        await svc.start(port=0, health_port=0)
        services.append(svc)
    try:
        async with Client(
            echo_thrift.Echo,
            "echo",
            addr=[f"127.0.0.1:{s.port}" for s in services],
            tracer=hook,
            idempotent=["echo"],
            metrics_registry=CollectorRegistry(),
            hedge=HedgePolicy(methods={"echo"}, min_delay=0.01, max_delay=0.05),
        ) as client:
            assert await client.echo("x") == "x"
    finally:
        for svc in services:
            await svc.stop(drain_timeout=2.0)
    hook._provider.force_flush()  # type: ignore[union-attr]
    spans: list[Any] = list(exporter.get_finished_spans())
    (call,) = [s for s in spans if s.name == "echo/echo" and s.kind.name == "CLIENT"]
    (hedge,) = [s for s in spans if s.name == "echo/echo hedge 1"]
    assert hedge.parent.span_id == call.context.span_id
    assert hedge.attributes["meshkit.attempt_kind"] == "hedge"
    assert call.attributes["meshkit.hedged"] is True
    assert call.attributes["meshkit.hedge_winner"] == 1
    servers = [s for s in spans if s.kind.name == "SERVER"]
    assert {s.parent.span_id for s in servers} == {call.context.span_id, hedge.context.span_id}


async def test_a_bad_trace_setting_fails_service_start_but_never_a_call(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # As in a fresh process: no global provider yet (other tests may have installed one),
    # nothing reported yet, and the hook's logger captured whatever logging config is in use.
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    monkeypatch.setattr(otel, "_warned", set())
    caplog.set_level(logging.ERROR, logger="meshkit.tracing.otel")
    monkeypatch.setenv("MESHKIT_TRACES", "not-a-url")
    svc = Service("echo", echo_thrift.Echo, registry=None, metrics_registry=CollectorRegistry())
    svc.implement(EchoImpl())
    with pytest.raises(ConfigError, match="MESHKIT_TRACES"):
        await svc.start(port=0, health_port=0)
    # a plain client (no Service) keeps calling, untraced, and says why once
    monkeypatch.delenv("MESHKIT_TRACES")
    server = Service("echo", echo_thrift.Echo, registry=None, metrics_registry=CollectorRegistry())
    server.implement(EchoImpl())
    await server.start(port=0, health_port=0)
    monkeypatch.setenv("MESHKIT_TRACES", "not-a-url")
    try:
        async with Client(
            echo_thrift.Echo,
            "echo",
            addr=f"127.0.0.1:{server.port}",
            metrics_registry=CollectorRegistry(),
        ) as client:
            assert [await client.echo(str(i)) for i in range(3)] == ["0", "1", "2"]
    finally:
        await server.stop(drain_timeout=1.0)
    errors = [r for r in caplog.records if "tracing disabled" in r.getMessage()]
    assert len(errors) == 1 and "MESHKIT_TRACES" in errors[0].getMessage()
