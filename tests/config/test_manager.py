"""ServiceConfig: layering, secrets, validation before apply, callbacks, gray rollout,
cache file and bad input."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, Field, SecretStr, field_validator
from waiting import wait_until

from meshkit.config import SHARED, ConfigChange, ConfigStore, Selector, ServiceConfig
from meshkit.errors import ConfigError


class Db(BaseModel):
    host: str = "localhost"
    pool_size: int = Field(4, ge=1)
    password: SecretStr = SecretStr("default-pw")


class Settings(BaseModel):
    greeting: str = "hello"
    limit: int = Field(10, ge=1)
    ratio: float = 0.5
    tags: list[str] = []
    api_token: SecretStr | None = None
    db: Db = Db()

    @field_validator("greeting")
    @classmethod
    def not_shouting(cls, value: str) -> str:
        if value.isupper():
            raise ValueError("must not be all upper case")
        return value


async def test_layering_order_and_sources(store: ConfigStore, tmp_path: Path) -> None:
    file = tmp_path / "echo.toml"
    file.write_text('greeting = "from-file"\nlimit = 2\nratio = 0.1\n[db]\nhost = "file-db"\n')
    await store.replace(
        SHARED, {"limit": 3, "ratio": 0.2, "tags": ["shared"], "db": {"pool_size": 7}}
    )
    await store.replace("echo", {"ratio": 0.3, "tags": ["own"], "db": {"pool_size": 8}})
    env = {"ECHO_TAGS": '["env"]', "ECHO_DB__POOL_SIZE": "9", "OTHER": "x"}
    cfg = ServiceConfig(
        "echo",
        Settings,
        store=store,
        file=file,
        environ=env,
        overrides={"tags": ["override"]},
        metrics_registry=CollectorRegistry(),
    )
    await cfg.start("echo-1", {})
    try:
        v = cfg.value
        assert (v.greeting, v.limit, v.ratio, v.tags) == ("from-file", 3, 0.3, ["override"])
        assert (v.db.host, v.db.pool_size) == ("file-db", 9)
        eff = cfg.effective()
        assert {k: e["source"] for k, e in eff.items()} == {
            "greeting": "file",
            "limit": "shared",
            "ratio": "store",
            "tags": "override",
            "api_token": "default",
            "db.host": "file",
            "db.pool_size": "env",
            "db.password": "default",
        }
        assert cfg.versions == {"echo": 1, SHARED: 1}
        assert cfg.greeting == "from-file"  # attribute access reads the value in force
    finally:
        await cfg.stop()


async def test_secrets_are_masked_everywhere(
    store: ConfigStore, capsys: pytest.CaptureFixture[str]
) -> None:
    await store.replace(
        "echo", {"api_token": "tok-very-secret-1", "db": {"password": "pw-secret-2"}}
    )
    cfg = ServiceConfig(
        "echo", Settings, store=store, environ={}, metrics_registry=CollectorRegistry()
    )
    await cfg.start("echo-1", {})
    try:
        assert cfg.value.api_token.get_secret_value() == "tok-very-secret-1"
        info = json.dumps(cfg.info())
        assert "tok-very-secret-1" not in info and "pw-secret-2" not in info
        assert cfg.effective()["api_token"] == {"value": "**********", "source": "store"}
        assert cfg.effective()["db.password"]["value"] == "**********"
        assert set(cfg.status().secret_keys) == {"api_token", "db.password"}
        # A change of a secret is applied and logged by key name only.
        await store.set_key("echo", "api_token", "tok-new-secret-3")
        await wait_until(lambda: cfg.versions["echo"] == 2, "the new token applied")
        await store.set_key("echo", "api_token", {"not": "a string, secret-4"})
        await wait_until(lambda: "echo" in cfg.info()["rejected"], "the bad token rejected")
        error = cfg.info()["rejected"]["echo"]["error"]
        assert "api_token" in error and "secret-4" not in error
    finally:
        await cfg.stop()
    out = capsys.readouterr()
    for secret in ("tok-very-secret-1", "pw-secret-2", "tok-new-secret-3", "secret-4"):
        assert secret not in out.out + out.err


async def test_invalid_version_rejected_last_good_kept(store: ConfigStore) -> None:
    registry = CollectorRegistry()
    cfg = ServiceConfig("echo", Settings, store=store, environ={}, metrics_registry=registry)
    await cfg.start("echo-1", {})
    try:
        await store.set_key("echo", "limit", 5)
        await wait_until(lambda: cfg.value.limit == 5, "limit 5 applied")
        good = cfg.value
        await store.set_key("echo", "limit", 0, message="oops")
        await wait_until(lambda: "echo" in cfg.info()["rejected"], "version 2 rejected")
        assert cfg.value is good and cfg.versions["echo"] == 1
        rejected = cfg.info()["rejected"]["echo"]
        assert rejected["version"] == 2
        assert rejected["error"].startswith("limit (from store): Input should be greater than")
        labels = {"service": "echo", "namespace": "echo"}
        assert registry.get_sample_value("meshkit_config_rejected_total", labels) == 1
        assert registry.get_sample_value("meshkit_config_version", labels) == 1
        statuses = await _wait_status(store, lambda s: "echo" in s.rejected)
        assert statuses.versions["echo"] == 1 and statuses.rejected["echo"]["version"] == 2
        # A user validator rejects too, with its message.
        cfg.validator(lambda s: _fail_if(s.limit == 13, "13 is unlucky"))
        await store.set_key("echo", "limit", 13)
        await wait_until(lambda: cfg.info()["rejected"]["echo"]["version"] == 3, "3 rejected")
        assert "13 is unlucky" in cfg.info()["rejected"]["echo"]["error"]
        # The next good version applies and clears the rejection.
        await store.set_key("echo", "limit", 6)
        await wait_until(lambda: cfg.value.limit == 6, "limit 6 applied")
        assert cfg.info()["rejected"] == {}
        assert registry.get_sample_value("meshkit_config_rejected_total", labels) == 2
    finally:
        await cfg.stop()


def _fail_if(condition: bool, message: str) -> None:
    if condition:
        raise ValueError(message)


async def _wait_status(store: ConfigStore, predicate: Callable[[Any], bool]) -> Any:
    found: list[Any] = []

    async def check() -> bool:
        found[:] = [s for s in await store.statuses("echo") if predicate(s)]
        return bool(found)

    await wait_until(check, "a matching status record")
    return found[0]


async def test_bad_shared_version_does_not_hold_back_service_version(store: ConfigStore) -> None:
    cfg = ServiceConfig(
        "echo", Settings, store=store, environ={}, metrics_registry=CollectorRegistry()
    )
    await cfg.start("echo-1", {})
    try:
        await store.set_key(SHARED, "greeting", "LOUD")
        await wait_until(lambda: SHARED in cfg.info()["rejected"], "shared rejected")
        await store.set_key("echo", "limit", 7)
        await wait_until(lambda: cfg.value.limit == 7, "service version applied")
        assert cfg.versions == {"echo": 1, SHARED: 0}
        assert (
            "greeting (from shared): Value error, must not be all upper case"
            in (cfg.info()["rejected"][SHARED]["error"])
        )
    finally:
        await cfg.stop()


async def test_callbacks_isolated_and_per_key(store: ConfigStore) -> None:
    registry = CollectorRegistry()
    cfg = ServiceConfig("echo", Settings, store=store, environ={}, metrics_registry=registry)
    calls: list[tuple[str, frozenset[str]]] = []
    threads: list[str] = []

    @cfg.on_change
    async def broken(change: ConfigChange[Settings]) -> None:
        raise RuntimeError("callback bug")

    @cfg.on_change
    def plain(change: ConfigChange[Settings]) -> None:
        threads.append(threading.current_thread().name)
        calls.append(("plain", change.keys))

    @cfg.on_change(key="db")
    async def db_only(change: ConfigChange[Settings]) -> None:
        calls.append(("db", change.keys))
        assert change.new.db.pool_size != change.old.db.pool_size

    await cfg.start("echo-1", {})
    try:
        await store.set_key("echo", "limit", 5)
        await wait_until(lambda: ("plain", frozenset({"limit"})) in calls, "plain callback")
        await store.set_key("echo", "db.pool_size", 9)
        await wait_until(lambda: ("db", frozenset({"db.pool_size"})) in calls, "db callback")
        await wait_until(lambda: len(calls) == 3, "three calls")
        assert [c[0] for c in calls].count("db") == 1
        assert threads and threads[0] != threading.main_thread().name
        labels = {"service": "echo"}
        await wait_until(
            lambda: registry.get_sample_value("meshkit_config_callback_errors_total", labels) == 2,
            "two callback errors counted",
        )
        assert cfg.value.db.pool_size == 9  # the raising callback changed nothing
    finally:
        await cfg.stop()


async def test_async_iterator_of_changes(store: ConfigStore) -> None:
    cfg = ServiceConfig(
        "echo", Settings, store=store, environ={}, metrics_registry=CollectorRegistry()
    )
    await cfg.start("echo-1", {})
    got: list[int] = []

    async def consume() -> None:
        async for change in cfg.changes(key="limit"):
            got.append(change.new.limit)

    task = asyncio.create_task(consume())
    try:
        await asyncio.sleep(0)
        await store.set_key("echo", "greeting", "yo")
        for n in (2, 3):
            await store.set_key("echo", "limit", n)
            await wait_until(lambda n=n: got[-1:] == [n], f"limit {n}")
        assert got == [2, 3]
    finally:
        await cfg.stop()
        await asyncio.wait_for(task, 5)


async def test_gray_rollout_reaches_only_the_chosen_subset(store: ConfigStore) -> None:
    await store.set_key("echo", "limit", 1)
    fleet = {
        "echo-a": {"zone": "a"},
        "echo-b": {"zone": "b", "canary": "true"},
        "echo-c": {"zone": "c"},
    }
    configs: dict[str, ServiceConfig[Any]] = {}
    for instance, tags in fleet.items():
        cfg = ServiceConfig(
            "echo", Settings, store=store, environ={}, metrics_registry=CollectorRegistry()
        )
        await cfg.start(instance, tags)
        configs[instance] = cfg
    try:
        limits = lambda: {i: c.value.limit for i, c in configs.items()}  # noqa: E731
        await store.gray_publish(
            "echo", lambda v: {**v, "limit": 2}, Selector(tags={"canary": "true"})
        )
        await wait_until(lambda: limits()["echo-b"] == 2, "the canary on the gray version")
        await asyncio.sleep(0.2)
        assert limits() == {"echo-a": 1, "echo-b": 2, "echo-c": 1}
        assert configs["echo-b"].info()["gray"]["echo"] is True
        assert configs["echo-a"].info()["gray"]["echo"] is False
        assert (
            configs["echo-b"].metrics.registry.get_sample_value(
                "meshkit_config_gray", {"service": "echo", "namespace": "echo"}
            )
            == 1
        )
        await store.gray_abort("echo")
        await wait_until(lambda: limits()["echo-b"] == 1, "the canary back on current")

        await store.gray_publish(
            "echo", lambda v: {**v, "limit": 3}, Selector(instances=("echo-c",))
        )
        await wait_until(lambda: limits()["echo-c"] == 3, "echo-c on the gray version")
        assert limits() == {"echo-a": 1, "echo-b": 1, "echo-c": 3}
        await store.gray_promote("echo")
        await wait_until(lambda: set(limits().values()) == {3}, "everyone on the promoted version")
        assert {c.versions["echo"] for c in configs.values()} == {3}
    finally:
        for cfg in configs.values():
            await cfg.stop()


async def test_required_key_missing_everywhere_fails_start(store: ConfigStore) -> None:
    class Needs(BaseModel):
        dsn: str

    cfg = ServiceConfig(
        "echo", Needs, store=store, environ={}, metrics_registry=CollectorRegistry()
    )
    with pytest.raises(ConfigError, match="dsn: Field required"):
        await cfg.start("echo-1", {})
    await store.set_key("echo", "dsn", "pg://x")
    cfg = ServiceConfig(
        "echo", Needs, store=store, environ={}, metrics_registry=CollectorRegistry()
    )
    await cfg.start("echo-1", {})
    try:
        assert cfg.value.dsn == "pg://x"
    finally:
        await cfg.stop()


async def test_bad_file_and_env_give_clear_errors(store: ConfigStore, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("limit = = 3\n")
    cfg = ServiceConfig(
        "echo", Settings, store=store, file=bad, environ={}, metrics_registry=CollectorRegistry()
    )
    with pytest.raises(ConfigError, match=r"bad\.toml is not valid TOML: .*line 1"):
        await cfg.start("echo-1", {})
    missing = ServiceConfig(
        "echo",
        Settings,
        store=store,
        file=tmp_path / "nope.toml",
        environ={},
        metrics_registry=CollectorRegistry(),
    )
    with pytest.raises(ConfigError, match=r"cannot read config file .*nope\.toml"):
        await missing.start("echo-1", {})
    env = ServiceConfig(
        "echo",
        Settings,
        store=store,
        environ={"ECHO_LIMIT": "lots"},
        metrics_registry=CollectorRegistry(),
    )
    with pytest.raises(ConfigError, match=r"limit \(from env\): Input should be a valid integer"):
        await env.start("echo-1", {})
    with pytest.raises(ConfigError, match="expected a pydantic BaseModel subclass"):
        ServiceConfig("echo", dict, store=None)  # type: ignore[type-var]


async def test_no_schema_is_free_form(store: ConfigStore) -> None:
    await store.replace("echo", {"anything": {"goes": 1}})
    cfg: ServiceConfig[Any] = ServiceConfig(
        "echo", store=store, environ={}, metrics_registry=CollectorRegistry()
    )
    await cfg.start("echo-1", {})
    try:
        assert cfg.value.anything == {"goes": 1}
    finally:
        await cfg.stop()


async def test_cache_file_used_when_store_unreachable_at_start(
    local_url: str, tmp_path: Path
) -> None:
    from etcd_server import free_port

    from meshkit.config import store_from_url

    cache = tmp_path / "cache" / "echo.json"
    store = store_from_url(local_url)
    await store.set_key("echo", "limit", 42)
    cfg = ServiceConfig(
        "echo",
        Settings,
        store=store,
        cache_file=cache,
        environ={},
        metrics_registry=CollectorRegistry(),
    )
    await cfg.start("echo-1", {})
    await cfg.stop()
    assert cache.stat().st_mode & 0o077 == 0  # may hold secrets: owner only
    dead = f"etcd://127.0.0.1:{free_port()}?connect_timeout=0.2"
    offline = ServiceConfig(
        "echo",
        Settings,
        store=dead,
        cache_file=cache,
        initial_timeout=1.0,
        environ={},
        metrics_registry=CollectorRegistry(),
    )
    await offline.start("echo-1", {})
    try:
        assert offline.value.limit == 42 and offline.versions["echo"] == 1
        info = offline.info()
        assert info["from_cache"] is True and info["store_reachable"] is False
    finally:
        await offline.stop()
    nocache = ServiceConfig(
        "echo",
        Settings,
        store=dead,
        initial_timeout=1.0,
        environ={},
        metrics_registry=CollectorRegistry(),
    )
    await nocache.start("echo-1", {})  # starts on defaults, says so
    try:
        assert nocache.value.limit == 10 and nocache.info()["store_reachable"] is False
    finally:
        await nocache.stop()


def test_config_files_in_toml_yaml_and_json(tmp_path: Path) -> None:
    from meshkit.config.layers import load_file

    (tmp_path / "a.toml").write_text('limit = 3\n[db]\nhost = "h"\n')
    (tmp_path / "a.yaml").write_text("limit: 3\ndb:\n  host: h\n")
    (tmp_path / "a.yml").write_text("# nothing set yet\n")
    (tmp_path / "a.json").write_text('{"limit": 3, "db": {"host": "h"}}')
    expected = {"limit": 3, "db": {"host": "h"}}
    assert load_file(tmp_path / "a.toml") == expected
    assert load_file(tmp_path / "a.yaml") == expected
    assert load_file(tmp_path / "a.json") == expected
    assert load_file(tmp_path / "a.yml") == {}
    (tmp_path / "bad.yaml").write_text("limit: [3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml is not valid YAML"):
        load_file(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a YAML mapping at the top level"):
        load_file(tmp_path / "list.yaml")
    # safe_load: no Python objects from a config file
    (tmp_path / "evil.yaml").write_text("x: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_file(tmp_path / "evil.yaml")
