"""Kafka throughput: meshkit's worker and publisher against raw confluent-kafka, one run.

* consume: a raw ``Consumer.consume()`` loop that calls a no-op handler per message and
  commits after each processed batch, vs a meshkit :class:`~meshkit.mq.Worker` with a
  no-op ``async def`` handler of the same body (raw bytes codec; per-key ordering,
  offset tracking, metrics and periodic commits all on). Timed from the first message
  handled to the last, so group joins are not counted.
* publish: a raw ``Producer.produce()`` loop with one ``flush()`` at the end, vs meshkit
  ``Publisher.publish_nowait()`` with every delivery future awaited (idempotent both).

Same conditions for both sides of each pair: every round gives each side its own fresh
topic (3 partitions), the consume topics filled the same way (an untimed raw producer
run of the same messages) before the round; both consumers use the same librdkafka
settings (:data:`CONSUMER_SETTINGS`, including the worker's ``fetch.queue.backoff.ms``:
with librdkafka's default of 1000 ms a consumer whose local queue went over
``queued.min.messages`` (tansu answers a fetch with ~50k messages of a partition) idles
up to a second, in some rounds and not others, which made rounds swing 4x). Rounds
alternate which side goes first.

Runs against a fresh bundled broker (tansu, memory storage) unless ``--url`` is given.
Each measurement runs ``--rounds`` times; the best round of each counts, and each
round's worker/raw pair and their median are printed too. Beside msgs/s each round
reports process CPU per message (all threads of this process over the timed window;
the broker is another process), steadier than wall rates on a shared machine. Prints a
table, then one JSON line with ``worker_vs_raw_ratio`` and ``publish_vs_raw_ratio``.

    python bench/mq.py            # 300k messages consumed, 100k published, 3 rounds
    python bench/mq.py --quick    # 100k consumed, 20k published, 1 round
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient
from prometheus_client import CollectorRegistry

from meshkit import _loop
from meshkit.logs import configure_logging
from meshkit.mq import Publisher, Subscription, Worker, ensure_topics
from meshkit.mq.broker import DevBroker
from meshkit.mq.worker import DEFAULT_CONSUMER_CONFIG

#: Given to both consumers: quick group joins on tansu (see shared/INFRA.md; harmless on
#: Kafka) and the worker's fetch queue backoff (the raw consumer would otherwise get
#: librdkafka's 1000 ms).
CONSUMER_SETTINGS = {
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 500,
    "max.poll.interval.ms": 30000,
    "fetch.queue.backoff.ms": DEFAULT_CONSUMER_CONFIG["fetch.queue.backoff.ms"],
}


@dataclass(frozen=True, slots=True)
class Result:
    """One timed round: messages, wall seconds and process CPU seconds (every thread)."""

    n: int
    elapsed: float
    cpu: float
    #: CPU seconds of the thread running the per-message Python (the caller's thread)
    main: float = 0.0
    #: CPU seconds of meshkit's helper thread (worker: consumer thread; publisher: poll)
    helper: float = 0.0

    @property
    def rate(self) -> float:
        return self.n / self.elapsed

    @property
    def cpu_us(self) -> float:
        return self.cpu / self.n * 1e6

    def split_us(self) -> str:
        """CPU µs per message: main thread / meshkit helper thread / the rest (librdkafka)."""
        rest = self.cpu - self.main - self.helper
        return "/".join(f"{x / self.n * 1e6:.2f}" for x in (self.main, self.helper, rest))


class CpuClock:
    """Process CPU, the calling thread's CPU and that of threads named ``helper*``."""

    def __init__(self, helper: str | None = None) -> None:
        self.helper = helper

    def _helper(self) -> float:
        if self.helper is None:
            return 0.0
        total = 0.0
        for thread in threading.enumerate():
            if thread.name.startswith(self.helper) and thread.ident is not None:
                with contextlib.suppress(OSError):
                    total += time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
        return total

    def read(self) -> tuple[float, float, float]:
        return time.process_time(), time.thread_time(), self._helper()

    @staticmethod
    def since(start: tuple[float, float, float], end: tuple[float, float, float]) -> list[float]:
        return [b - a for a, b in zip(start, end, strict=True)]


def _payloads(n: int, size: int, keys: int) -> list[tuple[bytes, bytes]]:
    body = b"x" * max(0, size - 12)
    return [(f"k{i % keys}".encode(), b"%012d" % i + body) for i in range(n)]


def raw_publish(bootstrap: str, topic: str, msgs: list[tuple[bytes, bytes]]) -> Result:
    producer = Producer(
        {"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5}
    )
    errors = 0

    def report(err: Any, _msg: Any) -> None:
        nonlocal errors
        if err is not None:
            errors += 1

    clock = CpuClock()
    start, cpu = time.perf_counter(), clock.read()
    for key, value in msgs:
        while True:
            try:
                producer.produce(topic, value, key, on_delivery=report)
                break
            except BufferError:
                producer.poll(0.01)
        producer.poll(0)
    left = producer.flush(60)
    elapsed, used = time.perf_counter() - start, clock.since(cpu, clock.read())
    if errors or left:
        raise SystemExit(f"raw publish failed: {errors} errors, {left} undelivered")
    return Result(len(msgs), elapsed, *used)


async def meshkit_publish(url: str, topic: str, msgs: list[tuple[bytes, bytes]]) -> Result:
    pub = Publisher(url, metrics_registry=CollectorRegistry())
    pub.start()
    clock = CpuClock("meshkit-mq-producer")
    start, cpu = time.perf_counter(), clock.read()
    futures = []
    for key, value in msgs:
        futures.append(pub.publish_nowait(topic, value, key=key))
        if len(futures) >= 20_000:  # stay well inside the producer buffer
            await asyncio.gather(*futures)
            futures = []
    await asyncio.gather(*futures)
    elapsed, used = time.perf_counter() - start, clock.since(cpu, clock.read())
    await pub.close()
    return Result(len(msgs), elapsed, *used)


class Count:
    """The no-op handler's body, the same on both sides: count, note the first and last."""

    def __init__(self, n: int, clock: CpuClock, last: Any) -> None:
        self.n = n
        self.handled = 0
        self.clock = clock
        self.start = 0.0
        self.cpu = clock.read()
        self.last = last  # called once, after the n-th message


def raw_consume(bootstrap: str, topic: str, n: int) -> Result:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-raw-{secrets.token_hex(4)}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            **CONSUMER_SETTINGS,
        }
    )
    consumer.subscribe([topic])
    clock = CpuClock()
    finished = False

    def last() -> None:
        nonlocal finished
        finished = True

    count = Count(n, clock, last)

    def noop(value: bytes | None) -> None:
        if count.handled == 0:
            count.start, count.cpu = time.perf_counter(), clock.read()
        count.handled += 1
        if count.handled >= n:
            count.last()

    deadline = time.monotonic() + 120
    try:
        while not finished:
            if time.monotonic() > deadline:
                raise SystemExit(f"raw consume: only {count.handled} of {n} messages in 120 s")
            batch = consumer.consume(500, 1.0)
            for msg in batch:
                if msg.error() is None:
                    noop(msg.value())
            if batch:
                consumer.commit(asynchronous=True)  # commit after processing the batch
        elapsed = time.perf_counter() - count.start
        used = clock.since(count.cpu, clock.read())
    finally:
        consumer.close()
    return Result(n, elapsed, *used)


async def meshkit_consume(url: str, topic: str, n: int) -> Result:
    group = f"bench-meshkit-{secrets.token_hex(4)}"
    clock = CpuClock(f"meshkit-mq-{group}")
    done = asyncio.Event()
    count = Count(n, clock, done.set)

    async def noop(value: bytes) -> None:
        if count.handled == 0:
            count.start, count.cpu = time.perf_counter(), clock.read()
        count.handled += 1
        if count.handled >= n:
            count.last()

    worker = Worker(
        group,
        [Subscription(topic, noop, model=bytes)],
        url=url,
        config=CONSUMER_SETTINGS,
        metrics_registry=CollectorRegistry(),
    )
    await worker.start()
    try:
        await asyncio.wait_for(done.wait(), 120)
        elapsed, used = time.perf_counter() - count.start, clock.since(count.cpu, clock.read())
    finally:
        await worker.stop()
    return Result(n, elapsed, *used)


def _delete_topics(bootstrap: str, topics: list[str]) -> None:
    """Drop a round's topics (the broker keeps them in memory)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.delete_topics(topics, operation_timeout=10).values():
        with contextlib.suppress(Exception):
            future.result(10)


def load() -> str:
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.2f} {five:.2f} (1/5 min, {os.cpu_count()} cores)"


async def main(args: argparse.Namespace) -> dict[str, Any]:
    broker = None
    url = args.url
    if url is None:
        broker = DevBroker()
        broker.start()
        url = broker.url
    bootstrap = url.removeprefix("kafka://")
    try:
        msgs = _payloads(args.messages, args.size, args.keys)
        fill = _payloads(args.consume_messages, args.size, args.keys)
        n = args.consume_messages
        print(f"load before: {load()}", file=sys.stderr)
        results: dict[str, list[Result]] = {
            k: [] for k in ("raw_pub", "mk_pub", "raw_con", "mk_con")
        }
        for round_ in range(args.rounds):
            run = secrets.token_hex(3)
            names = {side: f"bench-{side}-{run}" for side in ("rawpub", "mkpub", "rawcon", "mkcon")}
            await asyncio.to_thread(ensure_topics, bootstrap, dict.fromkeys(names.values(), 3))
            # The two consume topics, filled the same way (untimed).
            for side in ("rawcon", "mkcon"):
                await asyncio.to_thread(raw_publish, bootstrap, names[side], fill)
            first_raw = round_ % 2 == 0  # alternate which side goes first
            for raw_side in (first_raw, not first_raw):
                if raw_side:
                    results["raw_pub"].append(
                        await asyncio.to_thread(raw_publish, bootstrap, names["rawpub"], msgs)
                    )
                else:
                    results["mk_pub"].append(await meshkit_publish(url, names["mkpub"], msgs))
            for raw_side in (first_raw, not first_raw):
                if raw_side:
                    results["raw_con"].append(
                        await asyncio.to_thread(raw_consume, bootstrap, names["rawcon"], n)
                    )
                else:
                    results["mk_con"].append(await meshkit_consume(url, names["mkcon"], n))
            await asyncio.to_thread(_delete_topics, bootstrap, list(names.values()))
        print(f"load after: {load()}", file=sys.stderr)
    finally:
        if broker is not None:
            broker.close()
    best = {k: max(r.rate for r in v) for k, v in results.items()}
    cpu = {k: min(r.cpu_us for r in v) for k, v in results.items()}
    rows = [
        ("consume + no-op handler + commit", "raw confluent-kafka", "raw_con"),
        ("", "meshkit Worker", "mk_con"),
        ("publish, deliveries awaited", "raw Producer", "raw_pub"),
        ("", "meshkit Publisher", "mk_pub"),
    ]
    print(
        f"\n{n} messages consumed, {args.messages} published, x {args.rounds} round(s),"
        f" {args.size} B, {args.keys} keys; consumer settings {CONSUMER_SETTINGS}"
    )
    print(f"{'what':34} {'implementation':22} {'best msgs/s':>12} {'CPU us/msg':>10}  rounds")
    for what, impl, k in rows:
        rounds = ", ".join(f"{r.rate:,.0f}/{r.cpu_us:.2f}us" for r in results[k])
        print(f"{what:34} {impl:22} {best[k]:12,.0f} {cpu[k]:10.2f}  {rounds}")
    print(
        "\nCPU us/msg by thread (main: the thread running the per-message Python; helper:"
        " the worker's consumer thread / the publisher's poll thread; rest: librdkafka's"
        " threads, GC), best round:"
    )
    for _, impl, k in rows:
        least = min(results[k], key=lambda r: r.cpu_us)
        print(f"  {impl:22} main/helper/rest {least.split_us()}")
    summary = {
        "bench": "mq",
        "messages": args.messages,
        "consume_messages": n,
        "rounds": args.rounds,
        "size": args.size,
        "keys": args.keys,
        "raw_consume_msgs_s": round(best["raw_con"]),
        "worker_msgs_s": round(best["mk_con"]),
        "raw_publish_msgs_s": round(best["raw_pub"]),
        "publisher_msgs_s": round(best["mk_pub"]),
        "worker_vs_raw_ratio": round(best["mk_con"] / best["raw_con"], 3),
        # Rounds alternate raw and meshkit: each round's pair, and their median, show how
        # much of the best-of ratio is the broker's round-to-round swing.
        "worker_vs_raw_round_ratios": [
            round(m.rate / r.rate, 3)
            for r, m in zip(results["raw_con"], results["mk_con"], strict=True)
        ],
        "worker_vs_raw_median_round_ratio": round(
            statistics.median(
                m.rate / r.rate for r, m in zip(results["raw_con"], results["mk_con"], strict=True)
            ),
            3,
        ),
        "publish_vs_raw_ratio": round(best["mk_pub"] / best["raw_pub"], 3),
        "raw_consume_cpu_us_per_msg": round(cpu["raw_con"], 2),
        "worker_cpu_us_per_msg": round(cpu["mk_con"], 2),
        "raw_publish_cpu_us_per_msg": round(cpu["raw_pub"], 2),
        "publisher_cpu_us_per_msg": round(cpu["mk_pub"], 2),
        "fetch_queue_backoff_ms": CONSUMER_SETTINGS["fetch.queue.backoff.ms"],
        "loop": "uvloop" if _loop.uvloop_enabled() else "asyncio",
        "load": load(),
    }
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="kafka://host:port (default: a fresh bundled broker)")
    parser.add_argument("--messages", type=int, default=100_000, help="published per round")
    parser.add_argument(
        "--consume-messages", type=int, default=300_000, help="consumed per round and side"
    )
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="100k/20k messages, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.consume_messages, args.messages, args.rounds = 100_000, 20_000, 1
    configure_logging(level="WARNING", json=False, stream=sys.stderr)
    summary = _loop.run(main(args))
    print(json.dumps(summary), flush=True)
