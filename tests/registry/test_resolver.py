"""RegistryResolver: snapshots, changes, outages and recovery, on a real local registry."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs
from waiting import wait_until

from meshkit.errors import Unavailable
from meshkit.registry import Instance, LocalRegistry, RegistryResolver
from meshkit.rpc.endpoint import Endpoint, Resolver

DEADLINE = 10.0


class FlakyRegistry(LocalRegistry):
    """A local registry whose store can be made unreachable (a failure-mode double)."""

    down = False

    def _read_live(self, service: str) -> list[Instance]:
        if self.down:
            self.status.mark_error("registry is down (test)")
            raise Unavailable("registry is down (test)")
        return super()._read_live(service)


def inst(instance_id: str, port: int, **kw: object) -> Instance:
    return Instance("echo", instance_id, "127.0.0.1", port, **kw)  # type: ignore[arg-type]


def ids(endpoints: tuple[Endpoint, ...]) -> list[str]:
    return [e.instance_id for e in endpoints]


@pytest.fixture
async def reg(tmp_path: Path) -> AsyncIterator[FlakyRegistry]:
    registry = FlakyRegistry(tmp_path, ttl=1.0, poll_interval=0.02)
    yield registry
    await registry.close()


async def test_start_loads_snapshot_and_maps_endpoints(reg: FlakyRegistry) -> None:
    await reg.register(inst("a", 9000, version="1.2.0", weight=30, tags={"zone": "z1"}))
    await reg.register(inst("b", 9001))
    resolver = RegistryResolver(reg, "echo")
    assert isinstance(resolver, Resolver)
    assert resolver.endpoints() == ()
    await resolver.start()
    try:
        a, b = resolver.endpoints()
        assert (a.host, a.port, a.instance_id, a.weight) == ("127.0.0.1", 9000, "a", 30)
        assert a.tags == {"zone": "z1", "version": "1.2.0"}
        assert (b.address, b.weight, b.tags) == ("127.0.0.1:9001", 100, {})
        assert not resolver.stale and resolver.status.connected
        assert [i.instance_id for i in resolver.instances] == ["a", "b"]
        await resolver.start()  # idempotent
    finally:
        await resolver.close()


async def test_updates_arrive_and_on_change_fires(reg: FlakyRegistry) -> None:
    changes: list[list[str]] = []
    async with RegistryResolver(reg, "echo") as resolver:
        unsubscribe = resolver.on_change(lambda eps: changes.append(ids(eps)))
        assert resolver.endpoints() == ()
        await reg.register(inst("a", 9000))
        await wait_until(lambda: ids(resolver.endpoints()) == ["a"], "a to arrive")
        await reg.register(inst("b", 9001))
        await wait_until(lambda: ids(resolver.endpoints()) == ["a", "b"], "b to arrive")
        await reg.register(inst("a", 9000, version="2"))  # a record change, same address
        await wait_until(
            lambda: resolver.endpoints()[0].tags.get("version") == "2", "a's new version"
        )
        await reg.deregister(inst("b", 9001))
        await wait_until(lambda: ids(resolver.endpoints()) == ["a"], "b to go")
        assert changes == [["a"], ["a", "b"], ["a", "b"], ["a"]]
        assert all(isinstance(e, Endpoint) for e in resolver.endpoints())
        unsubscribe()
        await reg.register(inst("c", 9002))
        await wait_until(lambda: ids(resolver.endpoints()) == ["a", "c"], "c to arrive")
        assert len(changes) == 4


async def test_failing_callback_does_not_stop_updates(reg: FlakyRegistry) -> None:
    def broken(_: tuple[Endpoint, ...]) -> None:
        raise RuntimeError("callback bug")

    seen: list[list[str]] = []
    async with RegistryResolver(reg, "echo") as resolver:
        resolver.on_change(broken)
        resolver.on_change(lambda eps: seen.append(ids(eps)))
        with capture_logs() as logs:
            await reg.register(inst("a", 9000))
            await wait_until(lambda: seen == [["a"]], "the second callback")
        assert any(e["event"] == "resolver on_change callback failed" for e in logs)


async def test_outage_keeps_last_good_snapshot_then_recovers(reg: FlakyRegistry) -> None:
    await reg.register(inst("a", 9000))
    changes: list[list[str]] = []
    resolver = RegistryResolver(reg, "echo", initial_backoff=0.01, max_backoff=0.05)
    resolver.on_change(lambda eps: changes.append(ids(eps)))
    with capture_logs() as logs:
        await resolver.start()
        assert changes == [["a"]]

        reg.down = True
        await wait_until(lambda: resolver.stale, "the resolver to notice the outage")
        assert ids(resolver.endpoints()) == ["a"]  # last good snapshot
        assert resolver.status.last_error and "down" in resolver.status.last_error
        await reg.register(inst("b", 9001))  # happens during the outage
        await asyncio.sleep(0.5)  # many failed retries
        assert ids(resolver.endpoints()) == ["a"]
        assert resolver.stale

        reg.down = False
        await wait_until(lambda: not resolver.stale, "the resolver to recover")
        await wait_until(lambda: ids(resolver.endpoints()) == ["a", "b"], "the new snapshot")
        assert changes == [["a"], ["a", "b"]]
    warnings = [e for e in logs if e["event"] == "registry watch failed; using last known snapshot"]
    assert len(warnings) == 1, "one warning per outage, not per retry"
    assert warnings[0]["log_level"] == "warning" and warnings[0]["service"] == "echo"
    assert any(e["event"] == "registry reachable again; snapshot refreshed" for e in logs)

    # A second outage is a new outage: warned about again.
    with capture_logs() as logs:
        reg.down = True
        await wait_until(lambda: resolver.stale, "the second outage")
        reg.down = False
        await wait_until(lambda: not resolver.stale, "the second recovery")
    assert sum(e["event"].startswith("registry watch failed") for e in logs) == 1
    await resolver.close()


async def test_real_filesystem_outage(tmp_path: Path) -> None:
    root = tmp_path / "reg"
    registry = LocalRegistry(root, ttl=1.0, poll_interval=0.02)
    await registry.register(inst("a", 9000))
    resolver = RegistryResolver(registry, "echo", initial_backoff=0.01, max_backoff=0.05)
    await resolver.start()
    root.rename(tmp_path / "moved")
    root.write_text("the registry directory is now a file")
    await wait_until(lambda: resolver.stale, "the resolver to notice the broken store")
    assert ids(resolver.endpoints()) == ["a"]
    root.unlink()
    (tmp_path / "moved").rename(root)
    await registry.register(inst("b", 9001))
    await wait_until(lambda: ids(resolver.endpoints()) == ["a", "b"], "recovery")
    assert not resolver.stale
    await resolver.close()
    await registry.close()


async def test_start_fails_when_registry_unreachable(reg: FlakyRegistry) -> None:
    reg.down = True
    resolver = RegistryResolver(reg, "echo")
    with pytest.raises(Unavailable, match="down"):
        await resolver.start()
    assert resolver.endpoints() == () and not resolver.stale
    reg.down = False
    await reg.register(inst("a", 9000))
    await resolver.start()  # may be retried
    assert ids(resolver.endpoints()) == ["a"]
    await resolver.close()


async def test_registry_closed_leaves_last_snapshot_marked_stale(tmp_path: Path) -> None:
    registry = LocalRegistry(tmp_path, ttl=1.0, poll_interval=0.02)
    await registry.register(inst("a", 9000))
    resolver = RegistryResolver(registry, "echo")
    await resolver.start()
    await registry.close()
    await wait_until(lambda: resolver.stale, "the resolver to see the registry closed")
    assert ids(resolver.endpoints()) == ["a"]
    await resolver.close()


async def test_close_stops_following(reg: FlakyRegistry) -> None:
    resolver = RegistryResolver(reg, "echo")
    await resolver.start()
    await resolver.close()
    await reg.register(inst("a", 9000))
    await asyncio.sleep(0.2)
    assert resolver.endpoints() == ()
    with pytest.raises(Unavailable, match="closed"):
        await resolver.start()
    await resolver.close()  # idempotent
