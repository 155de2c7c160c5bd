"""``meshkit mq replay``: move dead-lettered messages back to the topic they came from.

Reads ``<topic>.dlq`` from where the previous replay stopped (offsets are committed
under the group ``meshkit-replay.<dlq>``, by direct assignment, so no group join is
needed), republishes each message to its original topic (or ``to``) with its key, value
and headers, minus meshkit's failure headers, plus ``meshkit-replayed-at``, and commits
only what the broker acknowledged. It stops when the DLQ has been read to its end
(as of the last fetch, or nothing new for ``idle`` seconds) or after ``limit`` messages;
a message this very run put back and that was dead-lettered again ends its partition's
replay, so a replay never chases its own tail.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from . import headers as H
from .errors import MqError
from .retry import dlq_topic
from .url import bootstrap_servers

__all__ = ["ReplayResult", "replay_dlq"]

#: Failure headers dropped on replay (the original-* ones stay, for the audit trail).
DROPPED = (
    H.ATTEMPTS,
    H.ERROR,
    H.ERROR_TYPE,
    H.GROUP,
    H.FAILED_AT,
    H.RETRY_LEVEL,
    H.NOT_BEFORE,
    H.DEAD_LETTER_REASON,
)


@dataclass
class ReplayResult:
    dlq: str
    replayed: int = 0
    by_topic: dict[str, int] = field(default_factory=dict)
    dry_run: bool = False


def replay_dlq(
    topic: str,
    *,
    url: str | None = None,
    dlq: str | None = None,
    to: str | None = None,
    limit: int | None = None,
    dry_run: bool = False,
    idle: float = 10.0,
    on_message: Callable[[str, int, int], None] | None = None,
) -> ReplayResult:
    """Replay ``<topic>.dlq`` (or ``dlq``) into the original topics (or ``to``). Blocking."""
    bootstrap = bootstrap_servers(url)
    dlq = dlq or dlq_topic(topic)
    result = ReplayResult(dlq, dry_run=dry_run)
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"meshkit-replay.{dlq}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    try:
        meta = consumer.list_topics(dlq, timeout=10).topics.get(dlq)
        if meta is None or meta.error is not None or not meta.partitions:
            raise MqError(f"expected a dead-letter topic {dlq!r}, found none on {bootstrap}")
        tps = [TopicPartition(dlq, p) for p in sorted(meta.partitions)]
        started_ms = int(time.time() * 1000)
        finished: set[int] = set()  # partitions read up to what this run put back
        start = consumer.committed(tps, timeout=10)
        consumer.assign(start)
        position = {tp.partition: tp.offset for tp in start if tp.offset >= 0}
        last = time.monotonic()
        while time.monotonic() - last < idle and (limit is None or result.replayed < limit):
            want = 500 if limit is None else min(500, limit - result.replayed)
            batch = [m for m in consumer.consume(want, 0.2) if m.error() is None]
            if not batch:
                if len(finished) == len(tps) or _at_end(consumer, tps, position, finished):
                    break
                continue
            batch = [m for m in batch if (m.partition() or 0) not in finished]
            for msg in batch:
                position[msg.partition() or 0] = (msg.offset() or 0) + 1
            last = time.monotonic()
            errors: list[str] = []
            commits: dict[int, int] = {}
            for msg in batch:
                old = H.header_map(msg.headers())
                if int(old.get(H.REPLAYED_AT) or 0) >= started_ms or msg.partition() in finished:
                    # Put back by this very run and dead-lettered again: stop here, so a
                    # replay never chases its own tail. The next run starts from it.
                    finished.add(msg.partition() or 0)
                    consumer.pause([TopicPartition(dlq, msg.partition() or 0)])
                    continue
                target = to or old.get(H.ORIGINAL_TOPIC) or topic
                headers = H.replace_headers(
                    msg.headers(),
                    {H.REPLAYED_AT: str(int(time.time() * 1000))},
                    drop=DROPPED,
                )
                if not dry_run:
                    producer.produce(
                        target,
                        msg.value(),
                        msg.key(),
                        headers=cast(Any, headers),
                        on_delivery=partial(_report, errors),
                    )
                    producer.poll(0)
                result.replayed += 1
                result.by_topic[target] = result.by_topic.get(target, 0) + 1
                commits[msg.partition() or 0] = (msg.offset() or 0) + 1
                if on_message is not None:
                    on_message(target, msg.partition() or 0, msg.offset() or 0)
            if dry_run or not commits:
                continue
            left = producer.flush(30)
            if errors or left:
                raise MqError(
                    f"replay stopped: the broker did not take {left or len(errors)} message(s): "
                    f"{errors[:3]}; nothing after the last acknowledged batch was committed"
                )
            consumer.commit(
                offsets=[TopicPartition(dlq, p, o) for p, o in commits.items()],
                asynchronous=False,
            )
        return result
    except KafkaException as exc:
        raise MqError(f"replay of {dlq!r} failed: {exc}") from exc
    finally:
        consumer.close()
        producer.flush(5)


def _report(errors: list[str], err: Any, _msg: Any) -> None:
    if err is not None:
        errors.append(str(err))


def _at_end(
    consumer: Consumer, tps: list[TopicPartition], position: dict[int, int], finished: set[int]
) -> bool:
    """Whether every partition was read up to the high watermark of the last fetch."""
    for tp in tps:
        if tp.partition in finished:
            continue
        low, high = consumer.get_watermark_offsets(tp, cached=True)
        if high < 0:
            return False  # no fetch answered yet
        if position.get(tp.partition, max(low, 0)) < high:
            return False
    return True
