"""The worker's inline path (a fetched batch handled in one pass by one runner while
nothing else is in flight) on a real broker: handlers that suspend only sometimes keep
per-key order, let other keys go on and commit everything; failures raised before a
handler's first await, rejections and poison take the usual retry/DLQ route; counts
and latency observations add up."""

from __future__ import annotations

import asyncio
from collections import defaultdict

from kafka_broker import KafkaBroker, fresh, make_worker
from prometheus_client import CollectorRegistry
from waiting import wait_until

from meshkit.mq import DeadLetter, RetryPolicy, Subscription
from meshkit.mq import headers as H


def _ends(broker: KafkaBroker, topic: str) -> dict[int, int]:
    ends: dict[int, int] = {}
    for m in broker.read_all(topic):
        ends[m.partition()] = max(ends.get(m.partition(), 0), m.offset() + 1)
    return ends


def _committed_to(broker: KafkaBroker, group: str, topic: str, ends: dict[int, int]) -> bool:
    committed = broker.committed(group, topic, 3)
    return all(committed[p] == end for p, end in ends.items())


async def test_sometimes_suspending_handler_keeps_key_order_and_commits_all(
    broker: KafkaBroker, topic: str, group: str
) -> None:
    """Most messages return without suspending, every fifth sleeps, and key k0 blocks
    until every other message is handled: the batch moves on past the blocked runner
    (other keys are not held up), every key is handled in order, and the commit reaches
    the end of every partition once the blocked key is released."""
    n_keys, per_key = 10, 40
    broker.produce(
        topic, [(b"k%d" % k, b"%d:%d" % (k, i)) for i in range(per_key) for k in range(n_keys)]
    )
    total = n_keys * per_key
    seen: dict[int, list[int]] = defaultdict(list)
    release = asyncio.Event()

    async def handle(value: bytes) -> None:
        k, i = map(int, value.split(b":"))
        if k == 0 and i == 1:
            await release.wait()
        elif i % 5 == 0:
            await asyncio.sleep(0.001)
        seen[k].append(i)

    reg = CollectorRegistry()
    worker = make_worker(
        broker, group, [Subscription(topic, handle, model=bytes)], reg, concurrency=4
    )
    await worker.start()
    try:
        others = total - per_key + 1  # every other key, and k0's first message
        await wait_until(
            lambda: sum(map(len, seen.values())) >= others, "other keys handled", limit=30
        )
        assert seen[0] == [0]  # k0 waits behind its blocked message, in order
        release.set()
        await wait_until(lambda: sum(map(len, seen.values())) >= total, "all handled", limit=30)
        ends = await asyncio.to_thread(_ends, broker, topic)
        await wait_until(
            lambda: _committed_to(broker, group, topic, ends), "committed to the end", limit=10
        )
    finally:
        assert await worker.stop()
    assert dict(seen) == {k: list(range(per_key)) for k in range(n_keys)}
    assert worker.in_flight == 0
    labels = {"group": group, "topic": topic}
    assert reg.get_sample_value("meshkit_mq_processed_total", labels) == total
    assert reg.get_sample_value("meshkit_mq_handler_seconds_count", labels) == total
    assert reg.get_sample_value("meshkit_mq_failed_total", labels) == 0


async def test_failures_before_the_first_await_take_the_retry_and_dlq_route(
    broker: KafkaBroker, topic: str, group: str
) -> None:
    """A handler that raises synchronously (no await before it) is retried in place,
    moved to the retry topic and dead-lettered; a synchronous DeadLetter goes straight to
    the DLQ; an undecodable payload is poison. The messages around them are handled."""
    attempts: dict[str, int] = defaultdict(int)
    ok: list[str] = []

    async def handle(order: dict[str, str]) -> None:
        attempts[order["id"]] += 1
        if order["id"] == "fails":
            raise RuntimeError("no await before this")
        if order["id"] == "reject":
            raise DeadLetter("not ours")
        ok.append(order["id"])

    broker.produce(
        topic,
        [
            (b"a", b'{"id": "before"}'),
            (b"b", b'{"id": "fails"}'),
            (b"c", b'{"id": "reject"}'),
            (b"d", b"{not json"),
            (b"a", b'{"id": "after"}'),
        ],
    )
    reg = CollectorRegistry()
    policy = RetryPolicy(attempts=2, backoff=0.01, topic_delays=(0.2,))
    sub = Subscription(topic, handle, model=dict, retry=policy)
    worker = make_worker(broker, group, [sub], reg)
    await worker.start()
    try:
        dlq = f"{topic}.dlq"
        await wait_until(
            lambda: (
                reg.get_sample_value(
                    "meshkit_mq_dead_lettered_total",
                    {"group": group, "topic": topic, "reason": "exhausted"},
                )
                == 1
            ),
            "the failing message dead-lettered",
            limit=30,
        )
        moved = await asyncio.to_thread(broker.read_all, dlq, idle=0.5, expect=3)
    finally:
        assert await worker.stop()
    assert sorted(ok) == ["after", "before"]
    assert attempts["fails"] == 4  # two in place, two more from the retry topic
    assert attempts["reject"] == 1
    reasons = {m.key(): H.header_map(m.headers()) for m in moved}
    assert set(reasons) == {b"b", b"c", b"d"}
    assert reasons[b"b"][H.DEAD_LETTER_REASON] == "exhausted"
    assert reasons[b"b"][H.ATTEMPTS] == "4"
    assert reasons[b"b"][H.ERROR_TYPE] == "builtins.RuntimeError"
    assert reasons[b"c"][H.DEAD_LETTER_REASON] == "rejected"
    assert reasons[b"d"][H.DEAD_LETTER_REASON] == "poison"
    labels = {"group": group, "topic": topic}
    assert reg.get_sample_value("meshkit_mq_failed_total", labels) == 4 + 1
    ends = await asyncio.to_thread(_ends, broker, topic)
    assert _committed_to(broker, group, topic, ends)


async def test_messages_with_headers_in_an_inline_batch_keep_their_place(
    broker: KafkaBroker, group: str
) -> None:
    """Messages with headers in an inline batch go through the full path, in order with
    the others, and are counted once."""
    topic = broker.create_topic(fresh("t"), 1)
    broker.produce(
        topic,
        [(b"k", b"%d" % i, [("x-note", b"h")] if i % 3 == 0 else None) for i in range(30)],
    )
    seen: list[int] = []

    async def handle(value: bytes) -> None:
        seen.append(int(value))

    reg = CollectorRegistry()
    worker = make_worker(broker, group, [Subscription(topic, handle, model=bytes)], reg)
    await worker.start()
    try:
        await wait_until(lambda: len(seen) >= 30, "all handled", limit=30)
        await wait_until(
            lambda: broker.committed(group, topic, 1) == {0: 30}, "committed", limit=10
        )
    finally:
        assert await worker.stop()
    assert seen == list(range(30))  # one key: fetch order, headers or not
    labels = {"group": group, "topic": topic}
    assert reg.get_sample_value("meshkit_mq_processed_total", labels) == 30
    assert reg.get_sample_value("meshkit_mq_handler_seconds_count", labels) == 30


async def test_an_inline_batch_spanning_partitions_completes_every_partition(
    broker: KafkaBroker, topic: str, group: str
) -> None:
    """Small fetches (20 messages) over three partitions: most inline batches end one
    partition's run and start the next. Each run is settled on its own, so every
    partition's commit reaches its end and stop() reports everything finished."""
    n = 300
    broker.produce(topic, [(b"k%d" % (i % 7), b"%d" % i) for i in range(n)])
    seen: list[int] = []

    async def handle(value: bytes) -> None:
        seen.append(int(value))

    reg = CollectorRegistry()
    worker = make_worker(
        broker, group, [Subscription(topic, handle, model=bytes)], reg, batch_size=20
    )
    await worker.start()
    try:
        await wait_until(lambda: len(seen) >= n, "all handled", limit=30)
        ends = await asyncio.to_thread(_ends, broker, topic)
        assert len(ends) == 3
        await wait_until(
            lambda: _committed_to(broker, group, topic, ends), "committed to the end", limit=10
        )
    finally:
        assert await worker.stop()
    assert sorted(seen) == list(range(n))
    assert worker.in_flight == 0
    labels = {"group": group, "topic": topic}
    assert reg.get_sample_value("meshkit_mq_processed_total", labels) == n
