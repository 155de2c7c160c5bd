"""At least once through a SIGKILL and through rebalances, with per-key order held."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
from kafka_broker import CLIENT_SETTINGS, KafkaBroker, fresh
from prometheus_client import CollectorRegistry
from waiting import wait_until

from meshkit.mq import MessageContext, Subscription, Worker

HERE = Path(__file__).parent


def _produce_ordered(broker: KafkaBroker, topic: str, n: int, keys: int, start: int = 0) -> None:
    """Messages ``start .. n-1``: id i, key i % keys, seq i // keys (increasing per key)."""
    import json

    broker.produce(
        topic,
        [
            (
                f"k{i % keys}".encode(),
                json.dumps({"id": i, "key": i % keys, "seq": i // keys}).encode(),
            )
            for i in range(start, n)
        ],
    )


def _lines(path: Path) -> list[tuple[int, int, int]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        a, b, c = line.split()
        out.append((int(a), int(b), int(c)))
    return out


def _first_occurrences_in_order(events: list[tuple[int, int, int]]) -> dict[int, list[int]]:
    """Per key, the sequence numbers in the order they were first handled."""
    seen: set[int] = set()
    order: dict[int, list[int]] = defaultdict(list)
    for msg_id, key, seq in events:
        if msg_id not in seen:
            seen.add(msg_id)
            order[key].append(seq)
    return order


def _spawn(broker: KafkaBroker, topic: str, group: str, out: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "MESHKIT_LOG_LEVEL": "WARNING"}
    return subprocess.Popen(
        [sys.executable, str(HERE / "worker_proc.py"), broker.url, topic, group, str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(out.with_suffix(".stderr"), "ab"),
    )


@pytest.mark.slow
async def test_worker_killed_mid_stream_loses_nothing(broker: KafkaBroker, tmp_path: Path) -> None:
    n, keys = 3000, 40
    topic = broker.create_topic(fresh("crash"), 3)
    group = fresh("g")
    await asyncio.to_thread(_produce_ordered, broker, topic, n, keys)
    out = tmp_path / "handled.txt"
    first = _spawn(broker, topic, group, out)
    try:
        await wait_until(lambda: len(_lines(out)) >= 600, "first worker handled 600", limit=60)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        at_kill = len(_lines(out))
        assert at_kill < n, "the first worker finished before the kill: the test proves nothing"
        second = _spawn(broker, topic, group, out)
        try:
            await wait_until(
                lambda: len({e[0] for e in _lines(out)}) >= n, "every message handled", limit=90
            )
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
    events = _lines(out)
    ids = Counter(e[0] for e in events)
    assert set(ids) == set(range(n)), f"lost: {sorted(set(range(n)) - set(ids))[:20]}"
    duplicates = sum(c - 1 for c in ids.values())
    # Duplicates come only from work in flight or handled but not yet committed at the kill.
    assert duplicates < at_kill
    order = _first_occurrences_in_order(events)
    assert all(seqs == sorted(seqs) for seqs in order.values())
    print(f"crash test: {n} messages, killed after {at_kill}, {duplicates} handled twice")


@pytest.mark.slow
async def test_second_worker_joins_and_leaves_under_load(broker: KafkaBroker) -> None:
    keys, chunk, cap = 30, 60, 30_000
    topic = broker.create_topic(fresh("rebal"), 4)
    group = fresh("g")
    produced = 600
    await asyncio.to_thread(_produce_ordered, broker, topic, produced, keys)
    feeding = True

    async def feed() -> None:
        # Load goes on through the join and the leave, however fast the workers are.
        nonlocal produced
        while feeding and produced < cap:
            await asyncio.to_thread(
                _produce_ordered, broker, topic, produced + chunk, keys, produced
            )
            produced += chunk
            await asyncio.sleep(0.05)

    events: list[tuple[int, int, int]] = []
    by_worker: Counter[str] = Counter()
    running: dict[int, int] = defaultdict(int)  # key -> handlers running now (any worker)
    overlap: list[int] = []

    def handler(name: str) -> Any:
        async def handle(msg: dict[str, int], ctx: MessageContext) -> None:
            key = msg["key"]
            running[key] += 1
            if running[key] > 1:
                overlap.append(key)
            await asyncio.sleep(0.002)
            events.append((msg["id"], key, msg["seq"]))
            by_worker[name] += 1
            running[key] -= 1

        return handle

    def worker(name: str) -> Worker:
        return Worker(
            group,
            [Subscription(topic, handler(name))],
            url=broker.url,
            config=CLIENT_SETTINGS,
            concurrency=8,
            max_buffered=100,
            commit_interval=0.2,
            metrics_registry=CollectorRegistry(),
        )

    one, two = worker("one"), worker("two")
    feeder = asyncio.create_task(feed())
    await one.start()
    try:
        await wait_until(lambda: len(events) >= 200, "first worker under way", limit=60)
        await two.start()
        await wait_until(lambda: by_worker["two"] >= 100, "second worker took partitions", limit=60)
        assert await two.stop()
        after_leave = by_worker["one"]
        # the first worker takes every partition back, under load
        await wait_until(
            lambda: by_worker["one"] >= after_leave + 100 or feeder.done(), "one alone", limit=60
        )
        assert not feeder.done(), f"the feeder stopped: {feeder.exception()!r}"
        feeding = False
        await feeder
        n = produced
        await wait_until(
            lambda: len({e[0] for e in events}) >= n, "every message handled", limit=90
        )
    finally:
        feeding = False
        await feeder
        await two.stop()
        await one.stop()
    ids = Counter(e[0] for e in events)
    assert set(ids) == set(range(n))
    order = _first_occurrences_in_order(events)
    assert all(seqs == sorted(seqs) for seqs in order.values()), "per-key order broken"
    assert sorted(order) == list(range(keys))
    # A partition changes hands only after its messages in flight finished (drain on
    # revoke), so no key was ever handled by both workers at once.
    assert overlap == []
    print(
        f"rebalance test: {n} messages, by worker {dict(by_worker)}, "
        f"{sum(c - 1 for c in ids.values())} handled twice, same key concurrently: {len(overlap)}"
    )


@pytest.mark.slow
async def test_sigterm_drains_and_commits_so_a_restart_handles_nothing_twice(
    broker: KafkaBroker, tmp_path: Path
) -> None:
    """``meshkit run`` of a workers-only Service: SIGTERM mid-stream finishes what was
    fetched, commits it, exits 0; the next process starts exactly where it stopped."""
    n, keys = 1500, 20
    topic = broker.create_topic(fresh("term"), 3)
    group = fresh("g")
    await asyncio.to_thread(_produce_ordered, broker, topic, n, keys)
    out = tmp_path / "handled.txt"
    env = {
        **os.environ,
        "MESHKIT_MQ": broker.url,
        "MESHKIT_HEALTH_PORT": "0",
        "MESHKIT_DRAIN_TIMEOUT": "20",
        "MESHKIT_LOG_LEVEL": "WARNING",
        "MQ_TEST_TOPIC": topic,
        "MQ_TEST_GROUP": group,
        "MQ_TEST_OUT": str(out),
        "PYTHONPATH": str(HERE.parents[1]),
    }

    def run() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "meshkit", "run", str(HERE / "billing_app.py") + ":svc"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "stderr.txt", "ab"),
        )

    first = run()
    try:
        await wait_until(lambda: len(_lines(out)) >= 300, "first process under way", limit=60)
        first.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(first.wait, 30) == 0
        handled_first = len(_lines(out))
        assert handled_first < n, "the first process finished before SIGTERM: proves nothing"
        second = run()
        try:
            await wait_until(lambda: len(_lines(out)) >= n, "every message handled", limit=90)
        finally:
            second.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(second.wait, 30) == 0
    finally:
        for proc in (first,):
            if proc.poll() is None:
                proc.kill()
    ids = Counter(e[0] for e in _lines(out))
    assert set(ids) == set(range(n))
    twice = [i for i, c in ids.items() if c > 1]
    assert twice == [], f"{len(twice)} handled twice after a clean drain: {twice[:10]}"
    order = _first_occurrences_in_order(_lines(out))
    assert all(seqs == sorted(seqs) for seqs in order.values())
