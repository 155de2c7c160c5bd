"""Circuit breakers and outlier ejection: unit tests with a fake clock, then real servers.

Integration tests start meshkit RpcServers on loopback (one per "instance") that count
the calls they receive, and build RpcClients with an explicit chain::

    [ClientDeadline(...), Retry(RetryPolicy(...)), Pick(resolver, RoundRobin(),
     selectors=[policy], observers=[policy])]

(the client appends the transport). Nothing asserts on speed; waits are generous.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import pytest
import structlog
from echo_support import echo_thrift
from prometheus_client import CollectorRegistry

from meshkit import InvalidArgument, Unavailable
from meshkit.errors import (
    Cancelled,
    CircuitOpen,
    DeadlineExceeded,
    Internal,
    ResourceExhausted,
    StatusCode,
)
from meshkit.rpc.balancer import RoundRobin
from meshkit.rpc.breaker import CircuitBreakers, Outcome, classify
from meshkit.rpc.client import RpcClient
from meshkit.rpc.context import CallContext
from meshkit.rpc.deadline import ClientDeadline
from meshkit.rpc.endpoint import Endpoint, StaticResolver
from meshkit.rpc.outlier import OutlierEjection
from meshkit.rpc.pick import EndpointObserver, EndpointSelector, Pick
from meshkit.rpc.retry import Retry, RetryPolicy
from meshkit.rpc.server import RpcServer

# ================================================================== helpers


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ep(port: int) -> Endpoint:
    return Endpoint("10.0.0.1", port, instance_id=f"i{port}")


def ctx(method: str = "echo") -> CallContext:
    return CallContext(service="echo", method=method)


Policy = Any  # CircuitBreakers | OutlierEjection


def attempt(
    policy: Policy,
    endpoint: Endpoint,
    error: BaseException | None = None,
    *,
    latency: float = 0.001,
    method: str = "echo",
) -> CallContext:
    """One whole attempt on ``endpoint`` as the pick stage reports it."""
    c = ctx(method)
    policy.on_start(endpoint, c)
    policy.on_finish(endpoint, c, latency, error)
    return c


def gauge(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


class Backend:
    """One echo instance that counts the calls it receives; may fail or be slow."""

    def __init__(self, *, failing: bool = False, delay: float = 0.0) -> None:
        self.failing = failing
        self.delay = delay
        self.calls = 0
        self.reverse_calls = 0

    async def echo(self, message: str) -> str:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.failing:
            raise Unavailable("this instance is down (test)")
        if message == "bad-arg":
            raise InvalidArgument("expected a good argument, found 'bad-arg' (test)")
        return message

    async def reverse(self, message: str) -> str:
        self.reverse_calls += 1
        if not message:
            raise echo_thrift.EchoError(reason="empty message")
        return message[::-1]

    async def slow(self, delay_ms: int) -> int:
        await asyncio.sleep(delay_ms / 1000)
        return delay_ms

    async def ping(self) -> None:
        return None


Start = Callable[[Backend], Awaitable[str]]


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
async def start(registry: CollectorRegistry) -> AsyncIterator[Start]:
    """Start an RpcServer for a Backend; returns its address."""
    servers: list[RpcServer] = []

    async def run(backend: Backend) -> str:
        server = RpcServer(echo_thrift.Echo, backend, name="echo", metrics_registry=registry)
        await server.start("127.0.0.1", 0)
        servers.append(server)
        return f"127.0.0.1:{server.port}"

    yield run
    for server in servers:
        await server.close()


MakeClient = Callable[..., RpcClient]


@pytest.fixture
async def client(registry: CollectorRegistry) -> AsyncIterator[MakeClient]:
    """Build RpcClients over static addresses with a policy as selector and observer."""
    made: list[RpcClient] = []

    def make(
        addresses: Sequence[str],
        policies: Sequence[Policy],
        *,
        retry: RetryPolicy | None = None,
        timeout: float = 5.0,
    ) -> RpcClient:
        resolver = StaticResolver(list(addresses))
        policy = retry if retry is not None else RetryPolicy(max_attempts=1, budget=None)
        c = RpcClient(
            echo_thrift.Echo,
            "echo",
            resolver=resolver,
            metrics_registry=registry,
            middlewares=[
                ClientDeadline(timeout),
                Retry(policy, metrics_registry=registry),
                Pick(resolver, RoundRobin(), selectors=list(policies), observers=list(policies)),
            ],
        )
        made.append(c)
        return c

    yield make
    for c in made:
        await c.close()


async def outcome(call: Awaitable[Any]) -> str:
    """``"ok"`` or the status code (or exception name) the call ended with."""
    try:
        await call
    except Exception as exc:
        code = getattr(exc, "code", None)
        return code.value if code is not None else type(exc).__name__
    return "ok"


async def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ================================================================== unit: classification


def test_policies_satisfy_both_protocols() -> None:
    for policy in (CircuitBreakers(metrics_registry=CollectorRegistry()), OutlierEjection()):
        assert isinstance(policy, EndpointSelector)
        assert isinstance(policy, EndpointObserver)


def test_classify() -> None:
    codes = CircuitBreakers(metrics_registry=CollectorRegistry()).failure_codes
    assert classify(None, codes) is Outcome.SUCCESS
    assert classify(Unavailable("x"), codes) is Outcome.FAILURE
    assert classify(DeadlineExceeded("x"), codes) is Outcome.FAILURE
    assert classify(Internal("x"), codes) is Outcome.FAILURE
    assert classify(ResourceExhausted("x"), codes) is Outcome.FAILURE
    assert classify(RuntimeError("bug"), codes) is Outcome.FAILURE  # counts as INTERNAL
    assert classify(InvalidArgument("x"), codes) is Outcome.SUCCESS
    assert classify(echo_thrift.EchoError(reason="r"), codes) is Outcome.SUCCESS
    assert classify(asyncio.CancelledError(), codes) is Outcome.IGNORED
    assert classify(Cancelled("x"), codes) is Outcome.IGNORED
    only = frozenset({StatusCode.UNAVAILABLE})
    assert classify(DeadlineExceeded("x"), only) is Outcome.SUCCESS
    assert classify(RuntimeError("bug"), only) is Outcome.SUCCESS


# ================================================================== unit: breakers


def make_breakers(clock: FakeClock, **options: Any) -> tuple[CircuitBreakers, CollectorRegistry]:
    registry = CollectorRegistry()
    options.setdefault("fail_max", 3)
    options.setdefault("reset_timeout", 10.0)
    return CircuitBreakers(metrics_registry=registry, clock=clock, **options), registry


def test_breaker_opens_after_fail_max_consecutive_failures() -> None:
    clock = FakeClock()
    b, registry = make_breakers(clock)
    a, z = ep(1), ep(2)
    pool = (a, z)
    attempt(b, a, Unavailable("x"))
    attempt(b, a, Unavailable("x"))
    attempt(b, a, None)  # a success resets the count: failures must be consecutive
    assert b.states() == {}  # a clean breaker is dropped
    assert b.select(pool, ctx()) is pool  # nothing to filter: the same object
    for _ in range(3):
        assert b.select(pool, ctx()) is pool
        attempt(b, a, Unavailable("x"))
    assert b.state(a) == "open"
    assert list(b.select(pool, ctx())) == [z]
    # the same input gives the same filtered object until something changes
    assert b.select(pool, ctx()) is b.select(pool, ctx())
    labels = {"service": "echo", "endpoint": a.address}
    assert gauge(registry, "meshkit_rpc_client_breaker_state", **labels) == 2
    assert (
        gauge(
            registry,
            "meshkit_rpc_client_breaker_transitions_total",
            service="echo",
            state="open",
        )
        == 1
    )


def test_breakers_are_idle_exactly_while_every_endpoint_is_clean() -> None:
    clock = FakeClock()
    b, _ = make_breakers(clock)
    a = ep(1)
    assert b.idle
    attempt(b, a, Unavailable("x"))  # a failure creates a breaker
    assert not b.idle
    attempt(b, a, None)  # a success leaves it clean: dropped
    assert b.idle and b.states() == {}


class Idler:
    """A selector and observer that logs its calls and is idle when told."""

    def __init__(self) -> None:
        self.idle = True
        self.calls: list[str] = []

    def select(self, endpoints: Sequence[Endpoint], ctx: CallContext) -> Sequence[Endpoint]:
        self.calls.append("select")
        return endpoints

    def on_start(self, endpoint: Endpoint, ctx: CallContext) -> None:
        self.calls.append("start")

    def on_finish(
        self, endpoint: Endpoint, ctx: CallContext, latency: float, error: BaseException | None
    ) -> None:
        self.calls.append("finish ok" if error is None else "finish error")


def test_the_pick_stage_skips_idle_policies_but_not_their_failures() -> None:
    idler = Idler()
    pick = Pick(StaticResolver(["127.0.0.1:1"]), RoundRobin(), selectors=[idler], observers=[idler])
    c = ctx()
    pick.exit(c, pick.enter(c), None)
    assert idler.calls == []
    pick.exit(c, pick.enter(c), Unavailable("down"))
    assert idler.calls == ["finish error"]  # failures are always reported
    idler.idle = False
    idler.calls.clear()
    pick.exit(c, pick.enter(c), None)
    assert idler.calls == ["select", "start", "finish ok"]


def test_half_open_admits_one_probe_at_a_time() -> None:
    clock = FakeClock()
    b, registry = make_breakers(clock, success_threshold=2)
    a, z = ep(1), ep(2)
    pool = (a, z)
    for _ in range(3):
        attempt(b, a, Unavailable("x"))
    clock.now += 9.9
    assert list(b.select(pool, ctx())) == [z]
    clock.now += 0.1
    assert list(b.select(pool, ctx())) == [a, z]  # timeout elapsed: a probe may go
    assert b.state(a) == "half-open"
    labels = {"service": "echo", "endpoint": a.address}
    assert gauge(registry, "meshkit_rpc_client_breaker_state", **labels) == 1
    probe = ctx()
    b.on_start(a, probe)
    # while the probe is in flight nobody else gets through to a
    for _ in range(5):
        assert list(b.select(pool, ctx())) == [z]
    b.on_finish(a, probe, 0.01, None)
    assert b.state(a) == "half-open"  # success_threshold=2: one more probe
    assert list(b.select(pool, ctx())) == [a, z]
    attempt(b, a, None)
    assert b.state(a) == "closed"
    assert b.states() == {}
    assert gauge(registry, "meshkit_rpc_client_breaker_state", **labels) == 0
    assert list(b.select(pool, ctx())) == [a, z]


def test_failed_probe_reopens_for_another_timeout() -> None:
    clock = FakeClock()
    b, _ = make_breakers(clock)
    a, z = ep(1), ep(2)
    for _ in range(3):
        attempt(b, a, Unavailable("x"))
    clock.now += 10
    b.select((a, z), ctx())
    attempt(b, a, Unavailable("still down"))
    assert b.state(a) == "open"
    clock.now += 9
    assert list(b.select((a, z), ctx())) == [z]
    clock.now += 1
    assert list(b.select((a, z), ctx())) == [a, z]


def test_outcomes_of_attempts_from_an_earlier_state_are_ignored() -> None:
    clock = FakeClock()
    b, _ = make_breakers(clock)
    a, z = ep(1), ep(2)
    attempt(b, a, Unavailable("x"))
    slow_failure = ctx()
    b.on_start(a, slow_failure)  # begun while closed, ends after the breaker opened
    slow_success = ctx()
    b.on_start(a, slow_success)
    attempt(b, a, Unavailable("x"))
    attempt(b, a, Unavailable("x"))
    assert b.state(a) == "open"
    clock.now += 10
    b.select((a, z), ctx())
    assert b.state(a) == "half-open"
    b.on_finish(a, slow_success, 10.0, None)  # must not close the half-open breaker
    assert b.state(a) == "half-open"
    b.on_finish(a, slow_failure, 10.0, Unavailable("late"))  # nor re-open it
    assert b.state(a) == "half-open"
    # a cancelled probe frees the slot without deciding anything
    probe = ctx()
    b.on_start(a, probe)
    assert list(b.select((a, z), ctx())) == [z]
    b.on_finish(a, probe, 0.5, asyncio.CancelledError())
    assert b.state(a) == "half-open"
    assert list(b.select((a, z), ctx())) == [a, z]


def test_all_open_raises_circuit_open_with_time_to_first_probe() -> None:
    clock = FakeClock()
    b, _ = make_breakers(clock)
    a, z = ep(1), ep(2)
    for _ in range(3):
        attempt(b, a, Unavailable("x"))
    clock.now += 4
    for _ in range(3):
        attempt(b, z, Unavailable("x"))
    clock.now += 1
    with pytest.raises(CircuitOpen) as info:
        b.select((a, z), ctx())
    message = str(info.value)
    assert "'echo'" in message and "found all 2 open" in message
    assert "first probe is allowed in 5.00 s" in message
    assert info.value.code is StatusCode.CIRCUIT_OPEN


def test_breakers_per_method() -> None:
    clock = FakeClock()
    b, registry = make_breakers(clock, per_method=True)
    a, z = ep(1), ep(2)
    for _ in range(3):
        attempt(b, a, Unavailable("x"), method="echo")
    assert list(b.select((a, z), ctx("echo"))) == [z]
    assert list(b.select((a, z), ctx("reverse"))) == [a, z]
    assert b.state(a, "echo") == "open" and b.state(a, "reverse") == "closed"
    assert b.states() == {f"{a.address} echo": "open"}
    for _ in range(2):
        attempt(b, a, Unavailable("x"), method="reverse")
    labels = {"service": "echo", "endpoint": a.address}
    assert gauge(registry, "meshkit_rpc_client_breaker_state", **labels) == 2  # the worst


def test_idle_breakers_are_forgotten() -> None:
    """An endpoint that left discovery while its breaker was open leaves no trace."""
    clock = FakeClock()
    b, registry = make_breakers(clock, reset_timeout=5.0)
    gone, z = ep(1), ep(2)
    for _ in range(3):
        attempt(b, gone, Unavailable("x"))
    attempt(b, z, Unavailable("x"))  # closed, one failure
    clock.now += 10
    assert list(b.select((z,), ctx())) == [z]  # gone is no longer among the candidates
    assert b.states() == {gone.address: "half-open", z.address: "closed"}
    labels = {"service": "echo", "endpoint": gone.address}
    assert gauge(registry, "meshkit_rpc_client_breaker_state", **labels) == 1
    clock.now += 60
    assert list(b.select((z,), ctx())) == [z]
    assert b.states() == {}
    assert gauge(registry, "meshkit_rpc_client_breaker_state", **labels) == 0
    clock.now += 301  # the series goes after SERIES_TTL, at the next change
    attempt(b, z, Unavailable("x"))
    assert gauge(registry, "meshkit_rpc_client_breaker_state", **labels) is None


def test_breaker_arguments_are_checked() -> None:
    with pytest.raises(InvalidArgument):
        CircuitBreakers(fail_max=0)
    with pytest.raises(InvalidArgument):
        CircuitBreakers(reset_timeout=0)
    with pytest.raises(InvalidArgument, match="found 'NOPE'"):
        CircuitBreakers(failure_codes=["NOPE"])
    assert CircuitBreakers(failure_codes=["UNAVAILABLE"]).failure_codes == {StatusCode.UNAVAILABLE}


# ================================================================== unit: outlier ejection


def make_outliers(clock: FakeClock, **options: Any) -> tuple[OutlierEjection, CollectorRegistry]:
    registry = CollectorRegistry()
    options.setdefault("consecutive_failures", 3)
    options.setdefault("latency_factor", None)
    return OutlierEjection(metrics_registry=registry, clock=clock, **options), registry


def test_ejection_time_grows_and_resets_after_a_healthy_period() -> None:
    clock = FakeClock()
    o, registry = make_outliers(clock, base_ejection=1.0, max_ejection=8.0, healthy_period=30.0)
    pool = (ep(1), ep(2), ep(3), ep(4))
    bad = pool[0]
    assert o.select(pool, ctx()) is pool
    durations = []
    for _ in range(6):
        for _ in range(3):
            attempt(o, bad, Unavailable("x"))
        assert bad not in o.select(pool, ctx())
        left = o.ejected()[bad.address]
        durations.append(left)
        clock.now += left - 0.001
        assert bad not in o.select(pool, ctx())
        clock.now += 0.001
        assert o.select(pool, ctx()) is pool  # returned
    assert durations == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    clock.now += 30.0  # healthy for a while: the count starts again
    for _ in range(3):
        attempt(o, bad, Unavailable("x"))
    assert o.ejected() == {bad.address: 1.0}
    assert gauge(registry, "meshkit_rpc_client_outlier_ejected", service="echo") == 1
    assert (
        gauge(
            registry,
            "meshkit_rpc_client_outlier_ejections_total",
            service="echo",
            reason="consecutive_failures",
        )
        == 7
    )


def test_successes_reset_the_failure_count() -> None:
    clock = FakeClock()
    o, _ = make_outliers(clock)
    pool = (ep(1), ep(2), ep(3), ep(4))
    o.select(pool, ctx())
    for _ in range(5):
        attempt(o, pool[0], Unavailable("x"))
        attempt(o, pool[0], Unavailable("x"))
        attempt(o, pool[0], echo_thrift.EchoError(reason="an answer"))
    assert o.ejected() == {}


def test_never_more_than_the_fraction_is_ejected() -> None:
    clock = FakeClock()
    o, registry = make_outliers(clock, base_ejection=10.0, max_ejected_fraction=0.5)
    pool = (ep(1), ep(2), ep(3), ep(4))
    o.select(pool, ctx())
    for endpoint in pool[:3]:
        for _ in range(5):
            attempt(o, endpoint, Unavailable("x"))
    assert set(o.ejected()) == {pool[0].address, pool[1].address}
    assert list(o.select(pool, ctx())) == [pool[2], pool[3]]
    assert gauge(registry, "meshkit_rpc_client_outlier_ejected", service="echo") == 2
    # a narrower list (an earlier selector): at most 1 of 3 may go, the least bad comes back
    clock.now += 1
    attempt(o, pool[2], Unavailable("x"))  # still not ejectable
    narrowed = (pool[0], pool[1], pool[2])
    kept = o.select(narrowed, ctx())
    assert len(kept) == 2 and pool[2] in kept
    # a single endpoint is never ejected (0.5 * 1 rounds down to 0)
    solo, _ = make_outliers(clock)
    solo.select((ep(9),), ctx())
    for _ in range(10):
        attempt(solo, ep(9), Unavailable("x"))
    assert solo.ejected() == {}


def test_select_readmits_the_least_bad_first() -> None:
    clock = FakeClock()
    o, _ = make_outliers(clock, base_ejection=10.0, max_ejection=100.0)
    pool = (ep(1), ep(2), ep(3), ep(4))
    o.select(pool, ctx())
    for _ in range(3):
        attempt(o, pool[0], Unavailable("x"))  # ejected once: 10 s
    clock.now += 10
    o.select(pool, ctx())  # back
    for _ in range(3):
        attempt(o, pool[0], Unavailable("x"))  # ejected a second time: 20 s
        attempt(o, pool[1], Unavailable("x"))  # first time: 10 s
    assert set(o.ejected()) == {pool[0].address, pool[1].address}
    narrowed = (pool[0], pool[1], pool[2])
    assert list(o.select(narrowed, ctx())) == [pool[1], pool[2]]


def feed_latencies(o: OutlierEjection, latencies: dict[Endpoint, float], n: int) -> None:
    for _ in range(n):
        for endpoint, latency in latencies.items():
            attempt(o, endpoint, None, latency=latency)


def test_latency_outlier_is_ejected() -> None:
    clock = FakeClock()
    o, registry = make_outliers(
        clock, consecutive_failures=None, latency_factor=3.0, min_samples=5, interval=1.0
    )
    pool = (ep(1), ep(2), ep(3), ep(4))
    o.select(pool, ctx())
    latencies = {pool[0]: 0.001, pool[1]: 0.0012, pool[2]: 0.0011, pool[3]: 0.100}
    feed_latencies(o, latencies, 5)
    assert o.ejected() == {}  # judged once per interval
    clock.now += 1.0
    attempt(o, pool[0], None, latency=0.001)  # the sweep is due
    assert list(o.ejected()) == [pool[3].address]
    assert pool[3] not in o.select(pool, ctx())
    assert (
        gauge(
            registry,
            "meshkit_rpc_client_outlier_ejections_total",
            service="echo",
            reason="latency",
        )
        == 1
    )
    assert o.stats()[pool[3].address]["times"] == 1


def test_latency_needs_peers_samples_and_a_floor() -> None:
    clock = FakeClock()
    # only 2 peers
    o, _ = make_outliers(clock, consecutive_failures=None, latency_factor=3.0, min_samples=5)
    three = (ep(1), ep(2), ep(3))
    o.select(three, ctx())
    feed_latencies(o, {three[0]: 0.001, three[1]: 0.001, three[2]: 0.5}, 20)
    clock.now += 2
    attempt(o, three[0], None)
    assert o.ejected() == {}
    # below the floor: a 4x outlier at 0.4 ms is noise
    o, _ = make_outliers(clock, consecutive_failures=None, latency_factor=3.0, min_samples=5)
    four = (ep(1), ep(2), ep(3), ep(4))
    o.select(four, ctx())
    feed_latencies(o, {four[0]: 1e-4, four[1]: 1e-4, four[2]: 1e-4, four[3]: 4e-4}, 20)
    clock.now += 2
    attempt(o, four[0], None, latency=1e-4)
    assert o.ejected() == {}
    # not enough samples yet
    o, _ = make_outliers(clock, consecutive_failures=None, latency_factor=3.0, min_samples=50)
    o.select(four, ctx())
    feed_latencies(o, {four[0]: 0.001, four[1]: 0.001, four[2]: 0.001, four[3]: 0.2}, 20)
    clock.now += 2
    attempt(o, four[0], None)
    assert o.ejected() == {}


def test_outlier_arguments_are_checked() -> None:
    with pytest.raises(InvalidArgument):
        OutlierEjection(consecutive_failures=0)
    with pytest.raises(InvalidArgument):
        OutlierEjection(latency_factor=0.5)
    with pytest.raises(InvalidArgument):
        OutlierEjection(base_ejection=10, max_ejection=1)
    with pytest.raises(InvalidArgument):
        OutlierEjection(max_ejected_fraction=1.5)


# ================================================================== real servers: breakers


async def test_breaker_trips_probes_and_closes(
    start: Start, client: MakeClient, registry: CollectorRegistry
) -> None:
    bad, good = Backend(failing=True), Backend()
    bad_addr, good_addr = await start(bad), await start(good)
    breakers = CircuitBreakers(fail_max=3, reset_timeout=0.5, metrics_registry=registry)
    c = client([bad_addr, good_addr], [breakers])
    state = {"service": "echo", "endpoint": bad_addr}

    results = [await outcome(c.echo("hi")) for _ in range(20)]
    assert results.count("UNAVAILABLE") == 3
    assert bad.calls == 3  # tripped: calls stopped reaching it
    assert good.calls == 17
    assert breakers.state(bad_addr) == "open"
    assert gauge(registry, "meshkit_rpc_client_breaker_state", **state) == 2

    # after reset_timeout exactly one probe goes through; it fails: open again
    await asyncio.sleep(0.6)
    results = [await outcome(c.echo("hi")) for _ in range(10)]
    assert results.count("UNAVAILABLE") == 1
    assert bad.calls == 4
    assert breakers.state(bad_addr) == "open"

    # the instance recovers (slowly): one probe in flight at a time, even under concurrency
    bad.failing = False
    bad.delay = 0.3
    await asyncio.sleep(0.6)
    results = await asyncio.gather(*(outcome(c.echo("hi")) for _ in range(20)))
    assert results == ["ok"] * 20
    assert bad.calls == 5  # the single probe
    assert breakers.state(bad_addr) == "closed"
    assert gauge(registry, "meshkit_rpc_client_breaker_state", **state) == 0

    # closed: round robin shares the calls again
    bad.delay = 0.0
    before = bad.calls
    results = [await outcome(c.echo("hi")) for _ in range(10)]
    assert results == ["ok"] * 10
    assert bad.calls - before == 5
    transitions = {
        s: gauge(registry, "meshkit_rpc_client_breaker_transitions_total", service="echo", state=s)
        for s in ("open", "half-open", "closed")
    }
    assert transitions == {"open": 2, "half-open": 2, "closed": 1}


async def test_all_open_raises_circuit_open(
    start: Start, client: MakeClient, registry: CollectorRegistry
) -> None:
    bad = Backend(failing=True)
    addr = await start(bad)
    breakers = CircuitBreakers(fail_max=2, reset_timeout=30.0, metrics_registry=registry)
    c = client([addr], [breakers])
    for _ in range(2):
        with pytest.raises(Unavailable):
            await c.echo("x")
    with pytest.raises(CircuitOpen) as info:
        await c.echo("x")
    message = str(info.value)
    assert "'echo'" in message and "first probe is allowed in" in message
    seconds = float(message.rsplit("allowed in ", 1)[1].split(" s")[0])
    assert 25.0 < seconds <= 30.0
    assert bad.calls == 2
    assert gauge(registry, "meshkit_rpc_client_breaker_state", service="echo", endpoint=addr) == 2


async def test_idl_exceptions_and_invalid_argument_do_not_trip(
    start: Start, client: MakeClient, registry: CollectorRegistry
) -> None:
    backend = Backend()
    addr = await start(backend)
    breakers = CircuitBreakers(fail_max=2, reset_timeout=30.0, metrics_registry=registry)
    c = client([addr], [breakers])
    for _ in range(10):
        with pytest.raises(echo_thrift.EchoError):
            await c.reverse("")
        with pytest.raises(InvalidArgument):
            await c.echo("bad-arg")
    assert backend.calls == 10 and backend.reverse_calls == 10
    assert breakers.states() == {}
    assert await c.echo("still fine") == "still fine"


async def test_dead_instance_trips_and_retries_go_elsewhere(
    start: Start, client: MakeClient, registry: CollectorRegistry
) -> None:
    """Connection refused is UNAVAILABLE; unsent attempts are retried on the other."""
    good = Backend()
    good_addr = await start(good)
    dead_addr = f"127.0.0.1:{free_port()}"
    breakers = CircuitBreakers(fail_max=2, reset_timeout=30.0, metrics_registry=registry)
    c = client([dead_addr, good_addr], [breakers], retry=RetryPolicy(max_attempts=3, budget=None))
    results = await asyncio.gather(*(outcome(c.echo("x")) for _ in range(30)))
    assert results == ["ok"] * 30
    assert breakers.state(dead_addr) == "open"
    assert good.calls == 30


async def test_per_method_breakers_on_real_servers(
    start: Start, client: MakeClient, registry: CollectorRegistry
) -> None:
    backend = Backend(failing=True)  # echo fails, reverse works
    addr = await start(backend)
    breakers = CircuitBreakers(
        fail_max=2, reset_timeout=30.0, per_method=True, metrics_registry=registry
    )
    c = client([addr], [breakers])
    for _ in range(2):
        with pytest.raises(Unavailable):
            await c.echo("x")
    with pytest.raises(CircuitOpen, match="'echo' for echo"):
        await c.echo("x")
    assert await c.reverse("abc") == "cba"
    assert backend.calls == 2


# ================================================================== real servers: ejection


async def test_consecutive_failures_eject_with_growing_time(
    start: Start, client: MakeClient, registry: CollectorRegistry
) -> None:
    backends = [Backend(failing=True), Backend(), Backend(), Backend()]
    addrs = [await start(b) for b in backends]
    bad, bad_addr = backends[0], addrs[0]
    outliers = OutlierEjection(
        consecutive_failures=3,
        latency_factor=None,
        base_ejection=1.0,
        max_ejection=10.0,
        metrics_registry=registry,
    )
    c = client(addrs, [outliers])
    with structlog.testing.capture_logs() as logs:
        for _ in range(12):
            await outcome(c.echo("x"))
        assert bad.calls == 3
        first = outliers.ejected()[bad_addr]
        assert 0.0 < first <= 1.0
        for _ in range(20):
            assert await c.echo("x") == "x"
        assert bad.calls == 3  # ejected: no calls reach it
        assert gauge(registry, "meshkit_rpc_client_outlier_ejected", service="echo") == 1

        await asyncio.sleep(1.1)  # back in the pool, still failing: ejected again, longer
        for _ in range(12):
            await outcome(c.echo("x"))
        assert bad.calls == 6
        second = outliers.ejected()[bad_addr]
        assert 1.0 < second <= 2.0
        assert outliers.stats()[bad_addr]["times"] == 2
        for _ in range(20):
            assert await c.echo("x") == "x"
        assert bad.calls == 6
    events = [e["event"] for e in logs if e.get("endpoint") == bad_addr]
    assert events == ["endpoint ejected", "endpoint returned", "endpoint ejected"]


async def test_slow_instance_is_ejected_as_a_latency_outlier(
    start: Start, client: MakeClient, registry: CollectorRegistry
) -> None:
    backends = [Backend(delay=0.1), Backend(), Backend(), Backend()]
    addrs = [await start(b) for b in backends]
    slow, slow_addr = backends[0], addrs[0]
    outliers = OutlierEjection(
        latency_factor=3.0,
        base_ejection=30.0,
        min_samples=5,
        interval=0.1,
        metrics_registry=registry,
    )
    c = client(addrs, [outliers])
    stop = asyncio.Event()

    async def worker() -> None:
        while not stop.is_set():
            assert await c.echo("x") == "x"

    workers = [asyncio.create_task(worker()) for _ in range(8)]
    try:
        await wait_for(lambda: slow_addr in outliers.ejected(), "the slow instance's ejection")
        await asyncio.sleep(0.3)  # let calls sent before the ejection finish
        slow_before = slow.calls
        fast_before = [b.calls for b in backends[1:]]
        await asyncio.sleep(1.0)
    finally:
        stop.set()
        await asyncio.gather(*workers)
    assert slow.calls - slow_before <= 1
    assert all(b.calls - n > 20 for b, n in zip(backends[1:], fast_before, strict=True))
    assert (
        gauge(
            registry,
            "meshkit_rpc_client_outlier_ejections_total",
            service="echo",
            reason="latency",
        )
        == 1
    )


async def test_max_ejected_fraction_on_real_servers(
    start: Start, client: MakeClient, registry: CollectorRegistry
) -> None:
    backends = [Backend(failing=True), Backend(failing=True), Backend(failing=True), Backend()]
    addrs = [await start(b) for b in backends]
    outliers = OutlierEjection(
        consecutive_failures=2,
        latency_factor=None,
        base_ejection=30.0,
        max_ejected_fraction=0.5,
        metrics_registry=registry,
    )
    c = client(addrs, [outliers])
    for _ in range(40):
        await outcome(c.echo("x"))
    assert len(outliers.ejected()) == 2
    assert gauge(registry, "meshkit_rpc_client_outlier_ejected", service="echo") == 2
    ejected = set(outliers.ejected())
    still_failing = [b for b, a in zip(backends[:3], addrs[:3], strict=True) if a not in ejected]
    assert len(still_failing) == 1
    before = still_failing[0].calls
    for _ in range(10):
        await outcome(c.echo("x"))
    assert still_failing[0].calls - before == 5  # in the pool of two: every other call


async def test_breakers_and_ejection_together(
    start: Start, client: MakeClient, registry: CollectorRegistry
) -> None:
    """Both policies in one pick stage: each keeps its own state."""
    backends = [Backend(failing=True), Backend(), Backend(), Backend()]
    addrs = [await start(b) for b in backends]
    outliers = OutlierEjection(
        consecutive_failures=5, latency_factor=None, base_ejection=30.0, metrics_registry=registry
    )
    breakers = CircuitBreakers(fail_max=2, reset_timeout=30.0, metrics_registry=registry)
    c = client(addrs, [outliers, breakers], retry=RetryPolicy(max_attempts=1, budget=None))
    for _ in range(40):
        await outcome(c.echo("x"))
    assert backends[0].calls == 2  # the breaker acted first
    assert breakers.state(addrs[0]) == "open"
    assert outliers.ejected() == {}


async def test_client_reports_open_breakers_and_ejections(
    start: Start, registry: CollectorRegistry
) -> None:
    """``RpcClient.policy_state()`` (shown in ``/info``) names what the default chain shuns."""
    backends = [Backend(failing=True), Backend()]
    addrs = [await start(b) for b in backends]
    breakers = CircuitBreakers(fail_max=2, reset_timeout=30.0, metrics_registry=registry)
    c = RpcClient(
        echo_thrift.Echo,
        "echo",
        resolver=StaticResolver(addrs),
        breakers=breakers,
        balancer=RoundRobin(),
        metrics_registry=registry,
    )
    try:
        assert c.policy_state() == {"breakers": {}, "ejected": {}}
        for _ in range(10):
            await outcome(c.echo("x"))
        state = c.policy_state()
        assert state["breakers"] == {addrs[0]: "open"}
        assert state["ejected"] == {}  # 2 failures: below the ejector's 5 in a row
        assert c.outliers is not None and c.breakers is breakers
    finally:
        await c.close()
    off = RpcClient(
        echo_thrift.Echo, "echo", resolver=StaticResolver(addrs), breakers=False, outliers=False
    )
    assert off.policy_state() == {"breakers": {}, "ejected": {}}
