"""Service(config=...): settings loaded before serving, /info and /metrics show the
version and the effective config (secrets masked), changes apply while serving."""

from __future__ import annotations

from typing import Any

import aiohttp
from echo_support import EchoImpl, echo_thrift
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, SecretStr
from waiting import wait_until

from meshkit import Service
from meshkit.config import store_from_url


class Settings(BaseModel):
    greeting: str = "hello"
    password: SecretStr = SecretStr("")


async def _get(url: str) -> Any:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200
        if resp.content_type == "application/json":
            return await resp.json()
        return await resp.text()


async def test_service_info_and_metrics_show_config(local_url: str) -> None:
    store = store_from_url(local_url)
    await store.replace("echo", {"greeting": "hi", "password": "hunter2-secret"})
    svc = Service(
        "echo",
        echo_thrift.Echo,
        registry=None,
        config=Settings,
        config_store=local_url,
        config_overrides={"greeting": "override"},
        metrics_registry=CollectorRegistry(),
    )
    svc.implement(EchoImpl())
    await svc.start(port=0, health_port=0)
    try:
        assert svc.config.value.password.get_secret_value() == "hunter2-secret"
        base = f"http://127.0.0.1:{svc.health_port}"
        info = await _get(base + "/info")
        assert info["config_version"] == 1
        config = info["config"]
        assert config["store"] == local_url and config["versions"]["echo"] == 1
        assert config["effective"] == {
            "greeting": {"value": "override", "source": "override"},
            "password": {"value": "**********", "source": "store"},
        }
        assert "hunter2-secret" not in str(info)
        metrics = await _get(base + "/metrics")
        assert 'meshkit_config_version{namespace="echo",service="echo"} 1.0' in metrics
        await store.set_key("echo", "password", "new-secret")
        await wait_until(lambda: svc.config.version == 2, "version 2 applied while serving")
        status = (await store.statuses("echo"))[0]
        assert status.instance == svc.instance.instance_id  # type: ignore[union-attr]
        assert status.tags["version"] == svc.version
    finally:
        await svc.stop(drain_timeout=1.0)
        await store.close()
    reopened = store_from_url(local_url)
    assert await reopened.statuses("echo") == []  # withdrawn on stop
    await reopened.close()


async def test_service_without_config_follows_nothing(echo_service: Service) -> None:
    assert echo_service.config.store is None
    assert echo_service.info()["config_version"] is None
