"""The MQ part of ``meshkit demo``: a worker and a publisher on a real broker, if one runs.

The broker is ``MESHKIT_MQ`` or, when unset, ``kafka://127.0.0.1:9092`` (where
``meshkit mq broker`` listens by default). Without one, the demo says how to start it.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry

DEFAULT_URL = "kafka://127.0.0.1:9092"
TIMEOUT = 30.0


def broker_url() -> tuple[str, bool]:
    """The URL the demo would use, and whether something listens there."""
    from .broker import port_open
    from .url import bootstrap_servers

    url = os.environ.get("MESHKIT_MQ") or DEFAULT_URL
    host, _, port = bootstrap_servers(url).split(",")[0].rpartition(":")
    return url, port_open(host, int(port), timeout=0.5)


async def demo_round(say: Callable[[str], None], messages: int = 300, keys: int = 10) -> bool:
    """Publish ``messages`` orders over ``keys`` customers, handle them with a worker,
    report what happened. Returns ``False`` when something went wrong."""
    from ..errors import MeshkitError
    from . import MessageContext, Publisher, RetryPolicy, Subscription, Worker

    url, running = broker_url()
    if not running:
        say(f"kafka: no broker at {url}: Kafka workers need one. Start the bundled one with")
        say("  meshkit mq broker            (in another terminal; listens on 127.0.0.1:9092)")
        say("and run the demo again, or point MESHKIT_MQ at a Kafka broker (kafka://host:port).")
        say("")
        return True
    topic = f"demo.orders.{secrets.token_hex(3)}"
    group = "demo-billing"
    reg = CollectorRegistry()
    handled: dict[str, list[int]] = defaultdict(list)
    done = asyncio.Event()

    async def bill(order: dict[str, Any], ctx: MessageContext) -> None:
        await asyncio.sleep(0.001)  # pretend to call a payment service
        handled[order["customer"]].append(order["seq"])
        if sum(map(len, handled.values())) >= messages:
            done.set()

    worker = Worker(
        f"{group}-{secrets.token_hex(3)}",
        [Subscription(topic, bill, retry=RetryPolicy(topic_delays=(2.0,)))],
        url=url,
        concurrency=8,
        config={"session.timeout.ms": 6000, "heartbeat.interval.ms": 500},
        metrics_registry=reg,
    )
    publisher = Publisher(url, metrics_registry=reg)
    start = time.perf_counter()
    try:
        await worker.start()
        futures = [
            publisher.publish_nowait(
                topic, {"customer": f"c{i % keys}", "seq": i // keys}, key=f"c{i % keys}"
            )
            for i in range(messages)
        ]
        await asyncio.gather(*futures)
        published = time.perf_counter() - start
        await asyncio.wait_for(done.wait(), TIMEOUT)
        elapsed = time.perf_counter() - start
    except (MeshkitError, TimeoutError) as exc:
        say(f"kafka: the round on {url} failed: {exc}")
        return False
    finally:
        await worker.stop(5.0)
        await publisher.close(5.0)
    in_order = all(seqs == sorted(seqs) for seqs in handled.values())
    say(f"kafka: {url}, topic {topic}")
    say(f"  published  {messages} orders over {keys} keys in {published:.2f} s (acks awaited)")
    say(f"  handled    {sum(map(len, handled.values()))} by a worker (group join included: "
        f"{elapsed:.1f} s); per-key order {'held' if in_order else 'BROKEN'}")  # fmt: skip
    say("")
    return in_order
