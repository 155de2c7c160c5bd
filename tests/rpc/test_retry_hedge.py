"""The smart client's retry budget, hedged requests and fallbacks, against real servers.

Every integration test starts meshkit RpcServers on loopback (one per "instance",
each answering with its own name) and builds an RpcClient with an explicit chain
(``middlewares=[...]``; the transport is added by the client).
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import structlog
from echo_support import EchoImpl, echo_thrift
from prometheus_client import CollectorRegistry
from waiting import wait_until

from meshkit import DeadlineExceeded, Internal, InvalidArgument, Unavailable
from meshkit.errors import StatusCode
from meshkit.rpc.balancer import RoundRobin
from meshkit.rpc.client import RpcClient
from meshkit.rpc.context import CallContext
from meshkit.rpc.deadline import ClientDeadline
from meshkit.rpc.endpoint import Endpoint, StaticResolver
from meshkit.rpc.fallback import Fallback
from meshkit.rpc.hedge import Hedge, HedgePolicy, LatencyWindow
from meshkit.rpc.metrics import MetricsMiddleware, RpcMetrics
from meshkit.rpc.pick import Pick
from meshkit.rpc.pipeline import Middleware, Next
from meshkit.rpc.retry import Retry, RetryBudget, RetryPolicy
from meshkit.rpc.server import RpcServer

SLOW = 0.2  # seconds the slow instance takes to answer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Instance(EchoImpl):
    """One echo instance: answers ``<name>:<message>``, maybe slowly, maybe failing."""

    def __init__(self, name: str, *, delay: float = 0.0, fail: bool = False) -> None:
        super().__init__()
        self.name = name
        self.delay = delay
        self.fail = fail
        self.echo_calls = 0
        self.echo_cancelled = 0
        self.echo_finished = 0
        self.reverse_calls = 0

    async def _work(self) -> None:
        if self.delay:
            try:
                await asyncio.sleep(self.delay)
            except asyncio.CancelledError:
                self.echo_cancelled += 1
                raise
        if self.fail:
            raise Unavailable(f"{self.name} is failing")

    async def echo(self, message: str) -> str:
        self.echo_calls += 1
        await self._work()
        self.echo_finished += 1
        return f"{self.name}:{message}"

    async def reverse(self, message: str) -> str:  # type: ignore[override]
        self.reverse_calls += 1
        await self._work()
        if not message:
            raise echo_thrift.EchoError(reason=f"empty message at {self.name}")
        return message[::-1]


class Pinned:
    """A balancer that always takes the first eligible endpoint (deterministic tests)."""

    def pick(self, endpoints: Sequence[Endpoint], ctx: CallContext) -> Endpoint:
        return endpoints[0]


@dataclass
class Attempts:
    """A pick-stage observer: every attempt with its endpoint, hedge flag and outcome."""

    seen: list[tuple[str, bool, str]] = field(default_factory=list)

    def on_start(self, endpoint: Endpoint, ctx: CallContext) -> None:
        return None

    def on_finish(
        self, endpoint: Endpoint, ctx: CallContext, latency: float, error: BaseException | None
    ) -> None:
        outcome = "ok" if error is None else type(error).__name__
        self.seen.append((endpoint.address, bool(ctx.extras.get("hedge")), outcome))

    def to(self, address: str, *, hedge: bool | None = None) -> list[str]:
        return [o for a, h, o in self.seen if a == address and (hedge is None or h == hedge)]


@dataclass
class Capture:
    """An outer middleware keeping each call's extras and latency."""

    name = "capture"
    calls: list[tuple[dict[str, Any], float]] = field(default_factory=list)

    async def __call__(self, ctx: CallContext, call_next: Next) -> Any:
        start = time.perf_counter()
        try:
            return await call_next(ctx)
        finally:
            self.calls.append((dict(ctx.extras), time.perf_counter() - start))

    def extras(self, key: str) -> list[Any]:
        return [extras.get(key) for extras, _ in self.calls]


Start = Callable[[Instance], Awaitable[str]]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    """Start an RpcServer for an Instance on loopback; returns its address."""
    servers: list[RpcServer] = []
    registry = CollectorRegistry()

    async def run(impl: Instance) -> str:
        server = RpcServer(echo_thrift.Echo, impl, name="echo", metrics_registry=registry)
        await server.start("127.0.0.1", 0)
        servers.append(server)
        return f"127.0.0.1:{server.port}"

    yield run
    for server in servers:
        await server.close()


@pytest.fixture
async def clients() -> AsyncIterator[Callable[..., RpcClient]]:
    """``make(addresses, build_chain)``: an RpcClient whose chain is ``build_chain(resolver)``."""
    made: list[RpcClient] = []

    def make(
        addresses: Sequence[str], chain: Callable[[StaticResolver], list[Middleware]]
    ) -> RpcClient:
        resolver = StaticResolver(list(addresses))
        client = RpcClient(echo_thrift.Echo, "echo", resolver=resolver, middlewares=chain(resolver))
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()


def sample(registry: CollectorRegistry, name: str, method: str, **labels: str) -> float:
    value = registry.get_sample_value(name, {"service": "echo", "method": method, **labels})
    return value or 0.0


async def settle() -> None:
    """Let cancelled attempts run their cleanup (a couple of loop iterations)."""
    for _ in range(3):
        await asyncio.sleep(0)


def pending_replies(client: RpcClient) -> int:
    return sum(len(c.pending) for conns in client.pool._conns.values() for c in conns)


# ---------------------------------------------------------------- retry budget: arithmetic


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_budget_ratio_and_floor() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.1, min_per_second=2, ttl=10, clock=clock)
    # The floor: min_per_second * ttl retries with no calls at all.
    assert budget.balance == 20
    assert all(budget.try_withdraw() for _ in range(20))
    assert not budget.try_withdraw()
    assert (budget.withdrawn, budget.exhausted) == (20, 1)
    # The ratio: 100 calls buy 10 retries (exactly: integer arithmetic, no float drift).
    for _ in range(100):
        budget.deposit()
    assert budget.balance == 10
    assert all(budget.try_withdraw() for _ in range(10))
    assert not budget.try_withdraw()
    assert budget.exhausted == 2

    half = RetryBudget(ratio=0.5, min_per_second=0, ttl=10, clock=clock)
    assert not half.try_withdraw()
    for _ in range(3):
        half.deposit()  # 1.5 retries
    assert half.try_withdraw()
    assert not half.try_withdraw()
    half.deposit()  # 0.5 + 0.5
    assert half.try_withdraw()

    never = RetryBudget(ratio=0.0, min_per_second=0, ttl=10, clock=clock)
    for _ in range(1000):
        never.deposit()
    assert not never.try_withdraw()


def test_budget_window_expires_deposits_and_withdrawals() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.5, min_per_second=0, ttl=10, buckets=10, clock=clock)
    for _ in range(10):
        budget.deposit()
    assert all(budget.try_withdraw() for _ in range(5))
    assert budget.balance == 0
    clock.now += 5
    budget.deposit()
    budget.deposit()
    assert budget.balance == 1
    # The slice of t=0 (5 retries' worth of deposits and 5 withdrawals) expires after ttl.
    clock.now += 5.5
    assert budget.balance == 1
    clock.now += 5
    assert budget.balance == 0  # everything expired
    clock.now += 1000  # a long idle stretch clears the ring in one step
    budget.deposit()
    budget.deposit()
    assert budget.balance == 1

    floor = RetryBudget(ratio=0.0, min_per_second=1, ttl=10, clock=clock)
    assert all(floor.try_withdraw() for _ in range(10))
    assert not floor.try_withdraw()
    clock.now += 5
    assert not floor.try_withdraw()
    clock.now += 5.5
    assert floor.balance == 10  # the withdrawals expired: the floor is whole again


def test_budget_bound_under_sustained_load() -> None:
    """1000 calls/s for 60 s, each wanting a retry: retries stay at ratio x calls + floor."""
    clock = FakeClock()
    ratio, floor, ttl = 0.1, 5.0, 10.0
    budget = RetryBudget(ratio=ratio, min_per_second=floor, ttl=ttl, clock=clock)
    granted_at: list[float] = []
    rng = random.Random(7)
    seconds, rate = 60, 1000
    for i in range(seconds * rate):
        clock.now = 100.0 + i / rate + rng.random() / rate
        budget.deposit()
        if budget.try_withdraw():
            granted_at.append(clock.now)
    calls = seconds * rate
    assert len(granted_at) <= ratio * calls + floor * (seconds + ttl)
    assert len(granted_at) >= ratio * calls  # and the budget is actually usable
    # In every ttl window: at most ratio x the calls of that window and the one before
    # (one slice of slack), plus the floor.
    for start in range(100, 100 + seconds - int(ttl)):
        in_window = sum(1 for t in granted_at if start <= t < start + ttl)
        assert in_window <= ratio * rate * (ttl + ttl / 10) + floor * ttl


def test_budget_and_policy_arguments_are_checked() -> None:
    with pytest.raises(InvalidArgument):
        RetryBudget(ratio=-0.1)
    with pytest.raises(InvalidArgument):
        RetryBudget(ttl=0)
    with pytest.raises(InvalidArgument):
        RetryBudget(min_per_second=-1)
    policy = RetryPolicy()
    assert policy.budget is not None
    assert RetryPolicy().budget is not policy.budget  # one budget per policy
    assert policy.with_idempotent(["echo"]).budget is policy.budget
    assert RetryPolicy.disabled().budget is None


# ---------------------------------------------------------------- retries on real servers


async def test_budget_caps_retries_when_every_instance_fails(
    start: Start, clients: Callable[..., RpcClient], metrics_registry: CollectorRegistry
) -> None:
    bad = [Instance("a", fail=True), Instance("b", fail=True)]
    addresses = [await start(i) for i in bad]
    budget = RetryBudget(ratio=0.1, min_per_second=1, ttl=10)
    policy = RetryPolicy(
        max_attempts=3, idempotent_methods=frozenset({"echo"}), backoff_base=0.0001, budget=budget
    )
    client = clients(
        addresses,
        lambda r: [
            ClientDeadline(5),
            Retry(policy, metrics_registry=metrics_registry),
            Pick(r, RoundRobin()),
        ],
    )

    async def worker() -> None:
        for _ in range(15):
            with pytest.raises(Unavailable, match="is failing"):
                await client.echo("x")

    await asyncio.gather(*(worker() for _ in range(20)))
    calls = 300
    attempts = sum(i.echo_calls for i in bad)
    retries = attempts - calls
    # Unbudgeted, every call would have been tried 3 times: 600 retries.
    assert retries == budget.withdrawn
    assert retries <= 0.1 * calls + 1 * 10
    assert retries >= 0.1 * calls  # the budget was spent, not left idle
    assert budget.exhausted > 0
    assert sample(
        metrics_registry, "meshkit_rpc_client_retries_total", "echo", outcome="retried"
    ) == float(retries)
    assert sample(
        metrics_registry, "meshkit_rpc_client_retries_total", "echo", outcome="budget_exhausted"
    ) == float(budget.exhausted)


async def test_retries_land_on_another_instance(
    start: Start, clients: Callable[..., RpcClient]
) -> None:
    bad, good = Instance("bad", fail=True), Instance("good")
    addresses = [await start(bad), await start(good)]
    attempts = Attempts()
    policy = RetryPolicy(idempotent_methods=frozenset({"echo"}), backoff_base=0.0001)
    client = clients(
        addresses,
        lambda r: [ClientDeadline(5), Retry(policy), Pick(r, Pinned(), observers=[attempts])],
    )
    for i in range(5):
        assert await client.echo(str(i)) == f"good:{i}"
    assert bad.echo_calls == 5 and good.echo_calls == 5
    assert attempts.to(addresses[0]) == ["Unavailable"] * 5
    assert attempts.to(addresses[1]) == ["ok"] * 5


async def test_non_idempotent_methods_are_not_retried_once_sent(
    start: Start, clients: Callable[..., RpcClient]
) -> None:
    bad, good = Instance("bad", fail=True), Instance("good")
    addresses = [await start(bad), await start(good)]
    policy = RetryPolicy(idempotent_methods=frozenset({"echo"}), backoff_base=0.0001)
    client = clients(addresses, lambda r: [ClientDeadline(5), Retry(policy), Pick(r, Pinned())])
    with pytest.raises(Unavailable, match="bad is failing"):
        await client.reverse("abc")
    assert (bad.reverse_calls, good.reverse_calls) == (1, 0)
    # A caller may vouch for one call: then it is retried like an idempotent method.
    assert await client.call("reverse", "abc", idempotent=True) == "cba"
    assert (bad.reverse_calls, good.reverse_calls) == (2, 1)


async def test_unsent_calls_are_retried_for_every_method(
    start: Start, clients: Callable[..., RpcClient]
) -> None:
    good = Instance("good")
    addresses = [f"127.0.0.1:{free_port()}", await start(good)]
    policy = RetryPolicy(backoff_base=0.0001)  # nothing idempotent
    client = clients(addresses, lambda r: [ClientDeadline(5), Retry(policy), Pick(r, Pinned())])
    assert await client.reverse("abc") == "cba"
    assert good.reverse_calls == 1


async def test_backoff_never_outlives_the_deadline(
    start: Start, clients: Callable[..., RpcClient]
) -> None:
    bad = [Instance("a", fail=True), Instance("b", fail=True)]
    addresses = [await start(i) for i in bad]
    # Backoffs of up to 5 s against a 300 ms budget.
    policy = RetryPolicy(
        max_attempts=10,
        idempotent_methods=frozenset({"echo"}),
        backoff_base=0.2,
        backoff_max=5.0,
        budget=None,
    )
    client = clients(addresses, lambda r: [ClientDeadline(5), Retry(policy), Pick(r, Pinned())])
    timeout = 0.3
    for _ in range(5):
        # Usually the original error, raised as soon as the next backoff would cross
        # the deadline; when a backoff just fits, the attempt after it may run out of
        # time instead. Never a sleep through the deadline (wait_for would time out).
        with pytest.raises((Unavailable, DeadlineExceeded)):
            await asyncio.wait_for(client.call("echo", "x", timeout=timeout), timeout + 0.1)
    # The first backoff (at most 200 ms) always fits: every call was retried at least once.
    assert sum(i.echo_calls for i in bad) >= 10


# ---------------------------------------------------------------- hedging


def test_hedging_only_idempotent_methods() -> None:
    with pytest.raises(InvalidArgument, match=r"only idempotent methods may be hedged.*reverse"):
        Hedge(HedgePolicy(methods={"echo", "reverse"}), idempotent_methods={"echo"})
    Hedge(HedgePolicy(methods={"echo"}), idempotent_methods={"echo", "reverse"})
    Hedge(HedgePolicy(), idempotent_methods=())  # hedges nothing
    with pytest.raises(InvalidArgument):
        HedgePolicy(quantile=1.0)
    with pytest.raises(InvalidArgument):
        HedgePolicy(min_delay=0.5, max_delay=0.1)


def test_hedge_delay_follows_the_latency_quantile() -> None:
    window = LatencyWindow(4)
    assert window.quantile(0.5) is None
    for v in (0.4, 0.1, 0.3, 0.2, 0.05):  # 0.4 falls out of the ring
        window.add(v)
    assert window.count == 4
    assert window.quantile(0.5) == 0.1
    assert window.quantile(0.95) == 0.3

    policy = HedgePolicy(
        methods={"echo"}, quantile=0.9, min_delay=0.002, max_delay=0.5, min_samples=10, window=100
    )
    hedge = Hedge(policy, idempotent_methods={"echo"})
    assert hedge.delay("echo") == 0.5  # max_delay until enough samples
    for i in range(1, 11):
        hedge.observe("echo", i / 100)  # 10 ms .. 100 ms
    assert hedge.delay("echo") == pytest.approx(0.09)
    for _ in range(100):
        hedge.observe("echo", 0.0001)
    assert hedge.delay("echo") == 0.002  # clamped to min_delay
    for _ in range(100):
        hedge.observe("echo", 3.0)
    assert hedge.delay("echo") == 0.5  # clamped to max_delay


def hedge_chain(
    hedge: Hedge, attempts: Attempts, capture: Capture, balancer: Any = None
) -> Callable[[StaticResolver], list[Middleware]]:
    return lambda r: [
        ClientDeadline(5),
        capture,
        hedge,
        Pick(r, balancer or Pinned(), observers=[attempts]),
    ]


async def test_hedge_goes_to_another_instance_and_the_loser_is_cancelled(
    start: Start, clients: Callable[..., RpcClient], metrics_registry: CollectorRegistry
) -> None:
    slow, fast = Instance("slow", delay=SLOW), Instance("fast")
    addresses = [await start(slow), await start(fast)]
    hedge = Hedge(
        HedgePolicy(methods={"echo"}, min_delay=0.005, max_delay=0.02),
        idempotent_methods={"echo"},
        budget=RetryBudget(min_per_second=100),
        metrics_registry=metrics_registry,
    )
    attempts, capture = Attempts(), Capture()
    client = clients(addresses, hedge_chain(hedge, attempts, capture))
    for i in range(20):
        assert await client.echo(str(i)) == f"fast:{i}"
        await settle()
        # The loser's pending reply was forgotten by its connection at once.
        assert pending_replies(client) == 0
    assert capture.extras("hedged") == [True] * 20
    assert capture.extras("hedge_winner") == [1] * 20
    # Attempt 0 always went to the slow instance (pinned) and was cancelled; the
    # hedge went to the other instance (ctx.tried) and answered.
    assert attempts.to(addresses[0]) == ["CancelledError"] * 20
    assert attempts.to(addresses[0], hedge=True) == []
    assert attempts.to(addresses[1], hedge=True) == ["ok"] * 20
    assert slow.echo_calls == 20 and fast.echo_calls == 20
    for outcome in ("sent", "won"):
        assert sample(
            metrics_registry, "meshkit_rpc_client_hedges_total", "echo", outcome=outcome
        ) == (20.0)
    # Each loser's connection sent a cancel frame: the slow instance stopped its handler.
    await wait_until(lambda: slow.echo_cancelled == 20, "the slow instance to cancel 20 losers")
    assert slow.echo_finished == 0
    assert pending_replies(client) == 0
    assert await client.echo("after") == "fast:after"


async def test_hedge_loser_is_cancelled_on_the_server(
    start: Start, clients: Callable[..., RpcClient]
) -> None:
    slow, fast = Instance("slow", delay=SLOW), Instance("fast")
    addresses = [await start(slow), await start(fast)]
    hedge = Hedge(HedgePolicy(methods={"echo"}, max_delay=0.02), idempotent_methods={"echo"})
    client = clients(addresses, hedge_chain(hedge, Attempts(), Capture()))
    assert await client.echo("x") == "fast:x"
    await asyncio.sleep(SLOW + 0.1)
    assert slow.echo_cancelled == 1


async def test_a_caller_that_stops_waiting_cancels_only_its_call_on_the_server(
    start: Start, clients: Callable[..., RpcClient]
) -> None:
    """A cancel frame stops that call's handler; calls beside it on the connection go on."""
    slow = Instance("slow", delay=SLOW)
    client = clients([await start(slow)], lambda r: [ClientDeadline(5), Pick(r, Pinned())])
    assert await client.reverse("ab") is not None  # the connection has seen the server's answer
    (conn,) = [c for conns in client.pool._conns.values() for c in conns]
    assert conn.peer_cancels
    survivor = asyncio.ensure_future(client.echo("stays"))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(client.echo("given up"), SLOW / 4)
    await wait_until(lambda: slow.echo_cancelled == 1, "the server to cancel the handler")
    assert await survivor == "slow:stays"
    assert slow.echo_finished == 1
    assert conn.usable and not conn.pending


async def test_hedging_cuts_the_tail_with_round_robin(
    start: Start, clients: Callable[..., RpcClient], metrics_registry: CollectorRegistry
) -> None:
    """Half the first attempts hit an instance that takes 200 ms; hedges rescue them."""
    slow, fast = Instance("slow", delay=SLOW), Instance("fast")
    addresses = [await start(slow), await start(fast)]
    hedge = Hedge(
        HedgePolicy(methods={"echo"}, max_delay=0.05),
        idempotent_methods={"echo"},
        metrics_registry=metrics_registry,
    )
    attempts, capture = Attempts(), Capture()
    client = clients(addresses, hedge_chain(hedge, attempts, capture, RoundRobin()))

    async def worker(n: int) -> list[str]:
        return [await client.echo(f"{n}-{i}") for i in range(10)]

    answers = [a for batch in await asyncio.gather(*(worker(n) for n in range(10))) for a in batch]
    assert len(answers) == 100
    first_on_slow = len(attempts.to(addresses[0], hedge=False))
    sent = sample(metrics_registry, "meshkit_rpc_client_hedges_total", "echo", outcome="sent")
    assert first_on_slow > 20  # round robin sent a good share of first attempts there
    # Every call that started on the slow instance was rescued by a hedge to the fast
    # one (its attempt on the slow instance was cancelled) ...
    assert attempts.to(addresses[0], hedge=False) == ["CancelledError"] * first_on_slow
    assert sent == capture.extras("hedged").count(True)
    # ... and few others were hedged (a fast call is hedged only when the machine
    # stalls it past the delay).
    assert first_on_slow <= sent <= first_on_slow + 10
    assert sum(a.startswith("fast:") for a in answers) >= 95
    waited_full = sum(1 for _, latency in capture.calls if latency >= SLOW)
    assert waited_full <= 5


async def test_empty_budget_stops_hedging(
    start: Start, clients: Callable[..., RpcClient], metrics_registry: CollectorRegistry
) -> None:
    slow, fast = Instance("slow", delay=SLOW), Instance("fast")
    addresses = [await start(slow), await start(fast)]
    budget = RetryBudget(ratio=0.0, min_per_second=0.3, ttl=10)  # 3 hedges in all
    hedge = Hedge(
        HedgePolicy(methods={"echo"}, max_delay=0.02),
        idempotent_methods={"echo"},
        budget=budget,
        metrics_registry=metrics_registry,
    )
    attempts, capture = Attempts(), Capture()
    client = clients(addresses, hedge_chain(hedge, attempts, capture))
    answers = await asyncio.gather(*(client.echo(str(i)) for i in range(6)))
    assert sorted(a.split(":")[0] for a in answers) == ["fast"] * 3 + ["slow"] * 3
    assert sorted(capture.extras("hedged")) == [False] * 3 + [True] * 3
    assert budget.exhausted == 3
    assert (
        sample(metrics_registry, "meshkit_rpc_client_hedges_total", "echo", outcome="sent") == 3.0
    )
    assert (
        sample(
            metrics_registry, "meshkit_rpc_client_hedges_total", "echo", outcome="budget_exhausted"
        )
        == 3.0
    )


async def test_a_failed_attempt_waits_for_the_other(
    start: Start, clients: Callable[..., RpcClient]
) -> None:
    slow_ok, bad = Instance("slow", delay=0.1), Instance("bad", fail=True)
    addresses = [await start(slow_ok), await start(bad)]
    hedge = Hedge(HedgePolicy(methods={"echo"}, max_delay=0.02), idempotent_methods={"echo"})
    attempts, capture = Attempts(), Capture()
    client = clients(addresses, hedge_chain(hedge, attempts, capture))
    # The hedge fails fast on "bad"; the original on "slow" still answers.
    assert await client.echo("x") == "slow:x"
    assert capture.extras("hedged") == [True]
    assert capture.extras("hedge_winner") == [0]
    assert attempts.to(addresses[1], hedge=True) == ["Unavailable"]


async def test_attempt_failing_after_the_hedge_left_waits_for_the_hedge(
    start: Start, clients: Callable[..., RpcClient]
) -> None:
    late_bad, slowish = Instance("late-bad", delay=0.06, fail=True), Instance("ok", delay=0.1)
    addresses = [await start(late_bad), await start(slowish)]
    hedge = Hedge(HedgePolicy(methods={"echo"}, max_delay=0.02), idempotent_methods={"echo"})
    attempts, capture = Attempts(), Capture()
    client = clients(addresses, hedge_chain(hedge, attempts, capture))
    # Attempt 0 fails at 60 ms, while the hedge (sent at 20 ms) is still running.
    assert await client.echo("x") == "ok:x"
    assert capture.extras("hedged") == [True]
    assert capture.extras("hedge_winner") == [1]
    assert attempts.to(addresses[0]) == ["Unavailable"]


async def test_fast_failure_is_left_to_the_retry_stage(
    start: Start, clients: Callable[..., RpcClient]
) -> None:
    bad, fast = Instance("bad", fail=True), Instance("fast")
    addresses = [await start(bad), await start(fast)]
    attempts = Attempts()
    hedge = Hedge(HedgePolicy(methods={"echo"}, max_delay=0.5), idempotent_methods={"echo"})
    only_hedge = clients(addresses, hedge_chain(hedge, attempts, Capture()))
    # Raised at once, not after the 500 ms hedge delay (wait_for would time out first).
    with pytest.raises(Unavailable, match="bad is failing"):
        await asyncio.wait_for(only_hedge.echo("x"), 0.4)
    assert fast.echo_calls == 0

    policy = RetryPolicy(idempotent_methods=frozenset({"echo"}), backoff_base=0.0001)
    capture = Capture()
    with_retry = clients(
        addresses,
        lambda r: [ClientDeadline(5), capture, Retry(policy), hedge, Pick(r, Pinned())],
    )
    assert await with_retry.echo("y") == "fast:y"
    assert capture.extras("hedged") == [False]


async def test_hedge_and_retry_share_one_budget(
    start: Start, clients: Callable[..., RpcClient]
) -> None:
    slow, fast = Instance("slow", delay=SLOW), Instance("fast")
    addresses = [await start(slow), await start(fast)]
    budget = RetryBudget(ratio=0.5, min_per_second=0, ttl=10)
    policy = RetryPolicy(idempotent_methods=frozenset({"echo"}), budget=budget)
    hedge = Hedge(
        HedgePolicy(methods={"echo"}, max_delay=0.02), idempotent_methods={"echo"}, budget=budget
    )
    assert not hedge.deposits  # the retry stage deposits once per call
    capture = Capture()
    client = clients(
        addresses,
        lambda r: [ClientDeadline(5), capture, Retry(policy), hedge, Pick(r, Pinned())],
    )
    # Call 1 deposits half a token: no hedge. Call 2 makes it a whole one: hedged.
    assert await client.echo("1") == "slow:1"
    assert await client.echo("2") == "fast:2"
    assert capture.extras("hedged") == [False, True]
    assert budget.withdrawn == 1 and budget.exhausted == 1


async def test_an_idl_exception_is_an_answer(
    start: Start, clients: Callable[..., RpcClient], metrics_registry: CollectorRegistry
) -> None:
    slow, fast = Instance("slow", delay=SLOW), Instance("fast")
    addresses = [await start(slow), await start(fast)]
    hedge = Hedge(HedgePolicy(methods={"reverse"}, max_delay=0.02), idempotent_methods={"reverse"})
    capture = Capture()
    metrics = RpcMetrics.get("client", metrics_registry)
    client = clients(
        addresses,
        lambda r: [
            ClientDeadline(5),
            MetricsMiddleware(metrics),
            capture,
            hedge,
            Pick(r, Pinned()),
        ],
    )
    with pytest.raises(echo_thrift.EchoError, match="empty message at fast"):
        await client.reverse("")
    extras = capture.calls[0][0]
    assert extras["hedged"] is True and extras["hedge_winner"] == 1
    # What the transport noted on the winning copy reached the caller's context.
    assert extras["app_error"] == "EchoError"
    assert (
        sample(metrics_registry, "meshkit_rpc_client_requests_total", "reverse", code="APP_ERROR")
        == 1.0
    )


async def test_hedge_does_not_outlive_the_deadline(
    start: Start, clients: Callable[..., RpcClient]
) -> None:
    slow = [Instance("a", delay=SLOW), Instance("b", delay=SLOW)]
    addresses = [await start(i) for i in slow]
    hedge = Hedge(HedgePolicy(methods={"echo"}, max_delay=0.02), idempotent_methods={"echo"})
    capture = Capture()
    client = clients(addresses, hedge_chain(hedge, Attempts(), capture))
    # Ends at the call's deadline, well before the slow replies (wait_for would time out).
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(client.call("echo", "x", timeout=0.1), SLOW)
    assert capture.extras("hedged") == [True]
    await settle()
    assert pending_replies(client) == 0


async def test_more_than_one_hedge(
    start: Start, clients: Callable[..., RpcClient], metrics_registry: CollectorRegistry
) -> None:
    slow1, slow2, fast = Instance("s1", delay=SLOW), Instance("s2", delay=SLOW), Instance("f")
    addresses = [await start(slow1), await start(slow2), await start(fast)]
    hedge = Hedge(
        HedgePolicy(methods={"echo"}, max_delay=0.02, max_extra=2),
        idempotent_methods={"echo"},
        metrics_registry=metrics_registry,
    )
    attempts, capture = Attempts(), Capture()
    client = clients(addresses, hedge_chain(hedge, attempts, capture))
    assert await client.echo("x") == "f:x"
    await settle()
    assert capture.extras("hedge_winner") == [2]
    # Each hedge avoided every endpoint used before it; both slow attempts were cancelled.
    assert attempts.to(addresses[0]) == ["CancelledError"]
    assert attempts.to(addresses[1], hedge=True) == ["CancelledError"]
    assert attempts.to(addresses[2], hedge=True) == ["ok"]
    assert sample(metrics_registry, "meshkit_rpc_client_hedges_total", "echo", outcome="sent") == 2
    assert pending_replies(client) == 0


async def test_cancelling_a_hedged_call_cancels_every_attempt(
    start: Start, clients: Callable[..., RpcClient]
) -> None:
    slow = [Instance("a", delay=SLOW), Instance("b", delay=SLOW)]
    addresses = [await start(i) for i in slow]
    hedge = Hedge(HedgePolicy(methods={"echo"}, max_delay=0.02), idempotent_methods={"echo"})
    attempts = Attempts()
    client = clients(addresses, hedge_chain(hedge, attempts, Capture()))
    call = asyncio.ensure_future(client.echo("x"))
    await asyncio.sleep(0.08)  # attempt 0 and its hedge are both waiting
    assert slow[1].echo_calls == 1
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await settle()
    assert sorted(o for _, _, o in attempts.seen) == ["CancelledError", "CancelledError"]
    assert pending_replies(client) == 0
    assert await asyncio.wait_for(client.echo("y"), 1.0) == "a:y"  # the client still works


# ---------------------------------------------------------------- fallbacks


def fallback_chain(
    fallback: Fallback, registry: CollectorRegistry, capture: Capture
) -> Callable[[StaticResolver], list[Middleware]]:
    metrics = RpcMetrics.get("client", registry)
    return lambda r: [
        ClientDeadline(5),
        capture,
        fallback,
        MetricsMiddleware(metrics),
        Pick(r, RoundRobin()),
    ]


async def test_fallback_value_and_metrics_still_see_the_failure(
    clients: Callable[..., RpcClient], metrics_registry: CollectorRegistry
) -> None:
    capture = Capture()
    fallback = Fallback({"echo": "default"}, metrics_registry=metrics_registry)
    client = clients(
        [f"127.0.0.1:{free_port()}"], fallback_chain(fallback, metrics_registry, capture)
    )
    assert await client.echo("x") == "default"
    assert capture.extras("fallback") == [True]
    assert (
        sample(metrics_registry, "meshkit_rpc_client_requests_total", "echo", code="UNAVAILABLE")
        == 1.0
    )
    assert (
        sample(metrics_registry, "meshkit_rpc_client_fallbacks_total", "echo", code="UNAVAILABLE")
        == 1.0
    )
    # Methods without a fallback fail as usual.
    with pytest.raises(Unavailable):
        await client.reverse("x")


async def test_fallback_callable_and_awaitable(
    start: Start, clients: Callable[..., RpcClient], metrics_registry: CollectorRegistry
) -> None:
    seen: list[tuple[str, StatusCode]] = []

    def echo_fallback(ctx: CallContext, error: Any) -> str:
        seen.append((ctx.method, error.code))
        return f"fallback for {ctx.method}"

    async def slow_fallback(ctx: CallContext, error: Any) -> int:
        await asyncio.sleep(0)
        seen.append((ctx.method, error.code))
        return -1

    bad = Instance("bad", fail=True)
    capture = Capture()
    fallback = Fallback(
        {"echo": echo_fallback, "slow": slow_fallback}, metrics_registry=metrics_registry
    )
    client = clients([await start(bad)], fallback_chain(fallback, metrics_registry, capture))
    assert await client.echo("x") == "fallback for echo"
    assert await client.call("slow", 2000, timeout=0.1) == -1  # DEADLINE_EXCEEDED
    assert seen == [("echo", StatusCode.UNAVAILABLE), ("slow", StatusCode.DEADLINE_EXCEEDED)]
    assert capture.extras("fallback") == [True, True]


async def test_fallback_never_replaces_idl_exceptions_or_other_codes(
    start: Start, clients: Callable[..., RpcClient], metrics_registry: CollectorRegistry
) -> None:
    class Broken(Instance):
        async def echo(self, message: str) -> str:
            raise RuntimeError("a bug")

    capture = Capture()
    fallback = Fallback({"reverse": "nope", "echo": "nope"}, metrics_registry=metrics_registry)
    client = clients(
        [await start(Broken("broken"))], fallback_chain(fallback, metrics_registry, capture)
    )
    with pytest.raises(echo_thrift.EchoError):
        await client.reverse("")
    with pytest.raises(Internal):
        await client.echo("x")
    assert await client.reverse("ab") == "ba"
    assert capture.extras("fallback") == [None, None, None]


async def test_fallback_warnings_are_rate_limited(
    clients: Callable[..., RpcClient], metrics_registry: CollectorRegistry
) -> None:
    fallback = Fallback({"echo": ""}, log_interval=0.2, metrics_registry=metrics_registry)
    client = clients(
        [f"127.0.0.1:{free_port()}"], fallback_chain(fallback, metrics_registry, Capture())
    )
    with structlog.testing.capture_logs() as logs:
        for _ in range(5):
            assert await client.echo("x") == ""
        await asyncio.sleep(0.25)
        assert await client.echo("x") == ""
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 2
    assert warnings[0]["code"] == "UNAVAILABLE" and "could not connect" in warnings[0]["error"]
    assert [w["not_logged_since_last"] for w in warnings] == [0, 4]
