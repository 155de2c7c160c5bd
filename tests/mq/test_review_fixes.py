"""Regressions for bugs a review found in the worker and publisher, on a real broker.

* A retry partition fetched as [due…, not due]: the due messages' batch is closed at
  the held one (committed up to it, counted in flight exactly once), and a held
  partition leaves no empty batch behind for stop() to wait on.
* cooperative-sticky: an incremental assignment while the buffer is full keeps the
  partitions the worker had paused resumable (it used to forget they were paused).
* A handler raising CancelledError its worker did not cause (it awaited something
  cancelled elsewhere) fails like any handler (retried, then dead-lettered) instead of
  killing its runner silently.
* start() against a broker that does not answer raises MqError, leaves nothing
  running and no librdkafka noise on stderr, and can be called again.
* A header value that is not text, bytes or None is refused (an int used to become
  that many NUL bytes).
"""

from __future__ import annotations

import asyncio
import re
import threading
import time

import pytest
from kafka_broker import CLIENT_SETTINGS, KafkaBroker, fresh, make_worker
from prometheus_client import CollectorRegistry
from waiting import wait_until

from meshkit.mq import MessageContext, MqError, Publisher, RetryPolicy, Subscription, Worker
from meshkit.mq import headers as H
from meshkit.mq.broker import free_port


def _retry_headers(not_before_ms: int) -> list[tuple[str, bytes]]:
    return [(H.NOT_BEFORE, str(not_before_ms).encode()), (H.RETRY_LEVEL, b"1")]


def _topic_with_retry(broker: KafkaBroker) -> str:
    topic = broker.create_topic(fresh("t"), 1)
    broker.create_topic(f"{topic}.retry.1", 1)
    broker.create_topic(f"{topic}.dlq", 1)
    return topic


def _held_worker(
    broker: KafkaBroker, group: str, topic: str, handle: object, **kw: object
) -> Worker:
    policy = RetryPolicy(attempts=1, topic_delays=(120.0,))
    return make_worker(
        broker,
        group,
        [Subscription(topic, handle, model=bytes, retry=policy)],  # type: ignore[arg-type]
        CollectorRegistry(),
        **kw,
    )


async def test_retry_partition_due_then_held_commits_up_to_the_held_message(
    broker: KafkaBroker, group: str
) -> None:
    topic = _topic_with_retry(broker)
    now = int(time.time() * 1000)
    due = [(b"k%d" % i, b"due%d" % i, _retry_headers(now - 1000)) for i in range(5)]
    later = [(b"kx", b"later", _retry_headers(now + 120_000))]
    broker.produce(f"{topic}.retry.1", due + later)
    seen: list[bytes] = []

    async def handle(value: bytes) -> None:
        seen.append(value)

    worker = _held_worker(broker, group, topic, handle, drain_timeout=30.0)
    await worker.start()
    try:
        await wait_until(lambda: len(seen) == 5, "the due retry messages", limit=30)
        # Committed up to the held message (offset 5), which is not handled yet.
        await wait_until(
            lambda: worker._states[(f"{topic}.retry.1", 0)].committed == 5,
            "the commit up to the held message",
            limit=15,
        )
        assert worker.in_flight == 0
        assert worker.last_error is None
        assert sorted(seen) == [b"due%d" % i for i in range(5)]
    finally:
        # Nothing is in flight: stop() returns True without waiting out drain_timeout.
        finished = await asyncio.wait_for(worker.stop(), 20)
    assert finished
    assert broker.committed(group, f"{topic}.retry.1", 1) == {0: 5}


async def test_held_retry_partition_leaves_nothing_for_stop_to_wait_on(
    broker: KafkaBroker, group: str
) -> None:
    topic = _topic_with_retry(broker)
    now = int(time.time() * 1000)
    broker.produce(f"{topic}.retry.1", [(b"kx", b"later", _retry_headers(now + 120_000))])
    seen: list[bytes] = []

    async def handle(value: bytes) -> None:
        seen.append(value)

    worker = _held_worker(broker, group, topic, handle, drain_timeout=60.0)
    await worker.start()
    try:
        await wait_until(lambda: bool(worker._held), "the retry partition held", limit=30)
        assert not worker._states[(f"{topic}.retry.1", 0)].batches
        assert worker.in_flight == 0
    finally:
        # A leftover empty batch made stop() wait the whole drain_timeout (60 s here).
        finished = await asyncio.wait_for(worker.stop(), 20)
    assert finished
    assert seen == []


async def test_held_retry_partition_keeps_key_order_on_the_main_topic(
    broker: KafkaBroker, group: str
) -> None:
    """With in_flight counted right after a held fetch, a later batch of one key goes
    through the usual dispatch while that key's message runs: handled in order, none lost."""
    topic = _topic_with_retry(broker)
    now = int(time.time() * 1000)
    due = [(b"r%d" % i, b"r%d" % i, _retry_headers(now - 1000)) for i in range(5)]
    later = [(b"rx", b"rx", _retry_headers(now + 120_000))]
    broker.produce(f"{topic}.retry.1", due + later)
    seen: list[bytes] = []
    gate = asyncio.Event()

    async def handle(value: bytes) -> None:
        if value == b"a0":
            await gate.wait()
        else:
            await asyncio.sleep(0)
        seen.append(value)

    worker = _held_worker(broker, group, topic, handle)
    await worker.start()
    try:
        await wait_until(lambda: len(seen) == 5, "the due retry messages", limit=30)
        await wait_until(lambda: worker.in_flight == 0, "nothing in flight")
        await asyncio.to_thread(broker.produce, topic, [(b"K", b"a%d" % i) for i in range(5)])
        await wait_until(lambda: worker.in_flight == 5, "a0..a4 fetched", limit=15)
        await asyncio.to_thread(broker.produce, topic, [(b"K", b"b0")])
        await wait_until(lambda: worker.in_flight == 6, "b0 fetched behind a0", limit=15)
        gate.set()
        await wait_until(lambda: len(seen) == 11, "key K handled", limit=15)
    finally:
        gate.set()
        await worker.stop(timeout=5)
    assert seen[5:] == [b"a0", b"a1", b"a2", b"a3", b"a4", b"b0"]


@pytest.mark.slow
async def test_cooperative_rebalance_while_paused_keeps_consuming(broker: KafkaBroker) -> None:
    """A worker with a tiny buffer is paused nearly all the time; a second one joins
    under cooperative-sticky (the first keeps half its partitions, incrementally):
    every message is handled and committed, by one worker or the other."""
    topic = broker.create_topic(fresh("t"), 4)
    group = fresh("g")
    n = 3000
    broker.produce(topic, [(b"k%d" % (i % 64), b"%d" % i) for i in range(n)])
    handled: dict[str, set[int]] = {"w1": set(), "w2": set()}

    def handler(name: str) -> object:
        async def handle(value: bytes, ctx: MessageContext) -> None:
            await asyncio.sleep(0.005)
            handled[name].add(int(value))

        return handle

    coop = {
        **CLIENT_SETTINGS,
        "partition.assignment.strategy": "cooperative-sticky",
        # tansu answers a fetch only after fetch.wait.max.ms: with a tiny buffer every
        # resume waits for one, so keep it short (the test is about progress, not speed)
        "fetch.wait.max.ms": 10,
    }

    def worker(name: str) -> Worker:
        return Worker(
            group,
            [Subscription(topic, handler(name), model=bytes, retry=RetryPolicy(topic_delays=()))],  # type: ignore[arg-type]
            url=broker.url,
            config=coop,
            commit_interval=0.2,
            max_buffered=8,
            concurrency=4,
            drain_timeout=2.0,
            metrics_registry=CollectorRegistry(),
        )

    w1, w2 = worker("w1"), worker("w2")
    await w1.start()
    try:
        await wait_until(lambda: len(handled["w1"]) >= 50, "w1 under way", limit=30)
        await w2.start()
        await wait_until(lambda: bool(w2._assigned), "w2 assigned", limit=30)
        await wait_until(lambda: len(w1._assigned) == 2, "w1 keeps two partitions", limit=30)
        await wait_until(
            lambda: len(handled["w1"] | handled["w2"]) == n, "every message handled", limit=60
        )
        await wait_until(
            lambda: asyncio.to_thread(lambda: sum(broker.committed(group, topic, 4).values()) == n),
            "everything committed",
            limit=30,
        )
    finally:
        await w2.stop()
        await w1.stop()


async def _foreign_cancel() -> None:
    """Await a future someone else cancelled (a shared client's request, say)."""
    future = asyncio.get_running_loop().create_future()
    future.cancel()
    await future


@pytest.mark.parametrize("suspend_first", [False, True], ids=["inline", "dispatched"])
async def test_handler_cancelled_elsewhere_is_retried_and_the_runner_lives(
    broker: KafkaBroker, group: str, suspend_first: bool
) -> None:
    """Without suspending first, message 1 fails in the inline pass; after a sleep it
    fails on a runner taking dispatched messages: retried in place either way, the key
    keeps its order, everything is committed and every runner is still there."""
    topic = broker.create_topic(fresh("t"), 1)
    broker.produce(topic, [(b"k", b"0"), (b"k", b"1"), (b"k", b"2")])
    seen: list[bytes] = []
    failed: list[bytes] = []

    async def handle(value: bytes) -> None:
        if suspend_first:
            await asyncio.sleep(0.01)
        if value == b"1" and not failed:
            failed.append(value)
            await _foreign_cancel()
        seen.append(value)

    policy = RetryPolicy(attempts=2, backoff=0.01, topic_delays=())
    worker = make_worker(
        broker,
        group,
        [Subscription(topic, handle, model=bytes, retry=policy)],
        CollectorRegistry(),
        concurrency=2,
    )
    await worker.start()
    try:
        await wait_until(lambda: len(seen) == 3, "three messages handled", limit=30)
        await wait_until(
            lambda: worker._states[(topic, 0)].committed == 3, "the commit of all three"
        )
        assert all(not r.done() for r in worker._runners)
        assert len(worker._runners) == 2
    finally:
        assert await worker.stop()
    assert failed == [b"1"]
    assert seen == [b"0", b"1", b"2"]
    assert broker.committed(group, topic, 1) == {0: 3}


async def test_handler_always_cancelled_elsewhere_is_dead_lettered(
    broker: KafkaBroker, group: str
) -> None:
    topic = broker.create_topic(fresh("t"), 1)
    broker.create_topic(f"{topic}.dlq", 1)
    broker.produce(topic, [(b"k", b"0"), (b"k", b"1"), (b"k", b"2")])
    seen: list[bytes] = []
    attempts: list[bytes] = []

    async def handle(value: bytes) -> None:
        await asyncio.sleep(0.001)
        if value == b"1":
            attempts.append(value)
            await _foreign_cancel()
        seen.append(value)

    policy = RetryPolicy(attempts=2, backoff=0.01, topic_delays=())
    worker = make_worker(
        broker,
        group,
        [Subscription(topic, handle, model=bytes, retry=policy)],
        CollectorRegistry(),
        concurrency=2,
    )
    await worker.start()
    try:
        await wait_until(lambda: seen == [b"0", b"2"], "the other two handled", limit=30)
        dlq = await asyncio.to_thread(broker.read_all, f"{topic}.dlq", idle=0.5, expect=1)
        await wait_until(
            lambda: worker._states[(topic, 0)].committed == 3, "the commit of all three"
        )
        assert all(not r.done() for r in worker._runners)
    finally:
        assert await worker.stop()
    assert attempts == [b"1", b"1"]
    assert [m.value() for m in dlq] == [b"1"]
    headers = H.header_map(dlq[0].headers())
    assert headers[H.ERROR_TYPE] == "meshkit.mq.errors.HandlerCancelled"
    assert headers[H.DEAD_LETTER_REASON] == "exhausted"
    assert headers[H.ATTEMPTS] == "2"


async def test_runner_cancelled_mid_handler_is_replaced_and_its_key_goes_on(
    broker: KafkaBroker, group: str
) -> None:
    """A handler cancelling its own task ends its runner (a real cancellation, not a
    failure): the message is left unfinished (no commit passes it), but the
    key's next message, made ready as the runner ends, is handled, and the worker gets
    a new runner in its place."""
    topic = broker.create_topic(fresh("t"), 1)
    broker.produce(topic, [(b"k", b"0"), (b"k", b"1"), (b"k", b"2")])
    seen: list[bytes] = []

    async def handle(value: bytes) -> None:
        await asyncio.sleep(0.01)  # dispatched to the runners, not the inline pass
        if value == b"1":
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
            await asyncio.sleep(0)
        seen.append(value)

    worker = make_worker(
        broker,
        group,
        [Subscription(topic, handle, model=bytes)],
        CollectorRegistry(),
        concurrency=2,
    )
    await worker.start()
    try:
        await wait_until(lambda: seen == [b"0", b"2"], "the key's next message handled", limit=30)
        await wait_until(
            lambda: len(worker._runners) == 2 and all(not r.done() for r in worker._runners),
            "a new runner",
        )
        assert worker.last_error is not None and "runner ended" in worker.last_error
    finally:
        assert not await worker.stop(timeout=0.5)  # message 1 never finished
    # Never past message 1 (none at all when 0..2 came in one fetch: one batch).
    assert broker.committed(group, topic, 1)[0] <= 1


@pytest.mark.slow
async def test_start_without_a_broker_fails_cleanly_and_can_be_retried(
    capfd: pytest.CaptureFixture[str],
) -> None:
    port = free_port()
    topic, group = fresh("t"), fresh("g")
    seen: list[bytes] = []

    async def handle(value: bytes) -> None:
        seen.append(value)

    worker = Worker(
        group,
        [Subscription(topic, handle, model=bytes)],
        url=f"kafka://127.0.0.1:{port}",
        config=CLIENT_SETTINGS,
        commit_interval=0.2,
        metrics_registry=CollectorRegistry(),
    )
    threads_before = set(threading.enumerate())
    with pytest.raises(MqError, match=f"127.0.0.1:{port}"):
        await asyncio.wait_for(worker.start(), 60)
    left = [t.name for t in set(threading.enumerate()) - threads_before if t.is_alive()]
    assert not [name for name in left if name.startswith("meshkit-mq")], left
    noise = [line for line in capfd.readouterr().err.splitlines() if re.match(r"%\d\|", line)]
    assert not noise, noise[:3]

    broker = KafkaBroker(port=port)
    broker.start()
    try:
        await worker.start()  # a fresh start now that the broker answers (topics made)
        await asyncio.to_thread(broker.produce, topic, [(b"k", b"hello")])
        await wait_until(lambda: seen == [b"hello"], "the message handled", limit=30)
    finally:
        await worker.stop()
        broker.close()


async def test_header_values_text_bytes_or_none_and_nothing_else(broker: KafkaBroker) -> None:
    topic = broker.create_topic(fresh("t"), 1)
    pub = Publisher(broker.url, metrics_registry=CollectorRegistry())
    try:
        for bad in ({"attempt": 3}, [("ok", b"1"), ("ratio", 0.5)], {"obj": object()}):
            with pytest.raises(TypeError, match="header"):
                await pub.publish(topic, b"refused", headers=bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="header name"):
            await pub.publish(topic, b"refused", headers=[(b"raw-name", b"v")])  # type: ignore[list-item]
        assert pub.pending == 0  # nothing was enqueued
        await pub.publish(
            topic,
            b"accepted",
            headers=[
                ("text", "é"),
                ("bytes", b"\x00\x01"),
                ("bytearray", bytearray(b"ba")),
                ("view", memoryview(b"mv")),
                ("null", None),
            ],
        )
    finally:
        await pub.close()
    messages = await asyncio.to_thread(broker.read_all, topic, idle=0.5, expect=1)
    assert [m.value() for m in messages] == [b"accepted"]
    # A tracing SDK installed by another test in the same process adds its context.
    trace = {"traceparent", "tracestate", "baggage"}
    assert [h for h in messages[0].headers() if h[0] not in trace] == [
        ("text", "é".encode()),
        ("bytes", b"\x00\x01"),
        ("bytearray", b"ba"),
        ("view", b"mv"),
        ("null", None),
    ]
