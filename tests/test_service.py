"""The Service app object: registration, discovery, health, and drain on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from echo_support import ROOT, EchoImpl, echo_thrift
from prometheus_client import CollectorRegistry

from meshkit import Client, NoInstances, Service
from meshkit.errors import ConfigError
from meshkit.registry import LocalRegistry
from meshkit.settings import Settings


async def get_json(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, await resp.json(content_type=None)


async def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met within the timeout")


async def test_registers_serves_health_and_is_discovered(registry_url: str) -> None:
    metrics = CollectorRegistry()
    svc = Service(
        "echo",
        echo_thrift.Echo,
        version="1.2.3",
        registry=registry_url,
        metrics_registry=metrics,
        tags={"zone": "a"},
    )
    svc.implement(EchoImpl)
    await svc.start(port=0, health_port=0)
    try:
        base = f"http://127.0.0.1:{svc.health_port}"
        assert (await get_json(base + "/health/live"))[0] == 200
        status, body = await get_json(base + "/health/ready")
        assert status == 200, body
        status, info = await get_json(base + "/info")
        assert info["service"] == "echo" and info["version"] == "1.2.3"
        assert info["instance"]["port"] == svc.port
        assert info["instance"]["health_port"] == svc.health_port
        assert info["instance"]["tags"] == {"zone": "a"}
        assert info["rpc"]["pipeline"].startswith("decode → deadline")

        async with Client(echo_thrift.Echo, "echo", registry=registry_url) as client:
            assert await client.echo("via registry") == "via registry"
        async with aiohttp.ClientSession() as session, session.get(base + "/metrics") as resp:
            text = await resp.text()
        assert 'meshkit_rpc_server_requests_total{code="OK",method="echo",service="echo"}' in text
    finally:
        await svc.stop()
    reg = LocalRegistry(registry_url.removeprefix("local://"))
    assert await reg.resolve("echo") == []
    await reg.close()


async def test_no_instances_is_a_clear_error(registry_url: str) -> None:
    async with Client(echo_thrift.Echo, "nobody", registry=registry_url) as client:
        with pytest.raises(NoInstances, match="'nobody'"):
            await client.echo("x")


async def test_service_without_implementation_fails_clearly() -> None:
    svc = Service("empty", echo_thrift.Echo, registry=None, metrics_registry=CollectorRegistry())
    with pytest.raises(ConfigError, match="no implementation"):
        await svc.start()


def test_incomplete_implementation_is_rejected() -> None:
    class Partial:
        async def echo(self, message: str) -> str:
            return message

    svc = Service("partial", echo_thrift.Echo, registry=None)
    svc.implement(Partial)
    with pytest.raises(Exception, match="missing: reverse, slow, ping"):
        asyncio.run(svc.start())


def test_settings_from_env_and_overrides() -> None:
    env = {"MESHKIT_PORT": "9000", "MESHKIT_DRAIN_TIMEOUT": "2.5", "MESHKIT_HOST": "0.0.0.0"}
    settings = Settings.from_env(env, port=9001)
    assert (settings.host, settings.port, settings.drain_timeout) == ("0.0.0.0", 9001, 2.5)
    with pytest.raises(ConfigError, match="MESHKIT_PORT to be an integer, found 'abc'"):
        Settings.from_env({"MESHKIT_PORT": "abc"})
    with pytest.raises(ConfigError, match="port between 0 and 65535"):
        Settings.from_env({"MESHKIT_PORT": "70000"})


SERVER_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys, thriftpy2
    sys.path.insert(0, {tests!r})
    from echo_support import EchoImpl, echo_thrift
    from meshkit import Service
    svc = Service("drainer", echo_thrift.Echo, registry={registry!r})
    svc.implement(EchoImpl)
    svc.run()
    """
)


async def test_sigterm_drains_calls_in_flight_then_exits_zero(
    tmp_path: Path, registry_url: str
) -> None:
    """A real process gets SIGTERM with 20 calls in flight: all 20 are answered, exit 0."""
    script = tmp_path / "server.py"
    script.write_text(SERVER_SCRIPT.format(tests=str(ROOT / "tests"), registry=registry_url))
    env = {**os.environ, "MESHKIT_DRAIN_TIMEOUT": "10", "MESHKIT_LOG_LEVEL": "info"}
    proc = subprocess.Popen(
        [sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        reg = LocalRegistry(registry_url.removeprefix("local://"))

        async def registered() -> bool:
            return bool(await reg.resolve("drainer"))

        await wait_for(registered, timeout=20)
        instance = (await reg.resolve("drainer"))[0]
        ready_url = f"http://127.0.0.1:{instance.health_port}/health/ready"
        async with Client(echo_thrift.Echo, "drainer", addr=instance.address, timeout=15) as client:
            calls = [asyncio.ensure_future(client.slow(1500)) for _ in range(20)]
            await asyncio.sleep(0.5)  # all 20 are now running in the server
            proc.send_signal(signal.SIGTERM)

            async def not_ready() -> bool:
                try:
                    return (await get_json(ready_url))[0] == 503
                except aiohttp.ClientError:
                    return False

            await wait_for(not_ready, timeout=5)
            assert await asyncio.gather(*calls) == [1500] * 20
        rc = await asyncio.to_thread(proc.wait, 20)
        output = proc.stdout.read().decode() if proc.stdout else ""
        assert rc == 0, output
        drained = [json.loads(line) for line in output.splitlines() if '"service drained"' in line]
        assert drained and drained[0]["calls_in_flight_at_stop"] == 20
        assert drained[0]["finished"] is True
        assert await reg.resolve("drainer") == []
        await reg.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_tags_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from meshkit.settings import parse_tags

    assert parse_tags(" zone=a , canary=true,") == {"zone": "a", "canary": "true"}
    with pytest.raises(ConfigError, match="key=value, found 'oops'"):
        parse_tags("zone=a,oops")
    monkeypatch.setenv("MESHKIT_TAGS", "zone=b,canary=true")
    svc = Service("tagged", echo_thrift.Echo, registry=None, tags={"zone": "c"})
    assert svc.tags == {"zone": "c", "canary": "true"}


async def test_stop_closes_clients_the_service_made(registry_url: str) -> None:
    metrics = CollectorRegistry()
    backend = Service("backend", echo_thrift.Echo, registry=registry_url, metrics_registry=metrics)
    backend.implement(EchoImpl)
    front = Service("front", echo_thrift.Echo, registry=registry_url, metrics_registry=metrics)
    front.implement(EchoImpl)
    await backend.start(port=0, health_port=0)
    await front.start(port=0, health_port=0)
    client = front.client(echo_thrift.Echo, "backend")
    assert await client.echo("x") == "x"
    assert client.caller == "front"
    assert front.info()["discovery"] == [
        {"service": "backend", "instances": 1, "stale": False, "breakers": {}, "ejected": {}}
    ]
    from prometheus_client import REGISTRY, generate_latest

    text = generate_latest(REGISTRY).decode()
    assert 'meshkit_discovery_instances{service="backend"} 1.0' in text
    assert 'meshkit_discovery_stale{service="backend"} 0.0' in text
    await front.stop()
    assert client.pool._closed
    await backend.stop()


async def test_adaptive_concurrency_from_settings() -> None:
    settings = Settings.from_env(
        {"MESHKIT_CONCURRENCY": "adaptive", "MESHKIT_MAX_CONCURRENCY": "200"}
    )
    svc = Service(
        "adaptive",
        echo_thrift.Echo,
        registry=None,
        settings=settings,
        metrics_registry=CollectorRegistry(),
    )
    svc.implement(EchoImpl)
    await svc.start(port=0, health_port=0)
    try:
        assert svc.server is not None
        limit = svc.server.pipeline.middlewares[2]
        assert type(limit).__name__ == "AdaptiveLimit"
        assert limit.max_limit == 200
        async with Client(echo_thrift.Echo, "adaptive", addr=f"127.0.0.1:{svc.port}") as client:
            assert await client.echo("x") == "x"
    finally:
        await svc.stop()
    with pytest.raises(ConfigError, match="'fixed' or 'adaptive'"):
        Settings.from_env({"MESHKIT_CONCURRENCY": "maybe"})
