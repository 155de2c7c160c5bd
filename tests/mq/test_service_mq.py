"""``Service`` with Kafka workers: workers-only services, svc.publish, readiness 503 while
draining, /info and /metrics fields."""

from __future__ import annotations

import asyncio
import urllib.request
from typing import Any

import pytest
from kafka_broker import CLIENT_SETTINGS, KafkaBroker
from prometheus_client import CollectorRegistry
from waiting import wait_until

from meshkit import Service
from meshkit.errors import ConfigError


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def test_workers_only_service_drains_with_readiness_503(
    broker: KafkaBroker, topic: str, group: str
) -> None:
    svc = Service("billing", metrics_registry=CollectorRegistry())
    svc.settings = svc.settings.with_overrides(mq=broker.url)
    got: list[dict[str, Any]] = []
    release = asyncio.Event()
    started = asyncio.Event()

    @svc.subscribe(topic, group=group, config=CLIENT_SETTINGS, commit_interval=0.2)
    async def on_order(order: dict[str, Any], ctx: Any) -> None:
        if order["n"] == 1:
            started.set()
            await release.wait()
        got.append(order)

    await svc.start(health_port=0)
    base = f"http://127.0.0.1:{svc.health_port}"
    status, _ = await asyncio.to_thread(_get, base + "/health/ready")
    assert status == 200
    delivery = await svc.publish(topic, {"n": 1}, key="o-1")
    assert delivery.topic == topic and delivery.offset >= 0
    await asyncio.wait_for(started.wait(), 30)

    stopping = asyncio.create_task(svc.stop(drain_timeout=20))
    await wait_until(lambda: svc.state.phase.value == "draining", "draining")
    status, body = await asyncio.to_thread(_get, base + "/health/ready")
    assert status == 503 and "draining" in body
    release.set()
    assert await asyncio.wait_for(stopping, 30) is True
    assert got == [{"n": 1}]
    # What finished was committed before the worker left the group.
    assert broker.committed(group, topic, 3)[delivery.partition] == delivery.offset + 1


async def test_info_and_metrics_show_the_worker(
    broker: KafkaBroker, topic: str, group: str
) -> None:
    svc = Service("lagging", metrics_registry=CollectorRegistry())
    svc.settings = svc.settings.with_overrides(mq=broker.url)
    seen: list[int] = []

    @svc.subscribe(topic, group=group, config=CLIENT_SETTINGS, commit_interval=0.2)
    async def handle(value: int) -> None:
        seen.append(value)

    await svc.start(health_port=0)
    try:
        for i in range(5):
            await svc.publish(topic, i, key=str(i))
        await wait_until(lambda: len(seen) == 5, "handled", limit=30)
        base = f"http://127.0.0.1:{svc.health_port}"

        async def lag_zero_everywhere() -> bool:
            _, text = await asyncio.to_thread(_get, base + "/metrics")
            lags = [ln for ln in text.splitlines() if ln.startswith("meshkit_mq_consumer_lag{")]
            # one gauge per assigned partition (topic and retry topics), all caught up
            return len(lags) == 9 and all(ln.endswith(" 0.0") for ln in lags)

        await wait_until(lag_zero_everywhere, "lag 0 on every partition in /metrics", limit=10)
        _, text = await asyncio.to_thread(_get, base + "/metrics")
        assert f'meshkit_mq_processed_total{{group="{group}",topic="{topic}"}} 5.0' in text
        import json

        _, body = await asyncio.to_thread(_get, base + "/info")
        info = json.loads(body)
        assert info["mq"]["workers"][0]["group"] == group
        assert info["mq"]["subscriptions"] == {group: [topic]}
        assert info["rpc"]["pipeline"] is None
    finally:
        await svc.stop(drain_timeout=5)


async def test_subscribe_without_broker_url_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MESHKIT_MQ", raising=False)
    svc = Service("nobroker", metrics_registry=CollectorRegistry())

    @svc.subscribe("orders")
    async def handle(value: Any) -> None: ...

    with pytest.raises(ConfigError, match="meshkit mq broker"):
        await svc.start(health_port=0)
    await svc.stop()


def test_service_with_idl_still_needs_an_implementation(echo_module: Any) -> None:
    svc = Service("echo", echo_module.Echo, registry=None, metrics_registry=CollectorRegistry())
    with pytest.raises(ConfigError, match="no implementation"):
        asyncio.run(svc.start())
