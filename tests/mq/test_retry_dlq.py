"""Failing handlers go through retry topics (honouring their delays) to the DLQ with the
right headers; poison and rejected messages go straight there; replay moves them back."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

import pydantic
from kafka_broker import KafkaBroker, make_worker
from prometheus_client import CollectorRegistry
from waiting import wait_until

from meshkit.mq import DeadLetter, MessageContext, Publisher, RetryPolicy, Subscription
from meshkit.mq import headers as H
from meshkit.mq.replay import replay_dlq


class Order(pydantic.BaseModel):
    id: str
    amount: int


def _sample(reg: CollectorRegistry, name: str, **labels: str) -> float:
    return reg.get_sample_value(name, labels) or 0.0


def _poison(reg: CollectorRegistry, group: str, topic: str) -> float:
    return _sample(reg, "meshkit_mq_dead_lettered_total", group=group, topic=topic, reason="poison")


async def test_failing_message_walks_retry_topics_to_dlq(
    broker: KafkaBroker, topic: str, group: str
) -> None:
    policy = RetryPolicy(attempts=2, backoff=0.01, topic_delays=(0.6, 0.6))
    attempts: list[tuple[str, int, int, float]] = []  # (order id, level, attempt, when)
    ok: list[str] = []

    async def handle(order: Order, ctx: MessageContext) -> None:
        if order.id == "bad":
            attempts.append((order.id, ctx.retry_level, ctx.attempt, time.time()))
            raise RuntimeError(f"payment service down (attempt {ctx.attempt})")
        ok.append(order.id)

    reg = CollectorRegistry()
    pub = Publisher(broker.url, metrics_registry=reg)
    bad = await pub.publish(topic, Order(id="bad", amount=1), key="same")
    for i in range(5):  # same key, after the bad one: they must not wait for its retries
        await pub.publish(topic, Order(id=f"ok{i}", amount=i), key="same")
    worker = make_worker(
        broker, group, [Subscription(topic, handle, model=Order, retry=policy)], reg
    )
    await worker.start()
    try:
        await wait_until(lambda: len(ok) == 5, "the good messages", limit=30)
        await wait_until(lambda: len(attempts) == 6, "six attempts", limit=30)
        dlq = await asyncio.to_thread(broker.read_all, f"{topic}.dlq", idle=0.5, expect=1)
    finally:
        await worker.stop()
        await pub.close()

    assert ok == [f"ok{i}" for i in range(5)]
    assert [(lvl, n) for _, lvl, n, _ in attempts] == [
        (0, 1),
        (0, 2),
        (1, 3),
        (1, 4),
        (2, 5),
        (2, 6),
    ]
    # Each retry level ran no earlier than its delay after the previous failure.
    assert attempts[2][3] - attempts[1][3] >= 0.55
    assert attempts[4][3] - attempts[3][3] >= 0.55
    assert len(dlq) == 1
    msg = dlq[0]
    h = H.header_map(msg.headers())
    assert msg.key() == b"same"
    assert Order.model_validate_json(msg.value()) == Order(id="bad", amount=1)
    assert h[H.ORIGINAL_TOPIC] == topic
    assert h[H.ORIGINAL_PARTITION] == str(bad.partition)
    assert h[H.ORIGINAL_OFFSET] == str(bad.offset)
    assert int(h[H.ORIGINAL_TIMESTAMP]) > 0
    assert h[H.ATTEMPTS] == "6"
    assert h[H.ERROR] == "payment service down (attempt 6)"
    assert h[H.ERROR_TYPE] == "builtins.RuntimeError"
    assert h[H.GROUP] == group
    assert h[H.DEAD_LETTER_REASON] == "exhausted"
    assert H.NOT_BEFORE not in h and H.RETRY_LEVEL not in h
    assert int(h[H.FAILED_AT]) >= int(h[H.ORIGINAL_TIMESTAMP])
    for level in (1, 2):
        moved = await asyncio.to_thread(
            broker.read_all, f"{topic}.retry.{level}", idle=0.3, expect=1
        )
        assert len(moved) == 1
        rh = H.header_map(moved[0].headers())
        assert rh[H.RETRY_LEVEL] == str(level) and rh[H.ATTEMPTS] == str(2 * level)
        assert rh[H.ORIGINAL_OFFSET] == str(bad.offset)
    labels = {"group": group, "topic": topic}
    assert _sample(reg, "meshkit_mq_failed_total", **labels) == 6
    assert _sample(reg, "meshkit_mq_retried_total", **labels, stage="inplace") == 3
    assert _sample(reg, "meshkit_mq_retried_total", **labels, stage="topic") == 2
    assert _sample(reg, "meshkit_mq_dead_lettered_total", **labels, reason="exhausted") == 1
    assert _sample(reg, "meshkit_mq_processed_total", **labels) == 5
    # Everything finished, so everything is committed: nothing is handled twice on restart.
    committed = broker.committed(group, topic, 3)
    assert committed[bad.partition] == bad.offset + 6


async def test_poison_and_rejected_go_straight_to_dlq_then_replay(
    broker: KafkaBroker, topic: str, group: str
) -> None:
    calls: dict[str, int] = defaultdict(int)
    fixed = False

    async def handle(order: Order, ctx: MessageContext) -> None:
        calls[order.id] += 1
        if order.id == "reject" and not fixed:
            raise DeadLetter("unknown customer 42")

    reg = CollectorRegistry()
    broker.produce(
        topic,
        [
            (b"p", b"{not json", [("trace-me", b"1")]),
            (b"r", Order(id="reject", amount=1).model_dump_json().encode()),
            (b"g", Order(id="good", amount=2).model_dump_json().encode()),
            (b"w", b'{"id": "x"}'),  # JSON, but not an Order
        ],
    )
    sub = Subscription(
        topic, handle, model=Order, retry=RetryPolicy(backoff=0.01, topic_delays=(5.0,))
    )
    worker = make_worker(broker, group, [sub], reg)
    await worker.start()
    try:
        await wait_until(
            lambda: _poison(reg, group, topic) == 2
            and calls["good"] == 1 and calls["reject"] == 1,
            "poison and rejected dead-lettered", limit=30,
        )  # fmt: skip
        dlq = await asyncio.to_thread(broker.read_all, f"{topic}.dlq", idle=0.5, expect=3)
        reasons = {m.key(): H.header_map(m.headers()) for m in dlq}
        assert set(reasons) == {b"p", b"r", b"w"}
        assert reasons[b"p"][H.DEAD_LETTER_REASON] == "poison"
        assert reasons[b"p"][H.ATTEMPTS] == "0"
        assert reasons[b"p"]["trace-me"] == "1"  # the message's own headers are kept
        assert "JSON" in reasons[b"p"][H.ERROR] or "Order" in reasons[b"p"][H.ERROR]
        assert reasons[b"w"][H.DEAD_LETTER_REASON] == "poison"
        assert reasons[b"r"][H.DEAD_LETTER_REASON] == "rejected"
        assert reasons[b"r"][H.ATTEMPTS] == "1"
        assert reasons[b"r"][H.ERROR] == "[INTERNAL] unknown customer 42"
        # Nothing went through a retry topic.
        assert await asyncio.to_thread(broker.read_all, f"{topic}.retry.1", idle=0.3) == []

        fixed = True
        first: set[tuple[int, int]] = set()
        result = await asyncio.to_thread(
            lambda: replay_dlq(topic, url=broker.url, on_message=lambda t, p, o: first.add((p, o)))
        )
        assert result.replayed == 3 and result.by_topic == {topic: 3}
        await wait_until(lambda: calls["reject"] == 2, "replayed message handled", limit=30)
        # The poison ones are poison still: back in the DLQ, the replay marked on them.
        await wait_until(
            lambda: _poison(reg, group, topic) == 4,
            "poison dead-lettered again", limit=30,
        )  # fmt: skip
        # The next replay starts where the last one stopped: only the two new DLQ entries.
        second: set[tuple[int, int]] = set()
        again = await asyncio.to_thread(
            lambda: replay_dlq(topic, url=broker.url, on_message=lambda t, p, o: second.add((p, o)))
        )
        assert again.replayed == 2 and not (first & second)
    finally:
        await worker.stop()
    dlq = await asyncio.to_thread(broker.read_all, f"{topic}.dlq", idle=0.5)
    replayed = [H.header_map(m.headers()) for m in dlq if (m.partition(), m.offset()) in second]
    assert len(replayed) == 2 and all(H.REPLAYED_AT in h for h in replayed)
    assert all(h[H.DEAD_LETTER_REASON] == "poison" for h in replayed)
    assert calls["good"] == 1


async def test_context_free_handler_retries_rejects_and_dead_letters_the_same_way(
    broker: KafkaBroker, topic: str, group: str
) -> None:
    """A handler without a context argument on a header-less message makes its first
    attempt on the worker's fast path; a failure there continues exactly as in the full
    path: in-place retry, retry topic, DLQ, DeadLetter and poison, with the same counts."""
    calls: dict[str, int] = defaultdict(int)

    async def handle(order: Order) -> None:
        calls[order.id] += 1
        if order.id == "flaky" and calls["flaky"] == 1:
            raise RuntimeError("flaky once")
        if order.id == "reject":
            raise DeadLetter("unknown customer 7")
        if order.id == "bad":
            raise RuntimeError(f"always failing (call {calls['bad']})")

    reg = CollectorRegistry()
    broker.produce(
        topic,
        [
            (key.encode(), Order(id=key, amount=1).model_dump_json().encode())
            for key in ("flaky", "reject", "bad", "good")
        ]
        + [(b"poison", b"{not json")],
    )
    policy = RetryPolicy(attempts=2, backoff=0.01, topic_delays=(0.2,))
    worker = make_worker(
        broker, group, [Subscription(topic, handle, model=Order, retry=policy)], reg
    )
    labels = {"group": group, "topic": topic}
    await worker.start()
    try:
        await wait_until(
            lambda: (
                _sample(reg, "meshkit_mq_dead_lettered_total", **labels, reason="exhausted") == 1
            ),
            "the failing message dead-lettered",
            limit=30,
        )
        await wait_until(lambda: _poison(reg, group, topic) == 1, "poison dead-lettered", limit=30)
        dlq = await asyncio.to_thread(broker.read_all, f"{topic}.dlq", idle=0.5, expect=3)
        moved = await asyncio.to_thread(broker.read_all, f"{topic}.retry.1", idle=0.3, expect=1)
    finally:
        await worker.stop()
    assert dict(calls) == {"flaky": 2, "reject": 1, "bad": 4, "good": 1}
    by_key = {m.key(): H.header_map(m.headers()) for m in dlq}
    assert set(by_key) == {b"reject", b"bad", b"poison"}
    assert by_key[b"reject"][H.DEAD_LETTER_REASON] == "rejected"
    assert by_key[b"reject"][H.ATTEMPTS] == "1"
    assert by_key[b"bad"][H.DEAD_LETTER_REASON] == "exhausted"
    assert by_key[b"bad"][H.ATTEMPTS] == "4"
    assert by_key[b"bad"][H.ERROR] == "always failing (call 4)"
    assert by_key[b"poison"][H.ATTEMPTS] == "0"
    assert [H.header_map(m.headers())[H.ATTEMPTS] for m in moved] == ["2"]
    assert _sample(reg, "meshkit_mq_failed_total", **labels) == 6
    assert _sample(reg, "meshkit_mq_retried_total", **labels, stage="inplace") == 3
    assert _sample(reg, "meshkit_mq_retried_total", **labels, stage="topic") == 1
    assert _sample(reg, "meshkit_mq_dead_lettered_total", **labels, reason="rejected") == 1
    assert _sample(reg, "meshkit_mq_processed_total", **labels) == 2
    assert _sample(reg, "meshkit_mq_handler_seconds_count", **labels) == 8
