"""The Consul registry against the Consul HTTP double, or a real agent.

Every test here is a ``consul_contract`` test. With ``MESHKIT_CONSUL_ADDR=host:port`` set
they run against that agent (its ACL token, if any, from ``$CONSUL_HTTP_TOKEN``); otherwise
against :class:`consul_double.ConsulDouble`. Tests that need what only the double can do
(take the agent down, restart it without state, move its raft index, enforce a chosen ACL
token, shorten the reaper's minimum) are skipped against a real agent, with the reason.
The ``test_contract_*`` tests check the agent's own behaviour through raw HTTP, so the
same assertions hold the double to what a real agent does.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import secrets
import signal
import socket
import sys
import textwrap
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from consul_double import ConsulDouble
from echo_support import EchoImpl, echo_thrift
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs
from waiting import wait_until

from meshkit import Client, Service
from meshkit.errors import ConfigError, InvalidArgument, Unavailable
from meshkit.registry import Instance, RegistryResolver
from meshkit.registry.consul import ENV_TOKEN, ConsulRegistry

pytestmark = pytest.mark.consul_contract

DEADLINE = 10.0
ENV_ADDR = "MESHKIT_CONSUL_ADDR"
REAL_AGENT = bool(os.environ.get(ENV_ADDR))

RegistryFactory = Callable[..., ConsulRegistry]


# -- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture
async def consul_double() -> AsyncIterator[ConsulDouble | None]:
    """The running double, or ``None`` when ``MESHKIT_CONSUL_ADDR`` names a real agent."""
    if REAL_AGENT:
        yield None
        return
    double = ConsulDouble()
    await double.start()
    try:
        yield double
    finally:
        await double.close()


@pytest.fixture
def consul_addr(consul_double: ConsulDouble | None) -> str:
    """``host:port`` of the agent under test (real, or the double)."""
    if consul_double is not None:
        return consul_double.address
    return os.environ[ENV_ADDR].split("://", 1)[-1].rstrip("/")


@pytest.fixture
def double(consul_double: ConsulDouble | None) -> ConsulDouble:
    """The double, for tests that need its fault injection; skips on a real agent."""
    if consul_double is None:
        pytest.skip(
            "needs the Consul double's fault injection (listener stop/start, state-losing "
            "restart, raft index control, ACL or reaper settings), which cannot be applied to "
            f"the real agent at ${ENV_ADDR}"
        )
    return consul_double


@pytest.fixture
def service_name() -> str:
    """A service name no other test (or earlier run against a real agent) uses."""
    return f"mk-echo-{secrets.token_hex(4)}"


@pytest.fixture
async def make_registry(consul_addr: str) -> AsyncIterator[RegistryFactory]:
    """Build registries on the agent under test (fast TTLs); all closed at teardown."""
    made: list[ConsulRegistry] = []

    def make(url: str | None = None, **options: Any) -> ConsulRegistry:
        options.setdefault("ttl", 1.0)
        options.setdefault("wait", "5s")
        registry = ConsulRegistry.from_url(url or f"consul://{consul_addr}", **options)
        made.append(registry)
        return registry

    yield make
    for registry in made:
        await registry.close()


def inst(service: str, suffix: str = "1", port: int = 9000, **kw: Any) -> Instance:
    return Instance(service, f"{service}-{suffix}", "127.0.0.1", port, **kw)


def ids(instances: list[Instance]) -> list[str]:
    return [i.instance_id for i in instances]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def agent_headers() -> dict[str, str]:
    token = os.environ.get(ENV_TOKEN) if REAL_AGENT else None
    return {"X-Consul-Token": token} if token else {}


async def agent(
    addr: str, method: str, path: str, body: Any = None, **params: str
) -> tuple[int, Any, dict[str, str]]:
    """One raw request to the agent: (status, decoded body or text, headers)."""
    async with (
        aiohttp.ClientSession(headers=agent_headers()) as session,
        session.request(method, f"http://{addr}{path}", json=body, params=params) as resp,
    ):
        text = await resp.text()
        try:
            data: Any = json.loads(text) if text else None
        except ValueError:
            data = text
        return resp.status, data, dict(resp.headers)


REGISTRANT = textwrap.dedent(
    """
    import asyncio, sys
    from meshkit.registry import Instance
    from meshkit.registry.consul import ConsulRegistry

    async def main():
        url, service, ttl, dereg = sys.argv[1:5]
        reg = ConsulRegistry.from_url(url, ttl=ttl, deregister_critical_after=dereg)
        await reg.register(Instance(service, service + "-doomed", "127.0.0.1", 9999))
        print("registered", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


async def spawn_registrant(
    addr: str, service: str, ttl: str = "1s", dereg: str = "1m"
) -> asyncio.subprocess.Process:
    """A separate process that registers ``<service>-doomed`` and heartbeats until killed."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        REGISTRANT,
        f"consul://{addr}",
        service,
        ttl,
        dereg,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 20)
    assert line.strip() == b"registered", line
    return proc


async def end_watch(watch: AsyncGenerator[Any, None], *pending: asyncio.Future[Any] | None) -> None:
    """Cancel what still waits on ``watch``, then close it (also after a failed assertion)."""
    for future in pending:
        if future is not None and not future.done():
            future.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await future
    await watch.aclose()


async def kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGKILL)
    await proc.wait()


# -- registration and discovery ------------------------------------------------------------


async def test_register_then_resolve_round_trips_every_field(
    make_registry: RegistryFactory, consul_double: ConsulDouble | None, service_name: str
) -> None:
    reg = make_registry()
    a = inst(
        service_name,
        "a",
        9000,
        health_port=9100,
        version="1.2.3",
        weight=30,
        protocol="thrift-framed",
        tags={"zone": "a", "canary": "true"},
        start_time=1700000000.123456,
    )
    b = inst(service_name, "b", 9001)
    await reg.register(b)
    await reg.register(a)
    assert await reg.resolve(service_name) == [a, b]
    assert reg.status.connected and reg.status.last_ok > 0
    if consul_double is not None:
        body = consul_double.requests_to("/v1/agent/service/register")[-1].body
        assert body["ID"] == a.instance_id and body["Name"] == service_name
        assert (body["Address"], body["Port"]) == ("127.0.0.1", 9000)
        assert body["Tags"] == ["version=1.2.3", "canary=true", "zone=a"]
        assert body["Meta"] == {
            "version": "1.2.3",
            "weight": "30",
            "health_port": "9100",
            "protocol": "thrift-framed",
            "start_time": "1700000000.123456",
            "tags": '{"canary":"true","zone":"a"}',
        }
        assert body["Weights"] == {"Passing": 30, "Warning": 1}
        assert body["Check"] == {
            "CheckID": f"service:{a.instance_id}",
            "Name": "meshkit TTL heartbeat",
            "TTL": "1s",
            "DeregisterCriticalServiceAfter": "1m",
        }
        # Passed right after registering: a new TTL check starts critical.
        assert consul_double.check_status(f"service:{a.instance_id}") == "passing"


async def test_weight_zero_and_tags_beyond_one_meta_value_round_trip(
    make_registry: RegistryFactory, service_name: str
) -> None:
    reg = make_registry()
    tags = {f"label{n:02d}": "x" * 40 for n in range(30)}  # ~1.5 KB of JSON: 3 Meta values
    a = inst(service_name, "a", weight=0, tags=tags, version="2.0.0")
    await reg.register(a)
    assert await reg.resolve(service_name) == [a]


async def test_http_mode_without_health_port_is_rejected(
    make_registry: RegistryFactory, service_name: str
) -> None:
    reg = make_registry(check="http")
    with pytest.raises(InvalidArgument, match="health port"):
        await reg.register(inst(service_name))
    assert await reg.resolve(service_name) == []


async def test_ttl_heartbeat_keeps_the_instance_passing_beyond_the_ttl(
    make_registry: RegistryFactory, consul_double: ConsulDouble | None, service_name: str
) -> None:
    reg = make_registry(ttl=1.0)
    a = inst(service_name)
    await reg.register(a)
    deadline = time.monotonic() + 3.5  # three and a half TTLs
    while time.monotonic() < deadline:
        assert await reg.resolve(service_name) == [a]
        await asyncio.sleep(0.1)
    if consul_double is not None:
        check_id = f"service:{a.instance_id}"
        changes = [s for _, c, s in consul_double.status_history if c == check_id]
        assert changes == ["passing"]  # never went critical in between
        passes = consul_double.requests_to(f"/v1/agent/check/pass/{check_id}", "PUT")
        assert len(passes) >= 9  # every ttl/3


async def test_killed_process_goes_critical_and_leaves_the_passing_results(
    consul_addr: str, consul_double: ConsulDouble | None, service_name: str
) -> None:
    proc = await spawn_registrant(consul_addr, service_name, ttl="1s")
    try:
        reg = ConsulRegistry(consul_addr)
        try:
            assert ids(await reg.resolve(service_name)) == [f"{service_name}-doomed"]
            await kill(proc)

            async def gone() -> bool:
                return await reg.resolve(service_name) == []

            # Within a few TTLs of the kill, not after the reaper's minute.
            await wait_until(gone, "the killed instance to leave ?passing results", limit=5.0)
        finally:
            await reg.close()
        # Still in the catalog (DeregisterCriticalServiceAfter is 1m), but critical.
        status, entries, _ = await agent(consul_addr, "GET", f"/v1/health/service/{service_name}")
        assert status == 200 and len(entries) == 1
        checks = {c["CheckID"]: c for c in entries[0]["Checks"]}
        check = checks[f"service:{service_name}-doomed"]
        assert check["Status"] == "critical"
        assert "TTL expired" in check["Output"]
        if consul_double is not None:
            assert consul_double.check_status(f"service:{service_name}-doomed") == "critical"
    finally:
        await kill(proc)
        await agent(consul_addr, "PUT", f"/v1/agent/service/deregister/{service_name}-doomed")


async def test_agent_reaps_a_dead_instance_after_deregister_critical_after(
    double: ConsulDouble, service_name: str
) -> None:
    # Consul's floor is 1 minute, reaped every 30 s; the double is told to be quicker.
    double.deregister_min = 0.5
    double.check_reap_interval = 0.1
    proc = await spawn_registrant(double.address, service_name, ttl="500ms", dereg="500ms")
    try:
        doomed = f"{service_name}-doomed"
        assert double.services[doomed].name == service_name
        assert double.checks[f"service:{doomed}"].deregister_after == 0.5
        await kill(proc)
        await wait_until(lambda: doomed not in double.services, "the agent to reap the instance")
        assert f"service:{doomed}" not in double.checks
    finally:
        await kill(proc)


# -- watches -------------------------------------------------------------------------------


async def test_watch_follows_adds_and_removes_through_blocking_queries(
    make_registry: RegistryFactory, consul_double: ConsulDouble | None, service_name: str
) -> None:
    watcher = make_registry(wait="5s")
    owner = make_registry()
    a, b = inst(service_name, "a", 9000), inst(service_name, "b", 9001)
    watch = watcher.watch(service_name)
    pending: asyncio.Future[Any] | None = None
    path = f"/v1/health/service/{service_name}"
    released: list[Any] = []  # the blocked query each change released (double only)

    def blocked() -> list[Any]:
        assert consul_double is not None
        return [
            r for r in consul_double.requests_to(path) if "index" in r.query and r.finished is None
        ]

    try:
        assert await anext(watch) == []
        snapshots: list[list[Instance]] = []
        for change, expected in (
            (owner.register(a), [a]),
            (owner.register(b), [a, b]),
            (owner.deregister(a), [b]),
        ):
            pending = asyncio.ensure_future(anext(watch))
            if consul_double is not None:
                # the watch is now blocked on the current index
                await wait_until(lambda: len(blocked()) == 1, "the watch to block")
                waiting = blocked()[0]
            else:
                await asyncio.sleep(0.3)
            changed_at = time.monotonic()
            await change
            # Well before the 5 s wait ends: the blocked query returned on the change.
            snapshot = await asyncio.wait_for(pending, 2.0)
            assert snapshot == expected
            snapshots.append(snapshot)
            if consul_double is not None:
                assert waiting.finished is not None and waiting.finished >= changed_at
                released.append(waiting)
        assert all(x != y for x, y in itertools.pairwise(snapshots))
    finally:
        await end_watch(watch, pending)
    # Each of the three changes released a query blocked on the index before it.
    for r in released:
        assert r.index is not None and r.index > int(r.query["index"])
        assert r.query["wait"] == "5s"


async def test_watch_does_not_repeat_a_snapshot_when_other_services_change(
    make_registry: RegistryFactory, consul_double: ConsulDouble | None, service_name: str
) -> None:
    watcher = make_registry(wait="5s")
    owner = make_registry()
    a = inst(service_name, "a")
    await owner.register(a)
    watch = watcher.watch(service_name)
    pending: asyncio.Future[Any] | None = None
    try:
        assert await anext(watch) == [a]
        before = len(consul_double.requests) if consul_double is not None else 0
        other = f"{service_name}-other"
        pending = asyncio.ensure_future(anext(watch))
        for n in range(3):
            await owner.register(inst(other, str(n)))
            await asyncio.sleep(0.1)
        done, _ = await asyncio.wait({pending}, timeout=1.0)
        assert not done, "the watch yielded although its service did not change"
        if consul_double is not None:
            # The global index moved, so blocked queries did return (and were deduped).
            woke = [
                r
                for r in consul_double.requests[before:]
                if r.path == f"/v1/health/service/{service_name}" and r.finished is not None
            ]
            assert len(woke) >= 2
        await owner.deregister(a)
        assert await asyncio.wait_for(pending, 5) == []
    finally:
        await end_watch(watch, pending)


async def test_index_going_backwards_restarts_the_blocking_query(
    double: ConsulDouble, make_registry: RegistryFactory, service_name: str
) -> None:
    watcher = make_registry(wait="1s")
    owner = make_registry()
    a, b = inst(service_name, "a", 9000), inst(service_name, "b", 9001)
    await owner.register(a)
    path = f"/v1/health/service/{service_name}"
    watch = watcher.watch(service_name)
    pending: asyncio.Future[Any] | None = None
    try:
        assert await anext(watch) == [a]
        pending = asyncio.ensure_future(anext(watch))
        await asyncio.sleep(0.2)
        high = double.index
        double.set_index(2)  # e.g. a snapshot restore: lower than the client's index

        def reset_seen() -> bool:
            queries = [r for r in double.requests_to(path) if r.finished is not None]
            for prev, nxt in itertools.pairwise(queries):
                if prev.index == 2 and int(prev.query.get("index", 0)) == high:
                    return "index" not in nxt.query  # documented rule: reset to 0
            return False

        await wait_until(reset_seen, "a query without index after the index went backwards")
        await owner.register(b)
        assert await asyncio.wait_for(pending, 5) == [a, b]
    finally:
        await end_watch(watch, pending)


async def test_non_positive_index_is_treated_as_one_without_a_hot_loop(
    double: ConsulDouble, make_registry: RegistryFactory, service_name: str
) -> None:
    watcher = make_registry(wait="1s")
    path = f"/v1/health/service/{service_name}"
    watch = watcher.watch(service_name)
    pending: asyncio.Future[Any] | None = None
    try:
        assert await anext(watch) == []
        pending = asyncio.ensure_future(anext(watch))
        await asyncio.sleep(0.2)
        double.set_index(0)  # the Consul bug the docs warn about
        await wait_until(
            lambda: any(r.query.get("index") == "1" for r in double.requests_to(path)),
            "a query with index=1 after the agent answered index 0",
        )
        count = len(double.requests_to(path))
        await asyncio.sleep(1.0)
        assert len(double.requests_to(path)) - count <= 3, "queries are not rate limited"
    finally:
        await end_watch(watch, pending)


async def test_unreachable_agent_fails_the_watch_and_the_resolver_keeps_its_snapshot(
    double: ConsulDouble, make_registry: RegistryFactory, service_name: str
) -> None:
    reg = make_registry(wait="5s", request_timeout=1.0)
    a, b = inst(service_name, "a", 9000), inst(service_name, "b", 9001)
    await reg.register(a)

    watch = reg.watch(service_name)
    resolver = RegistryResolver(reg, service_name, initial_backoff=0.05, max_backoff=0.2)
    blocked: asyncio.Future[Any] | None = None
    try:
        assert await anext(watch) == [a]
        blocked = asyncio.ensure_future(anext(watch))
        await resolver.start()
        await asyncio.sleep(0.2)  # both are blocked on a query now
        assert [e.instance_id for e in resolver.endpoints()] == [a.instance_id]
        await double.stop()
        with pytest.raises(Unavailable, match="cannot reach the Consul agent"):
            await asyncio.wait_for(blocked, 5)
        await wait_until(lambda: resolver.stale, "the resolver to notice the outage")
        assert [e.instance_id for e in resolver.endpoints()] == [a.instance_id]
        assert not reg.status.connected and reg.status.last_error
        with pytest.raises(Unavailable):
            await reg.resolve(service_name)

        await double.start()
        await wait_until(lambda: not resolver.stale, "the resolver to recover")
        await reg.register(b)
        await wait_until(
            lambda: [e.instance_id for e in resolver.endpoints()] == ids([a, b]),
            "the recovered resolver to follow changes",
        )
        assert reg.status.connected
    finally:
        await resolver.close()
        await end_watch(watch, blocked)


async def test_agent_restart_makes_the_instance_register_itself_again(
    double: ConsulDouble, make_registry: RegistryFactory, service_name: str
) -> None:
    reg = make_registry(ttl=0.6)
    a = inst(service_name, "a", health_port=9100, version="1.0.0", tags={"zone": "a"})
    await reg.register(a)
    with capture_logs() as logs:
        await double.restart()
        assert double.services == {}
        await wait_until(
            lambda: a.instance_id in double.services, "the heartbeat to register again"
        )
        await wait_until(
            lambda: double.check_status(f"service:{a.instance_id}") == "passing",
            "the re-registered check to pass",
        )
    assert await reg.resolve(service_name) == [a]
    assert any(e["event"] == "consul agent lost the service; registered it again" for e in logs)


async def test_agent_restart_in_http_mode_registers_again(
    double: ConsulDouble, make_registry: RegistryFactory, service_name: str
) -> None:
    reg = make_registry(check="http", check_interval=1.0)
    a = inst(service_name, "a", health_port=free_port())
    await reg.register(a)
    await double.restart()
    await wait_until(
        lambda: a.instance_id in double.services, "the presence check to register again"
    )
    assert double.checks[f"service:{a.instance_id}"].kind == "http"
    assert double.requests_to(f"/v1/agent/service/{a.instance_id}", "GET")


# -- HTTP checks ---------------------------------------------------------------------------


class HealthEndpoint:
    """A tiny /health/ready endpoint whose answer the test controls."""

    def __init__(self) -> None:
        self.ready = True
        self.hits = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _ready(self, request: web.Request) -> web.Response:
        self.hits += 1
        return web.Response(status=200 if self.ready else 503, text="ready" if self.ready else "no")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/health/ready", self._ready)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def test_http_check_mode_points_the_agent_at_the_health_endpoint(
    make_registry: RegistryFactory, consul_double: ConsulDouble | None, service_name: str
) -> None:
    health = HealthEndpoint()
    await health.start()
    try:
        reg = make_registry(check="http", check_interval="1s", check_timeout="2s")
        a = inst(service_name, "a", health_port=health.port)

        async def listed() -> bool:
            return await reg.resolve(service_name) == [a]

        async def unlisted() -> bool:
            return await reg.resolve(service_name) == []

        await reg.register(a)
        if consul_double is not None:
            check = consul_double.checks[f"service:{a.instance_id}"]
            assert check.kind == "http"
            assert check.http == f"http://127.0.0.1:{health.port}/health/ready"
            assert (check.interval, check.timeout, check.deregister_after) == (1.0, 2.0, 60.0)
            body = consul_double.requests_to("/v1/agent/service/register")[-1].body
            assert "TTL" not in body["Check"]
            assert not consul_double.requests_to("/v1/agent/check/pass/")
        await wait_until(listed, "the agent's HTTP check to pass")
        assert health.hits >= 1
        health.ready = False
        await wait_until(unlisted, "a 503 from /health/ready to make the check critical")
        health.ready = True
        await wait_until(listed, "the check to pass again")
    finally:
        await health.stop()


# -- tokens --------------------------------------------------------------------------------


async def test_token_travels_only_in_the_header_and_is_never_shown(
    consul_addr: str,
    consul_double: ConsulDouble | None,
    make_registry: RegistryFactory,
    service_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A real agent with ACLs needs its real token; one without ACLs ignores any token.
    token = (os.environ.get(ENV_TOKEN) if REAL_AGENT else None) or "7f3a9c-not-a-real-secret"
    monkeypatch.delenv(ENV_TOKEN, raising=False)
    a = inst(service_name)
    with capture_logs() as logs:
        reg = make_registry(f"consul://{consul_addr}?token={token}&ttl=1s")
        await reg.register(a)
        assert await reg.resolve(service_name) == [a]
        dead = ConsulRegistry.from_url(f"consul://127.0.0.1:{free_port()}?token={token}")
        with pytest.raises(Unavailable) as unreachable:
            await dead.resolve(service_name)
        with pytest.raises(Unavailable) as unregistered:
            await dead.register(a)
        await dead.close()
        with pytest.raises(ConfigError) as bad_url:
            ConsulRegistry.from_url(f"consul://{consul_addr}?token={token}&bogus=1")
        await asyncio.sleep(0.5)  # a heartbeat or two
    shown = [
        repr(reg),
        str(reg),
        reg.url,
        repr(vars(reg)),
        json.dumps(reg.status.to_dict()),
        json.dumps(dead.status.to_dict()),
        str(unreachable.value),
        repr(unreachable.value.__cause__),
        str(unregistered.value),
        str(bad_url.value),
        json.dumps(logs, default=str),
    ]
    for text in shown:
        assert token not in text
    assert "<redacted>" in str(bad_url.value)
    if consul_double is not None:
        mine = [r for r in consul_double.requests if r.path.endswith(a.instance_id)]
        mine += consul_double.requests_to(f"/v1/health/service/{service_name}")
        assert mine and all(r.token == token for r in mine)
        assert all("token" not in r.query for r in consul_double.requests)

    # The token can also come from $CONSUL_HTTP_TOKEN, as for Consul's own tools.
    monkeypatch.setenv(ENV_TOKEN, token)
    from_env = make_registry()
    assert await from_env.resolve(service_name) == [a]
    if consul_double is not None:
        assert consul_double.requests[-1].token == token


async def test_acl_token_is_required_when_the_agent_enforces_acls(
    double: ConsulDouble,
    make_registry: RegistryFactory,
    service_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(ENV_TOKEN, raising=False)
    double.acl_token = "right-token"
    a = inst(service_name)
    anonymous = make_registry()
    with pytest.raises(Unavailable, match=r"denied .*\(ACL\): Permission denied"):
        await anonymous.register(a)
    wrong = make_registry(token="wrong-token")
    with pytest.raises(Unavailable, match="ACL not found"):
        await wrong.register(a)
    right = make_registry(token="right-token")
    await right.register(a)
    assert await right.resolve(service_name) == [a]
    # Reads without a token are filtered, not refused: nothing is visible.
    assert await anonymous.resolve(service_name) == []


# -- deregistration and close --------------------------------------------------------------


async def test_deregister_removes_the_instance_and_stops_its_heartbeat(
    make_registry: RegistryFactory, consul_double: ConsulDouble | None, service_name: str
) -> None:
    reg = make_registry(ttl=0.6)
    a, b = inst(service_name, "a", 9000), inst(service_name, "b", 9001)
    await reg.register(a)
    await reg.register(b)
    await reg.deregister(a)
    assert await reg.resolve(service_name) == [b]
    await reg.deregister(a)  # absent: no error
    if consul_double is not None:
        passes = len(consul_double.requests_to(f"/v1/agent/check/pass/service:{a.instance_id}"))
        await asyncio.sleep(0.5)
        assert len(consul_double.requests_to(f"/v1/agent/check/pass/service:{a.instance_id}")) == (
            passes
        )
        assert a.instance_id not in consul_double.services


async def test_close_withdraws_own_registrations_and_ends_watches(
    consul_addr: str, make_registry: RegistryFactory, service_name: str
) -> None:
    reg = make_registry(wait="30s")
    other = make_registry()
    a, b = inst(service_name, "a", 9000), inst(service_name, "b", 9001)
    await reg.register(a)
    await reg.register(b)
    watch = reg.watch(service_name)
    assert await anext(watch) == [a, b]
    pending = asyncio.ensure_future(anext(watch))
    await asyncio.sleep(0.2)  # blocked on a 30 s query
    await reg.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(pending, 3.0)  # ends at once, not after the 30 s query
    await reg.close()  # idempotent
    status, entries, _ = await agent(consul_addr, "GET", f"/v1/health/service/{service_name}")
    assert (status, entries) == (200, [])
    assert await other.resolve(service_name) == []
    with pytest.raises(Unavailable, match="closed"):
        await reg.register(a)
    with pytest.raises(Unavailable, match="closed"):
        await reg.resolve(service_name)


# -- mapping, options ----------------------------------------------------------------------


async def test_foreign_entries_get_defaults_and_malformed_ones_are_skipped_once(
    consul_addr: str, make_registry: RegistryFactory, service_name: str
) -> None:
    foreign = {
        "ID": f"{service_name}-foreign",
        "Name": service_name,
        "Port": 7000,
        "Tags": ["version=2.0", "zone=b"],
        "Check": {"TTL": "30s", "Status": "passing"},
    }
    malformed = {
        "ID": f"{service_name}-malformed",
        "Name": service_name,
        "Address": "127.0.0.1",
        "Port": 7001,
        "Meta": {"weight": "heavy"},
        "Check": {"TTL": "30s", "Status": "passing"},
    }
    try:
        for body in (foreign, malformed):
            status, text, _ = await agent(consul_addr, "PUT", "/v1/agent/service/register", body)
            assert status == 200, text
        reg = make_registry()
        with capture_logs() as logs:
            found = await reg.resolve(service_name)
            assert found == await reg.resolve(service_name)
        _, entries, _ = await agent(consul_addr, "GET", f"/v1/health/service/{service_name}")
        node_address = entries[0]["Node"]["Address"]
        assert found == [
            Instance(
                service_name,
                f"{service_name}-foreign",
                node_address,  # no Service.Address: the node's
                7000,
                version="2.0",
                tags={"zone": "b"},
                weight=100,
                start_time=0.0,
            )
        ]
        warnings = [e for e in logs if e["event"] == "consul: skipping malformed service entry"]
        assert len(warnings) == 1 and warnings[0]["id"] == f"{service_name}-malformed"
    finally:
        for body in (foreign, malformed):
            await agent(consul_addr, "PUT", f"/v1/agent/service/deregister/{body['ID']}")


async def test_unknown_datacenter_is_unavailable(
    make_registry: RegistryFactory, service_name: str
) -> None:
    reg = make_registry(datacenter=f"nowhere-{secrets.token_hex(3)}")
    assert "?dc=nowhere-" in reg.url
    with pytest.raises(Unavailable, match="No path to datacenter"):
        await reg.resolve(service_name)
    assert not reg.status.connected


async def test_from_url_reads_options_and_rejects_bad_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(ENV_TOKEN, raising=False)
    monkeypatch.delenv("CONSUL_HTTP_ADDR", raising=False)
    reg = ConsulRegistry.from_url(
        "consul://agent.example:8600?token=t0k&check=http&ttl=2s"
        "&deregister_critical_after=90s&wait=1m&dc=eu1&check_interval=5s",
        check_timeout=3,
    )
    assert (reg.host, reg.port, reg.check, reg.ttl) == ("agent.example", 8600, "http", 2.0)
    assert (reg.deregister_critical_after, reg.wait, reg.datacenter) == (90.0, 60.0, "eu1")
    assert (reg.check_interval, reg.check_timeout) == (5.0, 3.0)
    assert reg.url == "consul://agent.example:8600?dc=eu1" and "t0k" not in repr(reg)
    default = ConsulRegistry.from_url("consul://")
    assert (default.host, default.port, default.check, default.ttl) == (
        "127.0.0.1",
        8500,
        "ttl",
        10.0,
    )
    assert (default.deregister_critical_after, default.wait) == (60.0, 30.0)
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "http://10.0.0.7:8501")
    assert ConsulRegistry.from_url("consul://").port == 8501
    assert ConsulRegistry.from_url("consul://h", ttl="1m30s").ttl == 90.0
    for url, message in (
        ("etcd://h:2379", "consul:// registry URL"),
        ("consul://h?check=tcp", "'ttl' or 'http'"),
        ("consul://h?ttl=soon", "duration like"),
        ("consul://h?ttl=0", "positive"),
        ("consul://h?wait=11m", "at most 10m"),
        ("consul://h/path", "no path"),
        ("consul://h?token=s3cret&colour=blue", "'colour'"),
    ):
        with pytest.raises(ConfigError, match=message) as err:
            ConsulRegistry.from_url(url)
        assert "s3cret" not in str(err.value)


# -- contract: the agent's own behaviour (holds the double to a real agent) ------------------


async def test_contract_ttl_check_lifecycle(consul_addr: str, service_name: str) -> None:
    sid = f"{service_name}-raw"
    check_id = f"service:{sid}"
    body = {"ID": sid, "Name": service_name, "Port": 7000, "Check": {"TTL": "1s"}}
    try:
        status, text, _ = await agent(consul_addr, "PUT", "/v1/agent/service/register", body)
        assert status == 200, text

        async def passing() -> list[Any]:
            _, entries, _ = await agent(
                consul_addr, "GET", f"/v1/health/service/{service_name}", passing="true"
            )
            return list(entries)

        async def check_status() -> str:
            _, entries, _ = await agent(consul_addr, "GET", f"/v1/health/service/{service_name}")
            return {c["CheckID"]: c["Status"] for c in entries[0]["Checks"]}[check_id]

        # A new TTL check is critical until its first update.
        assert await check_status() == "critical" and await passing() == []
        status, _, _ = await agent(consul_addr, "PUT", f"/v1/agent/check/pass/{check_id}")
        assert status == 200
        assert await check_status() == "passing"
        assert [e["Service"]["ID"] for e in await passing()] == [sid]

        async def expired() -> bool:
            return await check_status() == "critical"

        await wait_until(expired, "the TTL to expire", limit=5)
        status, text, _ = await agent(consul_addr, "PUT", "/v1/agent/check/pass/service:nope")
        assert status == 404 and "Unknown check ID" in str(text)
        status, text, _ = await agent(consul_addr, "PUT", "/v1/agent/service/deregister/nope")
        assert status == 404 and "Unknown service ID" in str(text)
        status, text, _ = await agent(
            consul_addr,
            "PUT",
            "/v1/agent/service/register",
            {"Name": service_name, "Check": {"Notes": "neither TTL nor HTTP"}},
        )
        assert status == 400 and "Must provide TTL" in str(text)
        status, text, _ = await agent(
            consul_addr,
            "PUT",
            "/v1/agent/service/register",
            {"Name": service_name, "Weights": {"Passing": 0, "Warning": 1}},
        )
        assert status == 400 and "Passing must be greater than 0" in str(text)
    finally:
        await agent(consul_addr, "PUT", f"/v1/agent/service/deregister/{sid}")


async def test_contract_blocking_query_holds_until_a_change_or_the_wait(
    consul_addr: str, service_name: str
) -> None:
    path = f"/v1/health/service/{service_name}"
    status, _, headers = await agent(consul_addr, "GET", path, passing="true")
    index = int(headers["X-Consul-Index"])
    assert status == 200 and index > 0

    started = time.monotonic()
    status, _, headers = await agent(consul_addr, "GET", path, index=str(index), wait="1s")
    held = time.monotonic() - started
    assert status == 200 and 0.9 <= held < 1.0 * 17 / 16 + 0.5
    assert int(headers["X-Consul-Index"]) == index  # timed out: the same index

    sid = f"{service_name}-blk"
    query = asyncio.ensure_future(agent(consul_addr, "GET", path, index=str(index), wait="10s"))
    await asyncio.sleep(0.3)
    assert not query.done()
    body = {"ID": sid, "Name": service_name, "Port": 7000, "Check": {"TTL": "10s"}}
    try:
        await agent(consul_addr, "PUT", "/v1/agent/service/register", body)
        # Released by the change, well before its own wait ends.
        status, entries, headers = await asyncio.wait_for(query, 2.0)
        assert int(headers["X-Consul-Index"]) > index
        assert [e["Service"]["ID"] for e in entries] == [sid]
    finally:
        await agent(consul_addr, "PUT", f"/v1/agent/service/deregister/{sid}")


# -- end to end ----------------------------------------------------------------------------


async def test_service_and_client_end_to_end_over_consul(
    make_registry: RegistryFactory, service_name: str
) -> None:
    registry = make_registry()
    svc = Service(
        service_name,
        echo_thrift.Echo,
        version="3.1.4",
        registry=registry,
        metrics_registry=CollectorRegistry(),
        tags={"zone": "z1"},
    )
    svc.implement(EchoImpl)
    await svc.start(port=0, health_port=0)
    try:
        (found,) = await registry.resolve(service_name)
        assert found == svc.instance
        assert (found.port, found.health_port) == (svc.port, svc.health_port)
        async with Client(echo_thrift.Echo, service_name, registry=registry) as client:
            assert await client.echo("over consul") == "over consul"
            assert await client.reverse("abc") == "cba"
    finally:
        await svc.stop(drain_timeout=1.0)
    assert await registry.resolve(service_name) == []
