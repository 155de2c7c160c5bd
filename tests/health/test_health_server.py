"""The health endpoint over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, Counter

from meshkit.health import LAG_METRIC, HealthServer, HealthState, LoopMonitor, Phase


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def state() -> HealthState:
    return HealthState(requires_registration=True)


@pytest.fixture
def info_fn() -> dict[str, Any]:
    # A mutable holder so a test can swap what /info returns.
    return {"fn": lambda: {"service": "echo", "version": "1.0.0", "instance": "echo-1"}}


@pytest.fixture
async def server(
    state: HealthState, registry: CollectorRegistry, info_fn: dict[str, Any]
) -> AsyncIterator[HealthServer]:
    def info() -> Mapping[str, Any]:
        fn: Callable[[], Mapping[str, Any]] = info_fn["fn"]
        return fn()

    srv = HealthServer(state=state, registry=registry, info=info)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def get(
    http: aiohttp.ClientSession, url: str, **headers: str
) -> tuple[int, Any, aiohttp.ClientResponse]:
    async with http.get(url, headers=headers) as resp:
        if resp.content_type == "application/json":
            return resp.status, await resp.json(), resp
        return resp.status, await resp.text(), resp


# -- binding -------------------------------------------------------------------------------


async def test_port_zero_picks_a_free_port(server: HealthServer) -> None:
    assert server.port > 0
    assert server.url == f"http://127.0.0.1:{server.port}"


async def test_two_servers_get_different_ports(
    state: HealthState, registry: CollectorRegistry
) -> None:
    async with (
        HealthServer(state=state, registry=registry, info=dict) as a,
        HealthServer(state=state, registry=registry, info=dict) as b,
    ):
        assert a.port != b.port


async def test_port_before_start_raises(state: HealthState) -> None:
    srv = HealthServer(state=state, info=dict)
    with pytest.raises(RuntimeError, match="not started"):
        _ = srv.port


async def test_stop_frees_the_port(
    state: HealthState, registry: CollectorRegistry, http: aiohttp.ClientSession
) -> None:
    srv = HealthServer(state=state, registry=registry, info=dict)
    await srv.start()
    port, url = srv.port, srv.url
    status, _, _ = await get(http, f"{url}/health/live")
    assert status == 200
    await srv.stop()
    await srv.stop()  # idempotent

    with pytest.raises(aiohttp.ClientConnectionError):
        await get(http, f"{url}/health/live")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()


async def test_start_twice_raises(server: HealthServer) -> None:
    with pytest.raises(RuntimeError, match="already started"):
        await server.start()


async def test_start_on_a_taken_port_raises(server: HealthServer, state: HealthState) -> None:
    other = HealthServer(state=state, port=server.port, info=dict)
    with pytest.raises(OSError):
        await other.start()
    await other.stop()


# -- liveness --------------------------------------------------------------------------------


async def test_live_without_monitor(server: HealthServer, http: aiohttp.ClientSession) -> None:
    status, body, resp = await get(http, f"{server.url}/health/live")
    assert status == 200
    assert body == {"status": "live", "loop_lag_ms": None}
    assert resp.headers["Cache-Control"] == "no-store"


async def test_live_stays_200_while_draining(
    server: HealthServer, state: HealthState, http: aiohttp.ClientSession
) -> None:
    state.set_phase(Phase.DRAINING)
    status, body, _ = await get(http, f"{server.url}/health/live")
    assert status == 200
    assert body["status"] == "live"


async def test_head_is_supported(server: HealthServer, http: aiohttp.ClientSession) -> None:
    async with http.head(f"{server.url}/health/live") as resp:
        assert resp.status == 200
        assert await resp.read() == b""
    async with http.head(f"{server.url}/health/ready") as resp:
        assert resp.status == 503


# -- readiness -------------------------------------------------------------------------------


async def test_ready_follows_phase_registration_and_checks(
    server: HealthServer, state: HealthState, http: aiohttp.ClientSession
) -> None:
    url = f"{server.url}/health/ready"

    status, body, _ = await get(http, url)
    assert status == 503
    assert body == {"status": "not_ready", "reason": "starting", "phase": "starting"}

    state.set_phase(Phase.SERVING)
    status, body, _ = await get(http, url)
    assert status == 503
    assert body == {"status": "not_ready", "reason": "not registered", "phase": "serving"}

    state.set_registered(True)
    status, body, _ = await get(http, url)
    assert (status, body) == (200, {"status": "ready"})

    lag = {"value": 5000}
    state.add_check("db", lambda: True)
    state.add_check("kafka", lambda: (lag["value"] < 1000, f"consumer lag {lag['value']}"))
    status, body, _ = await get(http, url)
    assert status == 503
    assert body["reason"] == "check 'kafka' failing: consumer lag 5000"
    assert body["phase"] == "serving"

    lag["value"] = 10
    status, _, _ = await get(http, url)
    assert status == 200

    state.set_registered(False)  # lease lost
    status, body, _ = await get(http, url)
    assert (status, body["reason"]) == (503, "not registered")
    state.set_registered(True)

    state.set_phase(Phase.DRAINING)
    status, body, _ = await get(http, url)
    assert status == 503
    assert body == {"status": "not_ready", "reason": "draining", "phase": "draining"}

    state.set_phase(Phase.STOPPED)
    status, body, _ = await get(http, url)
    assert (status, body["reason"]) == (503, "stopped")


async def test_check_that_raises_counts_as_failing(
    server: HealthServer, state: HealthState, http: aiohttp.ClientSession
) -> None:
    def broken() -> bool:
        raise ConnectionError("broker down")

    state.set_phase(Phase.SERVING)
    state.set_registered(True)
    state.add_check("kafka", broken)
    status, body, _ = await get(http, f"{server.url}/health/ready")
    assert status == 503
    assert body["reason"] == "check 'kafka' failing: ConnectionError: broker down"

    state.remove_check("kafka")
    status, _, _ = await get(http, f"{server.url}/health/ready")
    assert status == 200


def test_ready_without_registry_needs_only_serving() -> None:
    state = HealthState()
    assert state.ready() == (False, "starting")
    state.set_phase(Phase.SERVING)
    assert state.ready() == (True, "ready")
    state.add_check("cache", lambda: False)
    assert state.ready() == (False, "check 'cache' failing")
    assert state.check_names == ["cache"]


def test_async_checks_are_refused_and_odd_results_fail_clearly() -> None:
    """An ``async def`` check would be a coroutine, which is true: it is refused when added.
    A callable that returns an awaitable anyway, or a tuple of the wrong shape, counts as
    failing with a detail that says why (not ready, never a 500)."""
    state = HealthState()
    state.set_phase(Phase.SERVING)

    async def db_ok() -> bool:
        return False

    with pytest.raises(TypeError, match="'db' is an async function"):
        state.add_check("db", db_ok)
    assert state.check_names == []
    state.add_check("db", lambda: db_ok())  # a plain function returning a coroutine
    ok, reason = state.ready()
    assert not ok and "returned an awaitable" in reason
    state.add_check("db", lambda: (False,))
    assert state.ready() == (
        False,
        "check 'db' failing: expected True/False or (ok, detail) from the check, found (False,)",
    )


# -- metrics ---------------------------------------------------------------------------------


async def test_metrics_text_format(
    server: HealthServer, registry: CollectorRegistry, http: aiohttp.ClientSession
) -> None:
    calls = Counter("echo_calls", "Calls to echo.", ["method"], registry=registry)
    calls.labels(method="echo").inc(3)

    status, text, resp = await get(http, f"{server.url}/metrics")
    assert status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert 'echo_calls_total{method="echo"} 3.0' in text


async def test_metrics_openmetrics_when_asked(
    server: HealthServer, registry: CollectorRegistry, http: aiohttp.ClientSession
) -> None:
    Counter("echo_calls", "Calls to echo.", registry=registry).inc()

    accept = "application/openmetrics-text; version=1.0.0,text/plain;version=0.0.4;q=0.5"
    status, text, resp = await get(http, f"{server.url}/metrics", Accept=accept)
    assert status == 200
    assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
    assert "echo_calls_total 1.0" in text
    assert text.endswith("# EOF\n")


async def test_metrics_gzip_when_accepted(
    server: HealthServer, registry: CollectorRegistry, http: aiohttp.ClientSession
) -> None:
    Counter("echo_calls", "Calls to echo.", registry=registry).inc()

    status, text, resp = await get(http, f"{server.url}/metrics", **{"Accept-Encoding": "gzip"})
    assert status == 200
    assert resp.headers["Content-Encoding"] == "gzip"
    assert "echo_calls_total 1.0" in text  # the client decompressed it

    _, _, resp = await get(http, f"{server.url}/metrics", **{"Accept-Encoding": "identity"})
    assert "Content-Encoding" not in resp.headers


# -- info ------------------------------------------------------------------------------------


async def test_info_content_and_phase(
    server: HealthServer, state: HealthState, info_fn: dict[str, Any], http: aiohttp.ClientSession
) -> None:
    started = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)
    info_fn["fn"] = lambda: {
        "service": "echo",
        "version": "1.0.0",
        "instance": "echo-1",
        "config_version": 7,
        "registry": {"url": "local://", "registered": True},
        "started": started,  # not JSON-native: rendered with str()
    }
    state.set_phase(Phase.SERVING)
    status, body, _ = await get(http, f"{server.url}/info")
    assert status == 200
    assert body == {
        "service": "echo",
        "version": "1.0.0",
        "instance": "echo-1",
        "config_version": 7,
        "registry": {"url": "local://", "registered": True},
        "started": str(started),
        "phase": "serving",
    }


async def test_info_raising_gives_500_and_server_keeps_serving(
    server: HealthServer, info_fn: dict[str, Any], http: aiohttp.ClientSession
) -> None:
    def boom() -> Mapping[str, Any]:
        raise KeyError("config_version")

    info_fn["fn"] = boom
    status, body, _ = await get(http, f"{server.url}/info")
    assert status == 500
    assert body["error"] == "KeyError"
    assert "config_version" in body["message"]
    assert body["path"] == "/info"

    status, body, _ = await get(http, f"{server.url}/health/live")
    assert (status, body["status"]) == (200, "live")


# -- errors ----------------------------------------------------------------------------------


async def test_unknown_path_is_404_json(server: HealthServer, http: aiohttp.ClientSession) -> None:
    status, body, _ = await get(http, f"{server.url}/nope")
    assert status == 404
    assert body == {"error": "Not Found", "status": 404, "path": "/nope"}


async def test_wrong_method_is_405_json(server: HealthServer, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{server.url}/health/ready") as resp:
        assert resp.status == 405
        assert "GET" in resp.headers["Allow"]
        body = await resp.json()
    assert body["error"] == "Method Not Allowed"


# -- loop monitor ----------------------------------------------------------------------------


async def test_loop_monitor_measures_a_blocked_loop(
    state: HealthState, registry: CollectorRegistry, http: aiohttp.ClientSession
) -> None:
    mon = LoopMonitor(interval=0.05, stall_after=0.3, service="echo", registry=registry)
    mon.start()
    try:
        async with HealthServer(state=state, registry=registry, info=dict, loop_monitor=mon) as srv:
            await asyncio.sleep(0.2)
            assert mon.running
            before = mon.last_beat
            time.sleep(0.6)  # block the event loop on purpose
            await asyncio.sleep(0.2)  # let the monitor beat again

            assert mon.last_beat > before
            assert mon.max_lag_recent >= 0.5
            assert mon.is_live()
            status, body, _ = await get(http, f"{srv.url}/health/live")
            assert status == 200
            assert body["status"] == "live"
            assert body["loop_lag_max_ms"] >= 500

            lag = registry.get_sample_value(LAG_METRIC, {"service": "echo"})
            assert lag is not None and lag >= 0.5
            _, text, _ = await get(http, f"{srv.url}/metrics")
            assert f'{LAG_METRIC}{{service="echo"}}' in text
    finally:
        await mon.stop()
    assert not mon.running
    assert registry.get_sample_value(LAG_METRIC, {"service": "echo"}) is None


async def test_stalled_loop_monitor_gives_503(
    state: HealthState, registry: CollectorRegistry, http: aiohttp.ClientSession
) -> None:
    # Never started: its last beat stays at construction time and grows old.
    mon = LoopMonitor(interval=0.01, stall_after=0.05, registry=registry)
    async with HealthServer(state=state, registry=registry, info=dict, loop_monitor=mon) as srv:
        await asyncio.sleep(0.1)
        assert not mon.is_live()
        status, body, _ = await get(http, f"{srv.url}/health/live")
    assert status == 503
    assert body["status"] == "stalled"
    assert "event loop stalled" in body["reason"]


async def test_monitors_share_a_registry(registry: CollectorRegistry) -> None:
    a = LoopMonitor(interval=0.01, stall_after=1.0, service="a", registry=registry)
    b = LoopMonitor(interval=0.01, stall_after=1.0, service="b", registry=registry)
    a.start()
    b.start()
    a.start()  # idempotent
    await asyncio.sleep(0.05)
    assert registry.get_sample_value(LAG_METRIC, {"service": "a"}) is not None
    assert registry.get_sample_value(LAG_METRIC, {"service": "b"}) is not None
    await a.stop()
    assert registry.get_sample_value(LAG_METRIC, {"service": "a"}) is None
    assert registry.get_sample_value(LAG_METRIC, {"service": "b"}) is not None
    await b.stop()
    await b.stop()  # idempotent


def test_loop_monitor_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="interval"):
        LoopMonitor(interval=0, registry=None)
    with pytest.raises(ValueError, match="stall_after"):
        LoopMonitor(interval=1.0, stall_after=0.5, registry=None)
