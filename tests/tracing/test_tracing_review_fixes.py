"""Regression tests for the bugs a review of the tracing code found (one test or two each)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from echo_support import EchoImpl, echo_thrift
from kafka_broker import KafkaBroker, fresh, make_worker
from opentelemetry import baggage, propagate, trace
from opentelemetry import context as otel_context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry
from waiting import finishes_within, wait_until

from meshkit import Client, Service, Unavailable
from meshkit.mq import Subscription
from meshkit.mq import tracing as mq_tracing
from meshkit.rpc.hedge import HedgePolicy
from meshkit.tracing import w3c
from meshkit.tracing.export import ExportQueue
from meshkit.tracing.fastspan import recorder_for
from meshkit.tracing.otel import OTelHook
from meshkit.tracing.otlp_encode import OtlpHttpExporter
from meshkit.tracing.provider import TraceSettings, build_provider
from meshkit.tracing.sampling import make_sampler
from meshkit.tracing.tailspan import TailSpan

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def memory_provider(sample_ratio: float = 1.0) -> tuple[Any, InMemorySpanExporter, Any]:
    exporter = InMemorySpanExporter()
    registry = CollectorRegistry()
    provider = build_provider(
        TraceSettings(sample=sample_ratio, slow_ms=60_000.0),
        exporter=exporter,
        service="t",
        metrics_registry=registry,
    )
    return provider, exporter, registry


@pytest.fixture
def no_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    """No OpenTelemetry SDK installed (the global provider is the API's proxy)."""
    monkeypatch.delenv("MESHKIT_TRACES", raising=False)
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    monkeypatch.setattr(mq_tracing, "recording_until", 0.0)


@pytest.fixture
def global_sdk(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """A plain SDK provider installed globally, exporting to memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    monkeypatch.setattr(mq_tracing, "recording_until", 0.0)
    yield exporter
    provider.shutdown()


async def start_service(impl: Any, hook: Any = None) -> Service:
    svc = Service(
        "echo", echo_thrift.Echo, registry=None, tracer=hook, metrics_registry=CollectorRegistry()
    )
    svc.implement(impl)
    await svc.start(port=0, health_port=0)
    return svc


def client(port: int, hook: Any = None, **options: Any) -> Client:
    return Client(
        echo_thrift.Echo,
        "echo",
        addr=f"127.0.0.1:{port}",
        tracer=hook,
        metrics_registry=CollectorRegistry(),
        **options,
    )


# -- 1. flush and shutdown keep to their time bound ------------------------------------


@pytest.fixture
def hung_collector() -> Iterator[str]:
    """The URL of a collector that accepts connections and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)  # connections complete in the kernel; nothing reads them
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1/traces"


def _queue_with_batches(url: str, registry: CollectorRegistry, **options: Any) -> ExportQueue:
    exporter = OtlpHttpExporter(url, timeout=5.0)  # as build_provider makes it
    queue = ExportQueue(exporter, max_batch=50, delay=3600, metrics_registry=registry, **options)
    provider = TracerProvider()
    provider.add_span_processor(queue)
    tracer = provider.get_tracer("t")
    for i in range(149):  # 3 batches, each waiting 5 s for an answer that never comes
        tracer.start_span(f"s{i}").end()
    return queue


def _accounted(registry: CollectorRegistry) -> float:
    return sum(
        sample(registry, "meshkit_traces_spans_dropped_total", reason=r)
        for r in ("export_failed", "shutdown", "queue_full")
    ) + sample(registry, "meshkit_traces_spans_exported_total")


async def test_force_flush_returns_by_its_timeout_when_the_collector_hangs(
    hung_collector: str,
) -> None:
    registry = CollectorRegistry()
    queue = _queue_with_batches(hung_collector, registry)
    # before: 5 s per queued batch whatever the timeout
    assert finishes_within(3.0, queue.force_flush, 300) is False
    assert queue.queued > 0  # left for the background thread: nothing lost yet
    finishes_within(3.0, queue.shutdown, 100)
    assert queue.queued == 0
    # every span counted once (a batch the thread was sending: when its export ends)
    await wait_until(lambda: _accounted(registry) == 149, "every span accounted for")


async def test_shutdown_keeps_to_its_bound_and_counts_what_it_left(
    hung_collector: str,
) -> None:
    registry = CollectorRegistry()
    queue = _queue_with_batches(hung_collector, registry, shutdown_timeout=0.3)
    finishes_within(3.0, queue.shutdown)  # before: 5 s per batch
    assert sample(registry, "meshkit_traces_spans_dropped_total", reason="shutdown") > 0
    assert queue.queued == 0
    await wait_until(lambda: _accounted(registry) == 149, "every span accounted for")


# -- 2. a retry carries its own span's context whatever the propagators ------------------


class FailsFirst(EchoImpl):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def echo(self, message: str) -> str:
        self.calls += 1
        if self.calls == 1:
            raise Unavailable("the first attempt fails on purpose")
        return message


async def test_a_retry_carries_its_span_context_with_other_propagators(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # OTEL_PROPAGATORS=tracecontext: not the default pair, so w3c.inject's general path
    monkeypatch.setattr(
        propagate, "_HTTP_TEXT_FORMAT", CompositePropagator([TraceContextTextMapPropagator()])
    )
    provider, exporter, _ = memory_provider()
    hook = OTelHook(tracer_provider=provider)
    svc = await start_service(FailsFirst(), hook)
    try:
        async with client(svc.port, hook, idempotent=["echo"]) as c:
            assert await c.echo("x") == "x"
    finally:
        await svc.stop(drain_timeout=1.0)
    provider.force_flush()
    spans = exporter.get_finished_spans()
    (retry,) = [s for s in spans if s.name == "echo/echo retry 1"]
    servers = sorted((s for s in spans if s.kind is SpanKind.SERVER), key=lambda s: s.start_time)
    assert len(servers) == 2
    assert servers[1].parent is not None
    assert servers[1].parent.span_id == retry.context.span_id  # before: the call span's
    provider.shutdown()


# -- 3. a hedge that lost the race is not an error --------------------------------------


class SlowHedge(EchoImpl):
    def __init__(self) -> None:
        super().__init__()
        self.calls = self.answered = 0

    async def echo(self, message: str) -> str:
        self.calls += 1
        await asyncio.sleep(0.15 if self.calls == 1 else 0.6)  # attempt 0 wins
        self.answered += 1
        return message


@pytest.mark.parametrize("ratio", [1.0, 0.0])
async def test_a_cancelled_losing_hedge_is_not_an_error(ratio: float) -> None:
    provider, exporter, registry = memory_provider(ratio)
    hook = OTelHook(tracer_provider=provider)
    impl = SlowHedge()
    svc = await start_service(impl, hook)
    try:
        async with client(
            svc.port,
            hook,
            idempotent=["echo"],
            hedge=HedgePolicy(methods={"echo"}, min_delay=0.02, max_delay=0.05),
        ) as c:
            assert await c.echo("x") == "x"
        # the server finishes the hedge it was sent (its span is no error either)
        await wait_until(lambda: impl.answered == 2, "the server answered both attempts")
    finally:
        await svc.stop(drain_timeout=0.2)
    provider.force_flush()
    spans = exporter.get_finished_spans()
    hedges = [s for s in spans if s.name == "echo/echo hedge 1"]
    if ratio == 1.0:
        (hedge,) = hedges
        assert hedge.status.status_code is not StatusCode.ERROR
        assert hedge.attributes["meshkit.status_code"] == "CANCELLED"
        assert hedge.attributes["meshkit.hedge_lost"] is True
        (call,) = [s for s in spans if s.name == "echo/echo" and s.kind is SpanKind.CLIENT]
        assert call.attributes["meshkit.hedge_winner"] == 0
    else:
        assert hedges == []  # before: tail-kept as an error
        assert sample(registry, "meshkit_traces_spans_tail_kept_total", reason="error") == 0
    provider.shutdown()


class FailsThenSlow(EchoImpl):
    """Attempt 0 fails, the retry (attempt 1) is slow, the hedge sent for it answers."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def echo(self, message: str) -> str:
        self.calls += 1
        if self.calls == 1:
            raise Unavailable("the first attempt fails on purpose")
        if self.calls == 2:
            await asyncio.sleep(0.5)
        return message


async def test_a_retry_cancelled_by_its_winning_hedge_is_not_an_error() -> None:
    provider, exporter, _ = memory_provider()
    hook = OTelHook(tracer_provider=provider)
    impl = FailsThenSlow()
    svc = await start_service(impl, hook)
    try:
        async with client(
            svc.port,
            hook,
            idempotent=["echo"],
            hedge=HedgePolicy(methods={"echo"}, min_delay=0.02, max_delay=0.05),
        ) as c:
            assert await c.echo("x") == "x"
    finally:
        await svc.stop(drain_timeout=1.0)
    provider.force_flush()
    spans = exporter.get_finished_spans()
    (retry,) = [s for s in spans if s.name == "echo/echo retry 1"]
    assert retry.status.status_code is not StatusCode.ERROR
    assert retry.attributes["meshkit.hedge_lost"] is True
    (call,) = [s for s in spans if s.name == "echo/echo" and s.kind is SpanKind.CLIENT]
    assert "meshkit.hedge_lost" not in call.attributes
    assert call.status.status_code is not StatusCode.ERROR
    provider.shutdown()


# -- 4. HTTP 4xx answers are not server errors; names stay bounded -------------------------


@pytest.mark.parametrize("flags", ["01", "00"])
async def test_http_4xx_answers_are_not_errors(flags: str, monkeypatch: pytest.MonkeyPatch) -> None:
    provider, exporter, registry = memory_provider(1.0 if flags == "01" else 0.0)
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)  # the middleware's provider
    svc = await start_service(EchoImpl())
    try:
        base = f"http://127.0.0.1:{svc.health_port}"
        parent = f"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-{flags}"
        async with aiohttp.ClientSession() as session:
            for method, path, status in (
                ("GET", "/no/such/page", 404),
                ("GET", "/another/unknown/1234", 404),
                ("POST", "/info", 405),
                ("GET", "/info", 200),
            ):
                headers = {"traceparent": parent}
                async with session.request(method, base + path, headers=headers) as resp:
                    assert resp.status == status
    finally:
        await svc.stop(drain_timeout=1.0)
    provider.force_flush()
    spans = {s.name: s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER}
    if flags == "01":
        # unknown paths share one name (the method), not one per path
        assert sorted(spans) == ["GET", "GET /info", "POST"]
        answers = [s.attributes["http.response.status_code"] for s in spans.values()]
        assert sorted(answers) == [200, 404, 405]
        assert all(s.status.status_code is not StatusCode.ERROR for s in spans.values())
        assert spans["GET /info"].attributes["http.route"] == "/info"
    else:
        assert spans == {}  # before: each 4xx tail-kept as an error
        assert sample(registry, "meshkit_traces_spans_tail_kept_total", reason="error") == 0
    provider.shutdown()


# -- 5. a request's context starts clean ---------------------------------------------------


def test_extract_holds_only_what_the_headers_carry() -> None:
    token = otel_context.attach(baggage.set_baggage("ambient", "leaked"))
    try:
        context = w3c.extract({"traceparent": TRACEPARENT})
        assert baggage.get_all(context) == {}
        context = w3c.extract({"traceparent": TRACEPARENT, "baggage": "tenant=acme"})
        assert dict(baggage.get_all(context)) == {"tenant": "acme"}
        assert format(trace.get_current_span(context).get_span_context().span_id, "016x") == (
            "b7ad6b7169203331"
        )
    finally:
        otel_context.detach(token)


class Baggage(EchoImpl):
    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, dict[str, object]] = {}

    async def echo(self, message: str) -> str:
        self.seen[message] = dict(baggage.get_all())
        return message


async def _call_in(context: otel_context.Context, port: int, message: str) -> None:
    token = otel_context.attach(context)
    try:
        async with client(port, OTelHook()) as c:
            await c.echo(message)
    finally:
        otel_context.detach(token)


async def test_a_handler_does_not_inherit_the_context_its_service_started_in(
    no_sdk: None,
) -> None:
    impl = Baggage()
    token = otel_context.attach(baggage.set_baggage("startup", "leaked"))
    try:
        svc = await start_service(impl, OTelHook())
    finally:
        otel_context.detach(token)
    try:
        traced = propagate.extract({"traceparent": TRACEPARENT})
        await asyncio.create_task(_call_in(traced, svc.port, "with traceparent"))
        await asyncio.create_task(_call_in(otel_context.Context(), svc.port, "without"))
    finally:
        await svc.stop(drain_timeout=1.0)
    assert impl.seen == {"with traceparent": {}, "without": {}}


# -- 6. a message without trace headers starts a trace of its own ---------------------------


async def test_a_message_without_trace_headers_is_a_root_consumer_span(
    broker: KafkaBroker, global_sdk: InMemorySpanExporter
) -> None:
    topic = broker.create_topic(fresh("t"), 1)
    broker.produce(topic, [(b"a", b"1"), (b"b", b"2")])  # plain messages, no headers
    done: list[bytes] = []

    async def handle(value: bytes) -> None:
        done.append(value)

    worker = make_worker(
        broker, fresh("g"), [Subscription(topic, handle, model=bytes)], CollectorRegistry()
    )
    with trace.get_tracer("app").start_as_current_span("startup") as startup:
        await worker.start()
    try:
        await wait_until(lambda: len(done) == 2, "both messages handled", limit=30)
    finally:
        await worker.stop()
    consumers = [s for s in global_sdk.get_finished_spans() if s.kind is SpanKind.CONSUMER]
    assert len(consumers) == 2
    for span in consumers:
        assert span.parent is None  # before: the startup span
        assert span.context.trace_id != startup.get_span_context().trace_id


def test_without_sdk_a_message_without_trace_headers_runs_in_an_empty_context(
    no_sdk: None,
) -> None:
    token = otel_context.attach(baggage.set_baggage("startup", "leaked"))
    try:
        span = mq_tracing.ConsumerSpan("t", "g", 0, 1, None, [])
        try:
            assert baggage.get_all() == {}
        finally:
            span.end(None)
        assert dict(baggage.get_all()) == {"startup": "leaked"}
    finally:
        otel_context.detach(token)


# -- 7. baggage travels without an SDK --------------------------------------------------------


async def test_baggage_travels_on_rpc_without_an_sdk(no_sdk: None) -> None:
    impl = Baggage()
    svc = await start_service(impl, OTelHook())
    try:
        with_baggage = baggage.set_baggage("tenant", "acme", otel_context.Context())
        await _call_in(with_baggage, svc.port, "baggage only")
    finally:
        await svc.stop(drain_timeout=1.0)
    assert impl.seen == {"baggage only": {"tenant": "acme"}}


# -- 8. span limits, UNSET, tail-kept counting ------------------------------------------------


def test_meshkit_spans_apply_the_providers_span_limits() -> None:
    provider, exporter, _ = memory_provider()
    recorder = recorder_for(provider)
    assert recorder is not None
    span: Any = recorder.start("s", SpanKind.INTERNAL, {"first": 1})
    for i in range(300):
        span.set_attribute(f"a{i}", i)
        span.add_event(f"e{i}", {f"k{j}": j for j in range(200)})
    span.end()
    provider.force_flush()
    (done,) = exporter.get_finished_spans()
    assert len(done.attributes) == 128 and done.attributes["a299"] == 299
    assert len(done.events) == 128 and done.events[-1].name == "e299"
    assert len(done.events[-1].attributes) == 128
    provider.shutdown()


def test_an_unsampled_span_kept_for_an_error_applies_the_limits() -> None:
    provider, exporter, _ = memory_provider(0.0)
    hook = OTelHook(tracer_provider=provider)
    hook._tracer()
    recorder = hook._recorder
    context, _ = recorder.begin(None)
    outline = TailSpan(context, None, SpanKind.SERVER, 1)
    for i in range(300):
        outline.set_attribute(f"a{i}", i)
        outline.add_event(f"e{i}")
    outline.set_status(StatusCode.ERROR, "boom")
    full = recorder.build_kept(outline, "s", {}, 2)
    full.end()
    provider.force_flush()
    (done,) = exporter.get_finished_spans()
    assert len(done.attributes) <= 129  # 128 and meshkit.kept
    assert len(done.events) == 128 and done.events[-1].name == "e299"
    provider.shutdown()


def test_unset_status_does_not_erase_an_error() -> None:
    provider, _, _ = memory_provider()
    recorder = recorder_for(provider)
    assert recorder is not None
    span: Any = recorder.start("s", SpanKind.INTERNAL, {})
    span.set_status(StatusCode.ERROR, "boom")
    span.set_status(StatusCode.UNSET)
    assert span.status.status_code is StatusCode.ERROR
    span.end()
    outline = TailSpan(span.get_span_context(), None, SpanKind.SERVER, 1)
    outline.set_status(StatusCode.ERROR, "boom")
    outline.set_status(StatusCode.UNSET)
    assert outline.erred
    provider.shutdown()


def test_a_tail_kept_span_dropped_by_a_full_queue_is_counted_once() -> None:
    registry = CollectorRegistry()
    exporter = InMemorySpanExporter()
    queue = ExportQueue(exporter, max_queue=1, delay=3600, metrics_registry=registry)
    provider = TracerProvider(sampler=make_sampler(0.0))  # record-only: tail keeping
    provider.add_span_processor(queue)
    tracer = provider.get_tracer("t")
    for i in range(3):
        span = tracer.start_span(f"failing {i}")
        span.set_status(StatusCode.ERROR, "boom")
        span.end()
    queue.force_flush()
    exported: list[ReadableSpan] = list(exporter.get_finished_spans())
    assert len(exported) == 1
    assert sample(registry, "meshkit_traces_spans_dropped_total", reason="queue_full") == 2
    # before: 3 (the two dropped were counted as kept too)
    assert sample(registry, "meshkit_traces_spans_tail_kept_total", reason="error") == 1
    provider.shutdown()
