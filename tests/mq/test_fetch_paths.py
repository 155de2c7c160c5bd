"""The consume loop's defensive paths on a real broker: an inline batch that no runner
took before the next batch arrived goes the usual way, in fetch order; a prefetch that
fails is awaited once, the loop keeps consuming, and nothing is lost.

Each forces its situation with a subclass overriding one method of the worker (no
runner to wake for the first inline batch; a failing first prefetch); everything else,
the consumer and the broker included, is real."""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message
from kafka_broker import CLIENT_SETTINGS, KafkaBroker, fresh
from prometheus_client import CollectorRegistry
from waiting import wait_until

from meshkit.mq import Subscription, Worker


class _NoRunnerForFirstInline(Worker):
    """The first batch handed to the inline path finds no idle runner to wake (as when
    every runner is still busy), so none takes it before the next batch arrives."""

    unpicked: list[Message] | None = None

    def _start_inline(self, messages: list[Message]) -> None:
        if self.unpicked is not None:
            super()._start_inline(messages)
            return
        self.unpicked = list(messages)
        idle, self._work.idle = self._work.idle, deque()  # the runners wait on the old one
        try:
            super()._start_inline(messages)
        finally:
            self._work.idle = idle


class _FailingPrefetch(Worker):
    """The first ``failures`` prefetches fail on the consumer thread, as ``consume()``
    does when librdkafka reports an error, without taking any message."""

    failures = 2
    failed = 0

    def _prefetch(self, n: int) -> asyncio.Future[list[Message]]:
        if self.failed >= self.failures:
            return super()._prefetch(n)
        self.failed += 1

        def fail() -> list[Message]:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "prefetch broke (test)"))

        assert self._loop is not None and self._io is not None
        return self._loop.run_in_executor(self._io, fail)


def _make(cls: type[Worker], broker: KafkaBroker, group: str, sub: Subscription, **kw: Any) -> Any:
    return cls(
        group,
        [sub],
        url=broker.url,
        config=CLIENT_SETTINGS,
        commit_interval=0.2,
        metrics_registry=kw.pop("registry"),
        **kw,
    )


def _produce_keyed(broker: KafkaBroker, topic: str, n: int, keys: int) -> None:
    broker.produce(topic, [(b"k%d" % (i % keys), b"%d" % i) for i in range(n)])


def _check_all_handled_once_in_key_order(seen: list[int], n: int, keys: int) -> None:
    assert sorted(seen) == list(range(n))  # each exactly once: nothing lost, no repeat
    by_key: dict[int, list[int]] = defaultdict(list)
    for i in seen:
        by_key[i % keys].append(i)
    assert all(v == sorted(v) for v in by_key.values()), "a key's messages out of order"


async def test_an_inline_batch_no_runner_took_is_dispatched_before_the_next_batch(
    broker: KafkaBroker, group: str
) -> None:
    """The first fetched batch is handed to the inline path but no runner takes it; when
    the next batch arrives the consume loop hands it to the usual dispatch first: every
    message is handled once, each key in order, in-flight returns to zero, counts are
    exact and the commit reaches the end."""
    topic = broker.create_topic(fresh("t"), 1)
    n, keys = 200, 5
    _produce_keyed(broker, topic, n, keys)
    seen: list[int] = []

    async def handle(value: bytes) -> None:
        seen.append(int(value))

    reg = CollectorRegistry()
    sub = Subscription(topic, handle, model=bytes)
    worker = _make(_NoRunnerForFirstInline, broker, group, sub, registry=reg, batch_size=20)
    await worker.start()
    try:
        await wait_until(lambda: len(seen) >= n, "all handled", limit=30)
        await wait_until(
            lambda: broker.committed(group, topic, 1) == {0: n}, "committed to the end", limit=10
        )
    finally:
        assert await worker.stop()
    assert worker.unpicked, "the first batch never went to the inline path"
    first = [int(m.value()) for m in worker.unpicked]
    assert first == list(range(len(first)))  # the batch that waited: the head of the topic
    _check_all_handled_once_in_key_order(seen, n, keys)
    assert worker.in_flight == 0
    labels = {"group": group, "topic": topic}
    assert reg.get_sample_value("meshkit_mq_processed_total", labels) == n
    assert reg.get_sample_value("meshkit_mq_handler_seconds_count", labels) == n


async def test_a_failed_prefetch_is_awaited_once_and_consuming_goes_on(
    broker: KafkaBroker, topic: str, group: str
) -> None:
    """The first two prefetches fail: each failure is reported once (``last_error``),
    the loop goes back to fetching, and every message is handled once, in key order,
    and committed."""
    n, keys = 300, 7
    _produce_keyed(broker, topic, n, keys)
    seen: list[int] = []

    async def handle(value: bytes) -> None:
        seen.append(int(value))

    reg = CollectorRegistry()
    sub = Subscription(topic, handle, model=bytes)
    worker = _make(_FailingPrefetch, broker, group, sub, registry=reg, batch_size=20)
    await worker.start()
    try:
        await wait_until(lambda: len(seen) >= n, "all handled after failed prefetches", limit=30)
        ends: dict[int, int] = {}
        for m in await asyncio.to_thread(broker.read_all, topic, expect=n):
            ends[m.partition()] = max(ends.get(m.partition(), 0), m.offset() + 1)
        await wait_until(
            lambda: all(broker.committed(group, topic, 3)[p] == e for p, e in ends.items()),
            "committed to the end",
            limit=10,
        )
    finally:
        assert await worker.stop()
    assert worker.failed == 2
    assert worker.last_error is not None and "prefetch broke (test)" in worker.last_error
    _check_all_handled_once_in_key_order(seen, n, keys)
    assert worker.in_flight == 0
    labels = {"group": group, "topic": topic}
    assert reg.get_sample_value("meshkit_mq_processed_total", labels) == n
