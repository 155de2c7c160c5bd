"""Worker on a real broker: every message handled, per-key order, commits never pass
an unfinished message, bounded concurrency, drain on stop."""

from __future__ import annotations

import asyncio
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
