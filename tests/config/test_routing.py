"""Routing rules loaded from config change live; bad rules are rejected before apply."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from pydantic import BaseModel
from waiting import wait_until

from meshkit.config import ConfigStore, ServiceConfig
from meshkit.config.routing import RoutingRules, live_routing

CANARY = {"rules": [{"name": "canary", "target": {"canary": "true"}, "percent": 10}]}


class Settings(BaseModel):
    routing: RoutingRules = CANARY


async def test_routing_rules_follow_config(store: ConfigStore) -> None:
    cfg = ServiceConfig(
        "gw", Settings, store=store, environ={}, metrics_registry=CollectorRegistry()
    )
    table = live_routing(cfg, "routing")  # before start: built from the defaults
    assert [r.name for r in table.rules] == ["canary"]
    await store.set_key("gw", "routing", {"rules": [{"name": "beta", "target": {"zone": "b"}}]})
    await cfg.start("gw-1", {})
    try:
        await wait_until(lambda: [r.name for r in table.rules] == ["beta"], "rules from the store")
        await store.set_key("gw", "routing", {"rules": [{"name": "x", "target": {}}]})
        await wait_until(lambda: "gw" in cfg.info()["rejected"], "bad rules rejected")
        error = cfg.info()["rejected"]["gw"]["error"]
        assert error.startswith("routing (from store): Value error, ") and "target" in error
        assert [r.name for r in table.rules] == ["beta"]  # the old rules stay in force
        await store.set_key("gw", "routing", {"rules": []})
        await wait_until(lambda: table.rules == (), "no rules: everyone on the stable pool")
    finally:
        await cfg.stop()
