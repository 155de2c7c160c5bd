"""Consul KV backend against the HTTP double (or a real agent): blocking-query watches,
agent outage and resume, an index that goes backwards, ACL tokens, bad URLs."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from consul_kv_double import ConsulKVDouble
from prometheus_client import CollectorRegistry
from pydantic import BaseModel
from waiting import wait_until

from meshkit.config import ConfigChange, ServiceConfig, store_from_url
from meshkit.config.consul import ConsulKV
from meshkit.errors import ConfigError, Unavailable

pytestmark = pytest.mark.consul_contract


class Settings(BaseModel):
    n: int = 0


async def _retry(fn: Any) -> Any:
    for _ in range(100):
        try:
            return await fn()
        except Unavailable:
            await asyncio.sleep(0.1)
    return await fn()


async def test_agent_outage_keeps_last_good_and_resumes(consul_kv: ConsulKVDouble) -> None:
    url = f"consul://{consul_kv.address}?prefix=t1&wait=5"
    publisher = store_from_url(url)
    await publisher.set_key("echo", "n", 1)
    cfg = ServiceConfig(
        "echo", Settings, store=url, environ={}, metrics_registry=CollectorRegistry()
    )
    applied: list[int] = []

    @cfg.on_change
    async def record(change: ConfigChange[Settings]) -> None:
        applied.append(change.new.n)

    await cfg.start("echo-1", {})
    try:
        await publisher.set_key("echo", "n", 2)
        await wait_until(lambda: cfg.value.n == 2, "version 2")
        await consul_kv.stop()
        await wait_until(lambda: cfg.info()["store_reachable"] is False, "the outage noticed")
        assert cfg.value.n == 2
        await consul_kv.start()
        for n in (3, 4, 5):
            await _retry(lambda n=n: publisher.set_key("echo", "n", n))
        await wait_until(lambda: cfg.value.n == 5, "the latest version after the outage")
        await wait_until(lambda: applied[-1] == 5, "the callback of the latest version")
        assert applied == sorted(applied) and applied[0] == 2 and applied[-1] == 5
        assert cfg.versions["echo"] == 5
    finally:
        await cfg.stop()
        await publisher.close()


async def test_index_going_backwards_reads_again(consul_kv: ConsulKVDouble) -> None:
    url = f"consul://{consul_kv.address}?prefix=t2&wait=5"
    publisher = store_from_url(url)
    await publisher.set_key("echo", "n", 1)
    cfg = ServiceConfig(
        "echo", Settings, store=url, environ={}, metrics_registry=CollectorRegistry()
    )
    await cfg.start("echo-1", {})
    try:
        consul_kv.set_index(1)  # a snapshot restore: the raft index restarts lower
        await publisher.set_key("echo", "n", 2)
        await wait_until(lambda: cfg.value.n == 2, "the change after the index reset")
    finally:
        await cfg.stop()
        await publisher.close()


async def test_acl_token_sent_and_never_shown(consul_kv: ConsulKVDouble) -> None:
    consul_kv.acl_token = "tok-abcdef-123"
    good = ConsulKV.from_url(f"consul://{consul_kv.address}?prefix=t3&token=tok-abcdef-123")
    assert "tok-abcdef-123" not in good.url and "tok-abcdef-123" not in repr(good)
    await good.put("a/b", "1")
    assert (await good.get("a/b")).value == "1"  # type: ignore[union-attr]
    bad = ConsulKV.from_url(f"consul://{consul_kv.address}?prefix=t3&token=wrong-token")
    with pytest.raises(Unavailable, match=r"Consul denied the request .* \(ACL\)") as info:
        await bad.get("a/b")
    assert "wrong-token" not in str(info.value)
    await good.close()
    await bad.close()


async def test_transactions_compare_mod_revision(consul_kv: ConsulKVDouble) -> None:
    from meshkit.config.kv import Delete, Put

    kv = ConsulKV(consul_kv.address, prefix="t4")
    assert await kv.txn([("x", 0)], [Put("x", "1")])
    assert not await kv.txn([("x", 0)], [Put("x", "2")])  # exists already
    entry = await kv.get("x")
    assert entry is not None and entry.value == "1"
    assert await kv.txn([("x", entry.mod_revision)], [Put("x", "3"), Put("y", "")])
    assert not await kv.txn([("x", entry.mod_revision)], [Delete("x")])  # stale
    listing = await kv.scan("y/")  # "y" itself is not under "y/"
    assert listing.entries == {}
    assert (await kv.get("y")).value == ""  # type: ignore[union-attr]
    await kv.close()


def test_bad_consul_urls() -> None:
    for url, message in [
        ("consul://", "expected consul://host:port"),
        ("consul://h", "expected consul://host:port"),
        ("consul://h:1/path", "found a path"),
        ("consul://h:1?bogus=1", "expected consul:// parameters"),
        ("consul://h:1?wait=long", "wait to be a number"),
        ("consul://h:1?wait=0", "wait between 0 and 600"),
    ]:
        with pytest.raises(ConfigError, match=message):
            store_from_url(url)


async def test_unreachable_agent_is_unavailable() -> None:
    from etcd_server import free_port

    kv = ConsulKV(f"127.0.0.1:{free_port()}", request_timeout=1)
    with pytest.raises(Unavailable, match="cannot reach the Consul agent"):
        await kv.get("a")
    await kv.close()
