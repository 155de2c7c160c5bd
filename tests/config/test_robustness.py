"""Bad versions, bad records and bad validators never end the config watch: each is
refused (or skipped) with a clear error, the last good settings stay, and the next good
version is applied."""

from __future__ import annotations

import json
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, field_serializer, field_validator
from waiting import wait_until

from meshkit.config import ConfigStore, ServiceConfig


class Hosts(BaseModel):
    hosts: list[str] = []

    @field_validator("hosts", mode="before")
    @classmethod
    def split(cls, value: Any) -> Any:  # "a,b" or a list; an int has no .split
        return value.split(",") if not isinstance(value, list) else value


def _config(store: ConfigStore, schema: type[BaseModel], **kwargs: Any) -> ServiceConfig[Any]:
    return ServiceConfig(
        "echo", schema, store=store, environ={}, metrics_registry=CollectorRegistry(), **kwargs
    )


def _follow_tasks_alive(cfg: ServiceConfig[Any]) -> bool:
    return all(not t.done() for t in cfg._tasks)


async def test_schema_validator_raising_type_error_rejects_the_version(
    store: ConfigStore, capsys: pytest.CaptureFixture[str]
) -> None:
    # At start: the bad version is rejected, not a raw AttributeError out of start().
    await store.set_key("echo", "hosts", 987654321)
    cfg = _config(store, Hosts)
    await cfg.start("echo-1", {})
    try:
        assert cfg.value.hosts == [] and cfg.versions["echo"] == 0
        rejected = cfg.info()["rejected"]["echo"]
        assert rejected["version"] == 1
        assert "AttributeError" in rejected["error"] and "987654321" not in rejected["error"]
        await store.set_key("echo", "hosts", "a,b")
        await wait_until(lambda: cfg.value.hosts == ["a", "b"], "version 2 applied")
        # While following: rejected, recorded, and the watch goes on.
        await store.set_key("echo", "hosts", 5)
        await wait_until(
            lambda: cfg.info()["rejected"].get("echo", {}).get("version") == 3, "version 3 refused"
        )
        assert cfg.value.hosts == ["a", "b"] and _follow_tasks_alive(cfg)
        await store.set_key("echo", "hosts", "c,d")
        await wait_until(lambda: cfg.value.hosts == ["c", "d"], "version 4 applied")
        assert "echo" not in cfg.info()["rejected"] and cfg.info()["store_reachable"]
        # The shared namespace's watch survived too.
        await store.set_key("_shared", "hosts", "s")
        await wait_until(lambda: cfg.versions["_shared"] == 1, "shared version applied")
        assert _follow_tasks_alive(cfg)
    finally:
        await cfg.stop()
    assert "987654321" not in capsys.readouterr().out


class Exploding(BaseModel):
    name: str = "ok"

    @field_serializer("name")
    def dump(self, value: str) -> str:
        if value == "boom":
            raise RuntimeError("serializer bug")
        return value


async def test_unexpected_error_while_applying_keeps_the_watch(store: ConfigStore) -> None:
    """The backstop: an error outside validation (here a broken serializer hit when the
    changed keys are computed) refuses that version and the watch goes on."""
    cfg = _config(store, Exploding)
    await cfg.start("echo-1", {})
    try:
        await store.set_key("echo", "name", "boom")
        await wait_until(lambda: "echo" in cfg.info()["rejected"], "version 1 refused")
        assert cfg.versions["echo"] == 0 and cfg.value.name == "ok"
        assert "RuntimeError: serializer bug" in cfg.info()["rejected"]["echo"]["error"]
        assert _follow_tasks_alive(cfg)
        await store.set_key("echo", "name", "fine")
        await wait_until(lambda: cfg.value.name == "fine", "version 2 applied")
        assert "echo" not in cfg.info()["rejected"]
        json.dumps(cfg.info())
    finally:
        await cfg.stop()
