"""Worker on a real broker: every message handled, per-key order, commits never pass
an unfinished message, bounded concurrency, drain on stop."""

from __future__ import annotations

import asyncio
import json
import random
from collections import defaultdict
from typing import Any

from kafka_broker import KafkaBroker
from prometheus_client import CollectorRegistry
from waiting import wait_until

from meshkit.mq import MessageContext, Publisher, Subscription, Worker


def _worker(broker: KafkaBroker, group: str, subs: list[Subscription], **kw: Any) -> Worker:
    from kafka_broker import CLIENT_SETTINGS

    kw.setdefault("metrics_registry", CollectorRegistry())
    kw.setdefault("commit_interval", 0.2)
    return Worker(group, subs, url=broker.url, config=CLIENT_SETTINGS, **kw)


async def test_every_message_handled_in_key_order(
    broker: KafkaBroker, topic: str, group: str
) -> None:
    n_keys, per_key = 12, 25
    seen: dict[str, list[int]] = defaultdict(list)
    running = 0
    peak = 0

    async def handle(msg: dict[str, Any], ctx: MessageContext) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(random.random() * 0.004)
        seen[msg["k"]].append(msg["i"])
        running -= 1

    pub = Publisher(broker.url, metrics_registry=CollectorRegistry())
    futures = []
    for i in range(per_key):
        for k in range(n_keys):
            futures.append(pub.publish_nowait(topic, {"k": f"k{k}", "i": i}, key=f"k{k}"))
    await asyncio.gather(*futures)

    worker = _worker(broker, group, [Subscription(topic, handle)], concurrency=4)
    await worker.start()
    try:
        await wait_until(
            lambda: sum(map(len, seen.values())) >= n_keys * per_key, "all handled", limit=30
        )
    finally:
        assert await worker.stop()
        await pub.close()
    assert {k: v for k, v in seen.items()} == {f"k{k}": list(range(per_key)) for k in range(n_keys)}
    assert 1 <= peak <= 4
    committed = broker.committed(group, topic, 3)
    ends = defaultdict(int)
    for m in broker.read_all(topic):
        ends[m.partition()] = max(ends[m.partition()], m.offset() + 1)
    assert committed == {p: ends[p] for p in range(3) if p in ends} | {
        p: committed[p] for p in range(3) if p not in ends
    }


async def test_full_buffer_pauses_fetching_and_commits_stop_at_the_unfinished(
    broker: KafkaBroker, topic: str, group: str
) -> None:
    """Bounded in flight (fetching pauses at max_buffered), and while one message hangs
    the committed offset of its partition stays at it though every later one finished."""
    release_all = asyncio.Event()
    release_first = asyncio.Event()
    handled: list[int] = []
    peak = 0
    worker: Worker | None = None

    async def handle(msg: dict[str, int], ctx: MessageContext) -> None:
        nonlocal peak
        assert worker is not None
        peak = max(peak, worker.in_flight)
        await release_all.wait()
        if msg["i"] == 0:
            await release_first.wait()
        handled.append(msg["i"])

    # All on partition 0; key "stuck" for message 0, distinct keys for the rest.
    pub = Publisher(broker.url, metrics_registry=CollectorRegistry())
    first = await pub.publish(topic, {"i": 0}, key="stuck", partition=0)
    await asyncio.gather(
        *(pub.publish_nowait(topic, {"i": i}, key=f"k{i}", partition=0) for i in range(1, 60))
    )
    await pub.close()
    reg = CollectorRegistry()
    worker = _worker(
        broker, group, [Subscription(topic, handle)], concurrency=4, max_buffered=10,
        metrics_registry=reg,
    )  # fmt: skip
    lag = {"group": group, "topic": topic, "partition": "0"}
    await worker.start()
    try:
        await wait_until(lambda: worker.info()["paused"], "paused at max_buffered", limit=30)
        # The backlog shows as lag: nothing committed yet, 60 messages in the partition.
        await wait_until(
            lambda: reg.get_sample_value("meshkit_mq_consumer_lag", lag) == 60, "lag 60", limit=10
        )
        assert reg.get_sample_value("meshkit_mq_in_flight", {"group": group}) == 10
        await asyncio.sleep(0.5)  # polling goes on while paused: nothing more comes in
        assert worker.in_flight == 10 and handled == []
        release_all.set()
        await wait_until(lambda: len(handled) == 59, "all but the first handled", limit=30)
        await asyncio.sleep(0.6)  # three commit intervals
        assert broker.committed(group, topic, 1)[0] in (first.offset, -1001)
        release_first.set()
        await wait_until(lambda: len(handled) == 60, "the first handled", limit=30)
        await wait_until(
            lambda: reg.get_sample_value("meshkit_mq_consumer_lag", lag) == 0, "lag 0", limit=10
        )
    finally:
        release_all.set()
        release_first.set()
        await worker.stop()
    assert peak <= 10
    assert broker.committed(group, topic, 1)[0] == first.offset + 60


async def test_plain_def_handler_runs_off_the_loop_in_key_order(
    broker: KafkaBroker, topic: str, group: str
) -> None:
    import threading

    loop_thread = threading.get_ident()
    seen: list[tuple[str, int, int]] = []

    def handle(msg: dict[str, Any], ctx: MessageContext) -> None:  # blocking code is fine here
        seen.append((msg["k"], msg["i"], threading.get_ident()))

    broker.produce(
        topic,
        [
            (f"k{i % 3}".encode(), json.dumps({"k": f"k{i % 3}", "i": i}).encode())
            for i in range(30)
        ],
    )
    worker = _worker(broker, group, [Subscription(topic, handle)], concurrency=3)
    await worker.start()
    try:
        await wait_until(lambda: len(seen) == 30, "handled", limit=30)
    finally:
        await worker.stop()
    assert all(tid != loop_thread for _, _, tid in seen)
    for k in ("k0", "k1", "k2"):
        mine = [i for key, i, _ in seen if key == k]
        assert mine == sorted(mine) and len(mine) == 10


async def test_short_path_keeps_key_order_across_batches_and_commits_everything(
    broker: KafkaBroker, topic: str, group: str
) -> None:
    """Context-free ``async def`` handlers (the runners' inlined short path), raw bytes,
    fetched in multi-message batches: one message per key at a time, in offset order,
    handlers that suspend mixed with ones that do not, at most ``concurrency`` at once;
    the commit reaches the end of every partition."""
    n_keys, per_key = 40, 30
    seen: dict[bytes, list[int]] = defaultdict(list)
    busy: set[bytes] = set()
    overlaps: list[bytes] = []
    running = peak = 0

    async def handle(value: bytes) -> None:
        nonlocal running, peak
        key, i = value.split(b":")
        if key in busy:
            overlaps.append(key)
        busy.add(key)
        running += 1
        peak = max(peak, running)
        if int(i) % 3 == 0:  # every third suspends, the rest finish in one step
            await asyncio.sleep(random.random() * 0.002)
        seen[key].append(int(i))
        running -= 1
        busy.discard(key)

    broker.produce(
        topic,
        [(b"k%d" % k, b"k%d:%d" % (k, i)) for i in range(per_key) for k in range(n_keys)],
    )
    worker = _worker(broker, group, [Subscription(topic, handle, model=bytes)], concurrency=4)
    await worker.start()
    try:
        await wait_until(
            lambda: sum(map(len, seen.values())) >= n_keys * per_key, "all handled", limit=30
        )
    finally:
        assert await worker.stop()
    assert not overlaps
    assert dict(seen) == {b"k%d" % k: list(range(per_key)) for k in range(n_keys)}
    assert 1 <= peak <= 4
    assert worker.in_flight == 0
    ends: dict[int, int] = defaultdict(int)
    for m in broker.read_all(topic, expect=n_keys * per_key):
        ends[m.partition()] = max(ends[m.partition()], m.offset() + 1)
    assert broker.committed(group, topic, 3) == {p: ends[p] for p in range(3)}


async def test_stop_mid_batch_commits_short_of_the_unfinished_and_the_next_owner_takes_it(
    broker: KafkaBroker, group: str
) -> None:
    """One message hangs in the middle of a fetched batch while the rest finish. Stopping
    abandons it after the drain timeout; the commit stays at or before it (the finished
    part of its batch may be handled again: at least once), and the next member of the
    group handles it and everything after it."""
    from kafka_broker import fresh

    topic = broker.create_topic(fresh("t1"), 1)
    n, stuck_at = 40, 20
    broker.produce(topic, [(b"k%d" % i, b"%d" % i) for i in range(n)])
    first: list[int] = []
    release = asyncio.Event()

    async def hang_on_one(value: bytes) -> None:
        if int(value) == stuck_at:
            await release.wait()  # never set: abandoned by stop()
        first.append(int(value))

    worker = _worker(broker, group, [Subscription(topic, hang_on_one, model=bytes)])
    await worker.start()
    await wait_until(lambda: len(first) == n - 1, "all but the stuck one handled", limit=30)
    assert worker.in_flight == 1
    assert not await worker.stop(timeout=0.3)  # not everything finished
    committed = broker.committed(group, topic, 1)[0]
    assert committed <= stuck_at  # offsets equal the message numbers here

    second: list[int] = []

    async def handle(value: bytes) -> None:
        second.append(int(value))

    worker = _worker(broker, group, [Subscription(topic, handle, model=bytes)])
    await worker.start()
    try:
        await wait_until(lambda: stuck_at in second and n - 1 in second, "rest handled", limit=30)
    finally:
        assert await worker.stop()
    start = 0 if committed < 0 else committed  # -1001: nothing committed yet
    assert second == list(range(start, n))
    assert broker.committed(group, topic, 1)[0] == n
