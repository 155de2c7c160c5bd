"""Bad versions, bad records and bad validators never end the config watch: each is
refused (or skipped) with a clear error, the last good settings stay, and the next good
version is applied."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import sys
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, field_serializer, field_validator
from waiting import wait_until

from meshkit.config import ConfigStore, ServiceConfig, store_from_url
from meshkit.config.kv import Delete, Put
from meshkit.errors import ConfigError, Unavailable


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


class Counter(BaseModel):
    n: int = 0


async def test_malformed_head_record_does_not_end_the_watch(store: ConfigStore) -> None:
    await store.set_key("echo", "n", 1)
    cfg = _config(store, Counter)
    await cfg.start("echo-1", {})
    try:
        good = await store.kv.get("echo/head/current")
        assert good is not None and cfg.value.n == 1
        await store.kv.txn([], [Put("echo/head/current", "{not json")])  # a bad hand edit
        await wait_until(lambda: not cfg.info()["store_reachable"], "the bad record reported")
        assert "echo/head/current is not valid JSON" in cfg.info()["store_error"]
        assert cfg.value.n == 1 and _follow_tasks_alive(cfg)
        await store.kv.txn([], [Put("echo/head/current", good.value)])  # the repair
        await wait_until(lambda: cfg.info()["store_reachable"], "the repair noticed")
        await store.set_key("echo", "n", 2)
        await wait_until(lambda: cfg.value.n == 2, "version 2 applied after the repair")
        # Valid JSON of the wrong shape in head/gray: the same, and no value is echoed.
        await store.kv.txn([], [Put("echo/head/gray", '{"version": {"values": 5}, "x": "s3"}')])
        await wait_until(lambda: not cfg.info()["store_reachable"], "the bad gray reported")
        error = cfg.info()["store_error"]
        assert "echo/head/gray" in error and "s3" not in error
        await store.kv.txn([], [Delete("echo/head/gray")])
        await store.set_key("echo", "n", 3)
        await wait_until(lambda: cfg.value.n == 3, "version 3 applied")
        assert cfg.info()["store_reachable"] and _follow_tasks_alive(cfg)
    finally:
        await cfg.stop()


async def test_malformed_head_record_at_start_uses_the_cache(
    local_url: str, tmp_path: Path
) -> None:
    store = store_from_url(local_url)
    cache = tmp_path / "cache.json"
    try:
        await store.set_key("echo", "n", 1)
        cfg = _config(store, Counter, cache_file=cache)
        await cfg.start("echo-1", {})
        await cfg.stop()
        assert cache.exists()
        good = await store.kv.get("echo/head/current")
        assert good is not None
        await store.kv.txn([], [Put("echo/head/current", "{not json")])
        cfg = _config(store, Counter, cache_file=cache)
        await cfg.start("echo-2", {})
        try:
            info = cfg.info()
            assert cfg.value.n == 1 and info["from_cache"] and not info["store_reachable"]
            assert "is not valid JSON" in info["store_error"]
        finally:
            await cfg.stop()
        # Without a cache: starts on the other layers, then takes the repaired store.
        cfg = _config(store, Counter)
        await cfg.start("echo-3", {})
        try:
            assert cfg.value.n == 0 and cfg.versions["echo"] == 0
            await store.kv.txn([], [Put("echo/head/current", good.value)])
            await wait_until(lambda: cfg.value.n == 1, "the repaired version applied")
            assert cfg.info()["store_reachable"]
        finally:
            await cfg.stop()
        # Tools reading the state get a clear ConfigError naming the key.
        await store.kv.txn([], [Put("echo/head/current", "[1]")])
        with pytest.raises(ConfigError, match="echo/head/current: expected a version record"):
            await store.state("echo")
    finally:
        await store.close()


class Limit(BaseModel):
    limit: int = 10


async def test_async_validator_refused_and_awaitable_result_rejects(store: ConfigStore) -> None:
    cfg = _config(store, Limit)

    async def positive(s: Limit) -> None:
        if s.limit <= 0:
            raise ValueError("limit must be positive")

    with pytest.raises(ConfigError, match=r"validator .*positive is async"):
        cfg.validator(positive)
    with pytest.raises(ConfigError, match="expected a function"):
        cfg.validator(42)  # type: ignore[arg-type]

    # A plain function handing back a coroutine is caught when it runs: the check never
    # ran, so the version must not pass (and the coroutine is closed, not left to warn).
    cfg.validator(lambda s: positive(s) if s.limit < 0 else None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        await cfg.start("echo-1", {})
        try:
            await store.set_key("echo", "limit", -5)
            await wait_until(lambda: "echo" in cfg.info()["rejected"], "version 1 refused")
            assert cfg.value.limit == 10 and cfg.versions["echo"] == 0
            assert "returned an awaitable" in cfg.info()["rejected"]["echo"]["error"]
            await store.set_key("echo", "limit", 3)
            await wait_until(lambda: cfg.value.limit == 3, "version 2 applied")
        finally:
            await cfg.stop()
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)]

    # One that always does so fails the start with that message (defaults included).
    cfg = _config(store, Limit)
    cfg.validator(lambda s: positive(s))
    with pytest.raises(ConfigError, match="returned an awaitable"):
        await cfg.start("echo-2", {})


_HOLD_LOCK = """
import fcntl, os, select, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
select.select([sys.stdin], [], [], 15)  # hold until told (at most 15 s: a frozen loop ends)
"""


@contextlib.asynccontextmanager
async def _lock_held(path: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """Another process holding the store's lock until its stdin is written or closed."""
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _HOLD_LOCK,
        str(path),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert holder.stdin is not None and holder.stdout is not None
    try:
        assert await holder.stdout.readline() == b"locked\n"
        yield holder
    finally:
        if holder.returncode is None:
            holder.stdin.close()
        await holder.wait()


async def test_local_store_lock_held_elsewhere_does_not_freeze_the_loop(tmp_path: Path) -> None:
    directory = tmp_path / "config"
    store = store_from_url(f"local://{directory}")
    await store.set_key("echo", "n", 1)
    try:
        async with _lock_held(directory / ".lock") as holder:
            ticks = 0

            async def tick() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.01)
                    ticks += 1

            ticker = asyncio.create_task(tick())
            reader = asyncio.create_task(store.state("echo"))
            # The loop keeps running while the read waits for the other process's lock.
            await wait_until(lambda: ticks >= 20, "the event loop running during the wait")
            assert not reader.done() and holder.returncode is None
            holder.stdin.write(b"release\n")
            await holder.stdin.drain()
            state = await reader
            assert state.current is not None and state.current.values == {"n": 1}
            ticker.cancel()
    finally:
        await store.close()


async def test_local_store_lock_wait_is_bounded(tmp_path: Path) -> None:
    directory = tmp_path / "config"
    store = store_from_url(f"local://{directory}?lock_timeout=0.2")
    await store.set_key("echo", "n", 1)
    try:
        async with _lock_held(directory / ".lock") as holder:
            with pytest.raises(Unavailable, match=r"locked by another process for more than 0\.2s"):
                await store.set_key("echo", "n", 2)
            holder.stdin.close()
            await holder.wait()
            assert (await store.set_key("echo", "n", 2)).version == 2  # nothing was lost
    finally:
        await store.close()
    with pytest.raises(ConfigError, match="expected lock_timeout"):
        store_from_url(f"local://{directory}?lock_timeout=0")
