"""Publisher on a real broker: awaited deliveries, a full buffer is a clear error that
loses nothing, delivery failures raise, close flushes; trace context rides in headers
and the consumer span is a child of (and linked to) the producer span."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest
from kafka_broker import CLIENT_SETTINGS, KafkaBroker
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from waiting import wait_until

from meshkit.mq import (
    MessageContext,
    PublishBufferFull,
    Publisher,
    PublishError,
    Subscription,
    Worker,
)
from meshkit.mq import tracing as mq_tracing
from meshkit.mq.errors import ConfigError


@dataclasses.dataclass
class Payment:
    id: str
    cents: int


async def test_publish_awaits_delivery_with_key_headers_and_codecs(
    broker: KafkaBroker, topic: str
) -> None:
    reg = CollectorRegistry()
    pub = Publisher(broker.url, metrics_registry=reg)
    try:
        d1 = await pub.publish(topic, Payment("p1", 250), key="cust-1", headers={"h": "v"})
        d2 = await pub.publish(topic, b"\x00raw", key=b"cust-1")
        d3 = await pub.publish(topic, {"n": 3}, key=7)
    finally:
        assert await pub.close() == 0
    assert d1.topic == topic and d2.partition == d1.partition and d2.offset == d1.offset + 1
    msgs = {(m.partition(), m.offset()): m for m in await asyncio.to_thread(broker.read_all, topic)}
    m1, m2, m3 = (
        msgs[(d1.partition, d1.offset)],
        msgs[(d2.partition, d2.offset)],
        msgs[(d3.partition, d3.offset)],
    )
    assert m1.key() == b"cust-1" and m1.value() == b'{"id":"p1","cents":250}'
    assert ("h", b"v") in (m1.headers() or [])
    assert m2.value() == b"\x00raw"
    assert m3.key() == b"7" and m3.value() == b'{"n":3}'
    assert (
        reg.get_sample_value("meshkit_mq_published_total", {"topic": topic, "outcome": "ok"}) == 3
    )


async def test_full_buffer_is_a_clear_error_and_loses_nothing(
    broker: KafkaBroker, topic: str
) -> None:
    reg = CollectorRegistry()
    # A long linger keeps everything in the buffer while the loop below fills it.
    pub = Publisher(
        broker.url,
        config={"queue.buffering.max.messages": 5, "linger.ms": 2000},
        metrics_registry=reg,
    )
    futures = [pub.publish_nowait(topic, {"i": i}, key="k") for i in range(5)]
    with pytest.raises(PublishBufferFull) as info:
        pub.publish_nowait(topic, {"i": 5}, key="k")
    text = str(info.value)
    assert "RESOURCE_EXHAUSTED" in text and "buffer is full" in text
    assert "queue.buffering.max.messages=5" in text and topic in text
    assert reg.get_sample_value("meshkit_mq_publish_buffer_full_total", {"topic": topic}) == 1
    deliveries = await asyncio.gather(*futures)  # the five accepted ones all arrive
    assert [d.offset for d in deliveries] == sorted(d.offset for d in deliveries)
    await pub.publish(topic, {"i": 5}, key="k")  # room again
    assert await pub.close() == 0
    values = [m.value() for m in await asyncio.to_thread(broker.read_all, topic)]
    assert sorted(values) == sorted(f'{{"i":{i}}}'.encode() for i in range(6))


async def test_delivery_failure_raises_publish_error(broker: KafkaBroker, topic: str) -> None:
    pub = Publisher(broker.url, config={"message.timeout.ms": 2000})
    try:
        with pytest.raises(PublishError):
            await pub.publish(topic, {"x": 1}, partition=99)  # the topic has 3 partitions
    finally:
        await pub.close()
    with pytest.raises(PublishError, match="closed"):
        await pub.publish(topic, {"x": 1})


async def test_close_fails_what_the_broker_never_acknowledged() -> None:
    """Nothing listens: close() gives up after its timeout, says how many were left, and
    their futures fail with a clear error (librdkafka purges them and reports each)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: connections are refused
    reg = CollectorRegistry()
    pub = Publisher(
        f"kafka://127.0.0.1:{port}", config={"message.timeout.ms": 60_000}, metrics_registry=reg
    )
    futures = [pub.publish_nowait("nowhere", {"i": i}, key="k") for i in range(3)]
    assert pub.pending == 3
    assert await pub.close(timeout=0.3) == 3
    for future in futures:
        with pytest.raises(PublishError, match="closed before the broker acknowledged"):
            await future
    assert pub.pending == 0
    labels = {"topic": "nowhere", "outcome": "error"}
    assert reg.get_sample_value("meshkit_mq_published_total", labels) == 3


async def test_a_cancelled_publish_still_counts_its_delivery(
    broker: KafkaBroker, topic: str
) -> None:
    reg = CollectorRegistry()
    pub = Publisher(broker.url, metrics_registry=reg)
    cancelled = pub.publish_nowait(topic, b"gone", key="k")
    cancelled.cancel()
    kept = await pub.publish(topic, b"kept", key="k")
    assert await pub.close() == 0
    assert cancelled.cancelled() and kept.topic == topic
    labels = {"topic": topic, "outcome": "ok"}
    assert reg.get_sample_value("meshkit_mq_published_total", labels) == 2


def test_bad_urls_and_values_are_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESHKIT_MQ", raising=False)
    with pytest.raises(ConfigError, match="meshkit mq broker"):
        Publisher()
    with pytest.raises(ConfigError, match="kafka://"):
        Publisher("http://127.0.0.1:9092")
    with pytest.raises(ConfigError, match="port"):
        Publisher("kafka://127.0.0.1:99999")
    assert Publisher("kafka://a:1,b").bootstrap == "a:1,b:9092"


async def test_unserialisable_value_is_rejected_before_enqueueing(
    broker: KafkaBroker, topic: str
) -> None:
    pub = Publisher(broker.url)
    try:
        with pytest.raises(TypeError, match="JSON"):
            await pub.publish(topic, {"when": object()})
        with pytest.raises(TypeError, match="key"):
            await pub.publish(topic, {"ok": 1}, key=1.5)  # type: ignore[arg-type]
        assert pub.pending == 0
    finally:
        await pub.close()


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not hasattr(provider, "add_span_processor"):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
        provider = trace.get_tracer_provider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))  # type: ignore[attr-defined]
    monkeypatch.setattr(mq_tracing, "recording_until", 0.0)  # notice the SDK at once
    return exporter


async def test_trace_context_travels_producer_to_consumer(
    broker: KafkaBroker, topic: str, group: str, spans: InMemorySpanExporter
) -> None:
    seen: list[Any] = []

    async def handle(msg: dict[str, Any], ctx: MessageContext) -> None:
        seen.append((trace.get_current_span().get_span_context(), ctx.headers.get("traceparent")))

    tracer = trace.get_tracer("test")
    pub = Publisher(broker.url, metrics_registry=CollectorRegistry())
    with tracer.start_as_current_span("checkout") as root:
        await pub.publish(topic, {"order": 1}, key="o1")
    await pub.close()
    worker = Worker(
        group, [Subscription(topic, handle)], url=broker.url, config=CLIENT_SETTINGS,
        metrics_registry=CollectorRegistry(),
    )  # fmt: skip
    await worker.start()
    try:
        await wait_until(lambda: len(seen) == 1, "handled", limit=30)
    finally:
        await worker.stop()
    finished = {s.name: s for s in spans.get_finished_spans()}
    producer = finished[f"{topic} publish"]
    consumer = finished[f"{topic} process"]
    assert producer.kind is trace.SpanKind.PRODUCER and consumer.kind is trace.SpanKind.CONSUMER
    trace_id = root.get_span_context().trace_id
    assert producer.context.trace_id == consumer.context.trace_id == trace_id
    assert (
        producer.parent is not None and producer.parent.span_id == root.get_span_context().span_id
    )
    assert consumer.parent is not None and consumer.parent.span_id == producer.context.span_id
    assert [link.context.span_id for link in consumer.links] == [producer.context.span_id]
    assert consumer.attributes["messaging.destination.name"] == topic
    assert consumer.attributes["messaging.consumer.group.name"] == group
    # The consumer span is current while the handler runs (so its logs carry the trace id).
    current, header = seen[0]
    assert current.span_id == consumer.context.span_id and current.trace_id == trace_id
    assert header is not None and f"{trace_id:032x}" in header
