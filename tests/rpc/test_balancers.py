"""Balancers and zone preference: unit tests on the objects, then real servers on loopback.

Distribution assertions use tolerances several standard deviations wide and seeded
random sources where the balancer takes one; nothing here asserts on speed.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from echo_support import EchoImpl, echo_thrift
from prometheus_client import CollectorRegistry

from meshkit import Client, InvalidArgument
from meshkit.errors import Cancelled, ResourceExhausted
from meshkit.rpc.balancer import (
    Balancer,
    ConsistentHash,
    PeakEwma,
    RoundRobin,
    WeightedRandom,
    ketama_hash,
)
from meshkit.rpc.connection import ConnectionUnavailable
from meshkit.rpc.context import CallContext
from meshkit.rpc.deadline import ClientDeadline
from meshkit.rpc.endpoint import Endpoint, StaticResolver
from meshkit.rpc.pick import EndpointObserver, EndpointSelector, Pick
from meshkit.rpc.pipeline import Next
from meshkit.rpc.retry import Retry, RetryPolicy
from meshkit.rpc.server import RpcServer
from meshkit.rpc.zone import ZonePreference


def ep(port: int, *, weight: int = 100, zone: str | None = None) -> Endpoint:
    tags = {"zone": zone} if zone is not None else {}
    return Endpoint("10.0.0.1", port, instance_id=f"i{port}", weight=weight, tags=tags)


def ctx(**headers: str) -> CallContext:
    return CallContext(service="echo", method="echo", headers=dict(headers))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def shares(picks: Sequence[Endpoint]) -> dict[Endpoint, float]:
    counts = Counter(picks)
    return {e: n / len(picks) for e, n in counts.items()}


# ================================================================== unit: round robin / weighted


def test_round_robin_cycles() -> None:
    endpoints = (ep(1), ep(2), ep(3))
    rr = RoundRobin()
    picks = [rr.pick(endpoints, ctx()) for _ in range(9)]
    assert Counter(picks) == dict.fromkeys(endpoints, 3)
    assert picks[:3] != picks[1:4]


def test_weighted_random_follows_weights() -> None:
    endpoints = (ep(1, weight=100), ep(2, weight=300), ep(3, weight=0), ep(4, weight=600))
    wr = WeightedRandom(rng=random.Random(1))
    got = shares([wr.pick(endpoints, ctx()) for _ in range(20000)])
    assert endpoints[2] not in got  # weight 0: never
    for endpoint, expected in ((endpoints[0], 0.1), (endpoints[1], 0.3), (endpoints[3], 0.6)):
        assert abs(got[endpoint] - expected) < 0.02, got


def test_weighted_random_negative_weights_and_all_zero() -> None:
    wr = WeightedRandom(rng=random.Random(2))
    mixed = (ep(1, weight=-5), ep(2, weight=10))
    assert {wr.pick(mixed, ctx()) for _ in range(500)} == {mixed[1]}
    zeros = (ep(1, weight=0), ep(2, weight=-1), ep(3, weight=0))
    got = shares([wr.pick(zeros, ctx()) for _ in range(6000)])
    assert set(got) == set(zeros)
    assert all(abs(share - 1 / 3) < 0.04 for share in got.values())


def test_weighted_random_table_is_cached_per_snapshot() -> None:
    wr = WeightedRandom(rng=random.Random(3))
    endpoints = (ep(1, weight=100), ep(2, weight=100))
    wr.pick(endpoints, ctx())
    table = wr._bounds
    wr.pick(endpoints, ctx())
    wr.pick(list(endpoints), ctx())  # another object, equal: the table is kept
    assert wr._bounds is table
    reweighted = (ep(1, weight=100), ep(2, weight=0))  # equality includes the weight
    assert {wr.pick(reweighted, ctx()) for _ in range(200)} == {reweighted[0]}
    assert wr._bounds is not table


def test_balancers_satisfy_the_protocols() -> None:
    balancers: list[Balancer] = [
        RoundRobin(),
        WeightedRandom(),
        PeakEwma(),
        ConsistentHash("user-id"),
    ]
    assert len(balancers) == 4
    assert isinstance(PeakEwma(), EndpointObserver)
    assert not isinstance(WeightedRandom(), EndpointObserver)
    assert isinstance(ZonePreference("a"), EndpointSelector)


# ================================================================== unit: peak EWMA


def test_peak_ewma_prefers_the_cheaper_of_two() -> None:
    clock = FakeClock()
    b = PeakEwma(rng=random.Random(4), clock=clock)
    slow, fast = ep(1), ep(2)
    for endpoint, latency in ((slow, 0.100), (fast, 0.001)):
        b.on_start(endpoint, ctx())
        b.on_finish(endpoint, ctx(), latency, None)
    # two endpoints: both are always the two choices, the cheaper always wins
    assert {b.pick((slow, fast), ctx()) for _ in range(200)} == {fast}
    # in flight counts: 150 calls on the fast one make it dearer than the idle slow one
    for _ in range(150):
        b.on_start(fast, ctx())
    assert b.load(fast) == 150.0
    assert b.pick((slow, fast), ctx()) == slow
    assert b.cost(fast) == pytest.approx(0.001 * 151)


def test_peak_ewma_picks_two_distinct_endpoints() -> None:
    b = PeakEwma(rng=random.Random(5), clock=FakeClock())
    endpoints = tuple(ep(p) for p in range(1, 6))
    worst = endpoints[2]
    b.on_start(worst, ctx())
    b.on_finish(worst, ctx(), 5.0, None)
    # the worst endpoint could only win if it were drawn twice
    picks = Counter(b.pick(endpoints, ctx()) for _ in range(2000))
    assert worst not in picks
    assert len(picks) == 4


def test_peak_ewma_peak_then_time_decay() -> None:
    clock = FakeClock()
    b = PeakEwma(decay=10.0, clock=clock)
    e = ep(1)
    b.on_start(e, ctx())
    b.on_finish(e, ctx(), 0.010, None)
    assert b.stats()["10.0.0.1:1"]["ewma"] == pytest.approx(0.010)
    b.on_start(e, ctx())
    b.on_finish(e, ctx(), 0.200, None)  # a peak is taken at once
    assert b.stats()["10.0.0.1:1"]["ewma"] == pytest.approx(0.200)
    clock.now += 10.0  # one time constant later, a 10 ms sample: w = 1/e
    b.on_start(e, ctx())
    b.on_finish(e, ctx(), 0.010, None)
    expected = 0.200 / math.e + 0.010 * (1 - 1 / math.e)
    assert b.stats()["10.0.0.1:1"]["ewma"] == pytest.approx(expected)
    clock.now += 20.0  # reading decays towards 0 (Finagle's observe(0) on read)
    assert b.cost(e) == pytest.approx(expected * math.exp(-2))


def test_peak_ewma_failures_penalised_cancellations_ignored() -> None:
    clock = FakeClock()
    b = PeakEwma(failure_penalty=2.0, rng=random.Random(6), clock=clock)
    dead, alive = ep(1), ep(2)
    for endpoint in (dead, alive):
        b.on_start(endpoint, ctx())
        b.on_finish(endpoint, ctx(), 0.001, None)
    b.on_start(dead, ctx())
    b.on_finish(dead, ctx(), 0.0001, ConnectionUnavailable("refused", sent=False))
    assert b.stats()["10.0.0.1:1"]["ewma"] == pytest.approx(2.0)
    assert {b.pick((dead, alive), ctx()) for _ in range(100)} == {alive}
    b.on_start(alive, ctx())
    b.on_finish(alive, ctx(), 0.0001, ResourceExhausted("shed"))  # shedding counts too
    assert b.stats()["10.0.0.1:2"]["ewma"] == pytest.approx(2.0)
    fresh = ep(3)
    b.on_start(fresh, ctx())
    b.on_finish(fresh, ctx(), 0.0001, asyncio.CancelledError())
    b.on_start(fresh, ctx())
    b.on_finish(fresh, ctx(), 0.0001, Cancelled("caller gave up"))
    assert b.stats()["10.0.0.1:3"] == {"ewma": 0.0, "in_flight": 0.0}
    # other errors (IDL exceptions, deadline) are real latencies
    b.on_start(fresh, ctx())
    b.on_finish(fresh, ctx(), 0.03, ValueError("idl error"))
    assert b.stats()["10.0.0.1:3"]["ewma"] == pytest.approx(0.03)


def test_peak_ewma_new_endpoint_gets_one_probe_at_a_time() -> None:
    b = PeakEwma(failure_penalty=1.0, clock=FakeClock())
    new, known = ep(1), ep(2)
    b.on_start(known, ctx())
    b.on_finish(known, ctx(), 0.005, None)
    assert b.cost(new) == 0.0  # no sample, nothing in flight: attractive at once
    b.on_start(new, ctx())
    assert b.cost(new) == pytest.approx(2.0)  # in flight, no sample: penalty + in-flight
    assert b.pick((new, known), ctx()) == known
    with_default = PeakEwma(default_latency=0.05, clock=FakeClock())
    assert with_default.cost(new) == pytest.approx(0.05)


def test_peak_ewma_drops_state_of_departed_endpoints_lazily() -> None:
    clock = FakeClock()
    b = PeakEwma(decay=10.0, rng=random.Random(7), clock=clock)
    a, c, gone, busy = ep(1), ep(2), ep(3), ep(4)
    full = (a, c, gone, busy)
    for _ in range(50):
        b.pick(full, ctx())
    b.on_start(busy, ctx())  # a call in flight keeps its state
    assert set(b.stats()) == {e.address for e in full}
    smaller = (a, c)
    clock.now += 1.0  # not a decay period since the last sweep: nothing dropped
    b.pick(smaller, ctx())
    assert set(b.stats()) == {e.address for e in full}
    clock.now += 20.0
    b.pick(smaller, ctx())  # a decay period later: idle endpoints not in the snapshot go
    assert set(b.stats()) == {a.address, c.address, busy.address}
    b.on_finish(busy, ctx(), 0.001, None)
    clock.now += 5.0
    b.pick(smaller, ctx())
    assert busy.address in b.stats()  # touched 5 s ago, and no sweep yet
    clock.now += 20.0
    b.pick(smaller, ctx())
    assert set(b.stats()) == {a.address, c.address}
    assert b.pick((a,), ctx()) == a  # one endpoint: no draw


def test_peak_ewma_rejects_bad_settings() -> None:
    with pytest.raises(InvalidArgument, match="decay"):
        PeakEwma(decay=0)
    with pytest.raises(InvalidArgument, match="penalty"):
        PeakEwma(failure_penalty=-1)
    with pytest.raises(InvalidArgument, match="default latency"):
        PeakEwma(default_latency=-0.1)


# ================================================================== unit: consistent hash


KEYS = [f"user-{i}" for i in range(10000)]


def owners(b: ConsistentHash, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
    return [b.owner(endpoints, k) for k in KEYS]


def test_consistent_hash_is_stable_and_order_independent() -> None:
    endpoints = [ep(p) for p in range(1, 11)]
    b = ConsistentHash("user-id")
    first = [b.pick(endpoints, ctx(**{"user-id": k})) for k in KEYS[:200]]
    again = [b.pick(endpoints, ctx(**{"user-id": k})) for k in KEYS[:200]]
    assert first == again
    shuffled = endpoints[::-1]
    other = ConsistentHash("user-id")  # another client (process) agrees
    assert [other.pick(shuffled, ctx(**{"user-id": k})) for k in KEYS[:200]] == first
    # keys spread over every endpoint, none with more than twice its share
    counts = Counter(owners(b, endpoints))
    assert set(counts) == set(endpoints)
    assert max(counts.values()) < 2 * len(KEYS) / 10
    # ketama's key hash: the first 4 bytes of md5, little-endian
    assert ketama_hash(b"") == 0xD98C1DD4  # md5("") = d41d8cd9…


def test_consistent_hash_moves_few_keys_when_instances_change() -> None:
    b = ConsistentHash("user-id")
    ten = [ep(p) for p in range(1, 11)]
    before = owners(b, ten)
    added = ep(11)
    after = owners(b, [*ten, added])
    moved = [i for i in range(len(KEYS)) if before[i] != after[i]]
    assert 0.05 < len(moved) / len(KEYS) < 0.14  # ≈ 1/11
    assert all(after[i] == added for i in moved)  # only to the newcomer
    removed = ten[3]
    fewer = owners(b, [e for e in ten if e != removed])
    for i in range(len(KEYS)):
        if before[i] != removed:
            assert fewer[i] == before[i]
        else:
            assert fewer[i] != removed


def test_consistent_hash_callable_key_and_fallback() -> None:
    endpoints = [ep(p) for p in range(1, 5)]
    by_arg = ConsistentHash(lambda c: c.args)
    by_header = ConsistentHash("user-id")
    call = CallContext(service="echo", method="echo", args=b"user-42")
    assert by_arg.pick(endpoints, call) == by_header.pick(endpoints, ctx(**{"user-id": "user-42"}))
    # no key (missing header, None, empty): random, so every endpoint shows up
    fallback = ConsistentHash("user-id", rng=random.Random(8))
    assert {fallback.pick(endpoints, ctx()) for _ in range(400)} == set(endpoints)
    assert {fallback.pick(endpoints, ctx(**{"user-id": ""})) for _ in range(400)} == set(endpoints)
    none_key = ConsistentHash(lambda c: None, rng=random.Random(9))
    assert {none_key.pick(endpoints, ctx()) for _ in range(400)} == set(endpoints)
    with pytest.raises(InvalidArgument, match="header name or a callable"):
        ConsistentHash(42)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="replicas"):
        ConsistentHash("k", replicas=0)


def test_consistent_hash_walks_past_tried_endpoints() -> None:
    endpoints = tuple(ep(p) for p in range(1, 8))
    b = ConsistentHash("user-id")
    for key in KEYS[:100]:
        first = b.pick(endpoints, ctx(**{"user-id": key}))
        rest = [e for e in endpoints if e != first]
        expected = b.owner(rest, key)  # where the key goes if `first` left
        retry = ctx(**{"user-id": key})
        retry.tried.append(first)
        assert b.pick(endpoints, retry) == expected
        # as the pick stage calls it: tried endpoints already dropped; no new ring built
        rings = len(b._rings)
        assert b.pick(rest, retry) == expected
        assert len(b._rings) == rings
        # every endpoint tried: the owner again
        everything = ctx(**{"user-id": key})
        everything.tried.extend(endpoints)
        assert b.pick(endpoints, everything) == first


def test_consistent_hash_weighted_and_ring_cache_bound() -> None:
    heavy, light = ep(1, weight=300), ep(2, weight=100)
    b = ConsistentHash("user-id", weighted=True, max_rings=2)
    counts = Counter(owners(b, [heavy, light]))
    assert 0.65 < counts[heavy] / len(KEYS) < 0.85
    for n in range(3, 8):
        b.owner([ep(p) for p in range(1, n)], "k")
    assert len(b._rings) == 2


# ================================================================== unit: zone preference


def test_zone_prefers_local_and_records_it() -> None:
    endpoints = (ep(1, zone="a"), ep(2, zone="a"), ep(3, zone="b"), ep(4, zone="b"))
    zone = ZonePreference("a")
    call = ctx()
    local = zone.select(endpoints, call)
    assert list(local) == list(endpoints[:2])
    assert call.extras["zone"] == "local"
    assert zone.select(endpoints, ctx()) is local  # cached per snapshot: same object
    only_a = endpoints[:2]
    assert zone.select(only_a, ctx()) is only_a  # one zone: passed through


def test_zone_spills_when_local_zone_is_small_or_empty() -> None:
    # 1 local out of 6 in 2 zones: even share 3, 1 < 0.5 * 3 -> spill
    small = (ep(1, zone="a"), *(ep(p, zone="b") for p in range(2, 7)))
    zone = ZonePreference("a", min_healthy_fraction=0.5)
    call = ctx()
    assert zone.select(small, call) is small
    assert call.extras["zone"] == "spill"
    # 2 local: 2 >= 1.5 -> local
    enough = (ep(1, zone="a"), ep(2, zone="a"), *(ep(p, zone="b") for p in range(3, 7)))
    assert len(zone.select(enough, ctx())) == 2
    # untagged endpoints are a zone of their own: 2 of 6 in 3 zones, share 2 -> local
    mixed = (*enough[:2], ep(3, zone="b"), ep(4, zone="b"), ep(5), ep(6))
    assert len(ZonePreference("a", min_healthy_fraction=1.0).select(mixed, ctx())) == 2
    empty = ZonePreference("c")
    call = ctx()
    assert empty.select(enough, call) is enough
    assert call.extras["zone"] == "spill"


def test_zone_spills_under_overload_signal() -> None:
    endpoints = (ep(1, zone="a"), ep(2, zone="a"), ep(3, zone="b"), ep(4, zone="b"))
    in_flight = dict.fromkeys(endpoints, 0.0)
    zone = ZonePreference("a", load=in_flight.__getitem__, max_load=4.0)
    assert len(zone.select(endpoints, ctx())) == 2
    in_flight[endpoints[0]] = 5.0
    in_flight[endpoints[1]] = 2.0  # mean 3.5 < 4
    assert len(zone.select(endpoints, ctx())) == 2
    in_flight[endpoints[1]] = 3.0  # mean 4 >= 4
    call = ctx()
    assert zone.select(endpoints, call) is endpoints
    assert call.extras["zone"] == "spill"
    hot = {"flag": False}
    custom = ZonePreference("a", spill_when_overloaded=lambda local: hot["flag"])
    assert len(custom.select(endpoints, ctx())) == 2
    hot["flag"] = True
    assert custom.select(endpoints, ctx()) is endpoints
    # with a PeakEwma as the signal
    peak = PeakEwma()
    shared = ZonePreference("a", load=peak.load, max_load=1.5)
    for _ in range(2):
        peak.on_start(endpoints[0], ctx())
    assert len(shared.select(endpoints, ctx())) == 2  # in flight 2 + 0: mean 1 < 1.5
    peak.on_start(endpoints[1], ctx())  # 2 + 1: mean 1.5
    assert shared.select(endpoints, ctx()) is endpoints
    # a large local zone: the mean is estimated over rotating windows of 16
    big = tuple(ep(p, zone="a") for p in range(1, 41)) + tuple(
        ep(p, zone="b") for p in range(41, 81)
    )
    loads = dict.fromkeys(big, 3.0)
    sampled = ZonePreference("a", load=loads.__getitem__, max_load=3.0)
    assert all(sampled.select(big, ctx()) is big for _ in range(10))
    for e in big[:40]:
        loads[e] = 1.0
    assert all(len(sampled.select(big, ctx())) == 40 for _ in range(10))
    with pytest.raises(InvalidArgument, match="together"):
        ZonePreference("a", load=peak.load)


def test_zone_spills_when_local_endpoints_were_all_tried() -> None:
    endpoints = (ep(1, zone="a"), ep(2, zone="a"), ep(3, zone="b"), ep(4, zone="b"))
    zone = ZonePreference("a")
    retry = ctx()
    retry.tried.append(endpoints[0])
    assert len(zone.select(endpoints, retry)) == 2  # one local left to try
    retry.tried.append(endpoints[1])
    assert zone.select(endpoints, retry) is endpoints
    assert retry.extras["zone"] == "spill"


def test_zone_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    endpoints = (ep(1, zone="a"), ep(2, zone="b"))
    monkeypatch.setenv("MESHKIT_ZONE", "b")
    assert list(ZonePreference().select(endpoints, ctx())) == [endpoints[1]]
    monkeypatch.delenv("MESHKIT_ZONE")
    call = ctx()
    assert ZonePreference().select(endpoints, call) is endpoints
    assert "zone" not in call.extras  # no local zone: no decision
    with pytest.raises(InvalidArgument, match="min_healthy_fraction"):
        ZonePreference("a", min_healthy_fraction=2)


# ================================================================== real servers


class NamedEcho(EchoImpl):
    """Echo that says who answered: ``message@name``, after ``delay`` seconds."""

    def __init__(self, name: str, delay: float = 0.0) -> None:
        super().__init__()
        self.name = name
        self.delay = delay

    async def echo(self, message: str) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        return f"{message}@{self.name}"


@dataclass
class Node:
    name: str
    server: RpcServer

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def endpoint(self, *, weight: int = 100, zone: str | None = None) -> Endpoint:
        tags = {"zone": zone} if zone is not None else {}
        return Endpoint("127.0.0.1", self.port, instance_id=self.name, weight=weight, tags=tags)


StartNodes = Callable[..., Awaitable[list[Node]]]


@pytest.fixture
async def start_nodes() -> AsyncIterator[StartNodes]:
    """``await start_nodes(4, delays={"s2": 0.05})``: echo servers named s0, s1, …"""
    servers: list[RpcServer] = []

    async def start(count: int, delays: dict[str, float] | None = None) -> list[Node]:
        nodes = []
        for i in range(count):
            name = f"s{i}"
            impl = NamedEcho(name, (delays or {}).get(name, 0.0))
            server = RpcServer(
                echo_thrift.Echo, impl, name=name, metrics_registry=CollectorRegistry()
            )
            await server.start("127.0.0.1", 0)
            servers.append(server)
            nodes.append(Node(name, server))
        return nodes

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def make_client() -> AsyncIterator[Callable[..., Client]]:
    clients: list[Client] = []

    def make(**options: Any) -> Client:
        options.setdefault("timeout", 5.0)
        options.setdefault("metrics_registry", CollectorRegistry())
        client = Client(echo_thrift.Echo, "echo", **options)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


async def served_by(
    client: Client,
    calls: int,
    *,
    concurrency: int = 8,
    headers: Callable[[int], dict[str, str]] | None = None,
) -> list[str]:
    """Make ``calls`` echo calls, ``concurrency`` at a time; the names that answered, in order."""
    names: list[str] = [""] * calls
    counter = iter(range(calls))

    async def worker() -> None:
        for i in counter:
            reply = await client.call(
                "echo", f"m{i}", headers=headers(i) if headers is not None else None
            )
            message, _, name = reply.partition("@")
            assert message == f"m{i}"
            names[i] = name

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return names


async def test_round_robin_spreads_evenly_over_real_servers(
    start_nodes: StartNodes, make_client: Callable[..., Client]
) -> None:
    nodes = await start_nodes(3)
    client = make_client(addr=[n.addr for n in nodes], balancer=RoundRobin())
    counts = Counter(await served_by(client, 3000, concurrency=16))
    for node in nodes:
        assert abs(counts[node.name] / 3000 - 1 / 3) < 0.05, counts


async def test_weighted_random_follows_weights_over_real_servers(
    start_nodes: StartNodes, make_client: Callable[..., Client]
) -> None:
    nodes = await start_nodes(3)
    weights = {"s0": 100, "s1": 200, "s2": 300}
    resolver = StaticResolver([n.endpoint(weight=weights[n.name]) for n in nodes])
    client = make_client(resolver=resolver, balancer=WeightedRandom(rng=random.Random(10)))
    counts = Counter(await served_by(client, 3000, concurrency=16))
    for name, weight in weights.items():
        assert abs(counts[name] / 3000 - weight / 600) < 0.05, counts


class CountingPeakEwma(PeakEwma):
    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.picks: Counter[int] = Counter()

    def pick(self, endpoints: Sequence[Endpoint], ctx: CallContext) -> Endpoint:
        chosen = super().pick(endpoints, ctx)
        self.picks[chosen.port] += 1
        return chosen


async def test_peak_ewma_avoids_a_slow_server(
    start_nodes: StartNodes, make_client: Callable[..., Client]
) -> None:
    nodes = await start_nodes(4, delays={"s2": 0.05})
    client = make_client(addr=[n.addr for n in nodes], balancer=PeakEwma(rng=random.Random(11)))
    counts = Counter(await served_by(client, 300, concurrency=8))
    assert counts["s2"] < 30, counts  # fair share would be 75
    assert all(counts[name] > 30 for name in ("s0", "s1", "s3")), counts


async def test_peak_ewma_avoids_a_dead_server(
    start_nodes: StartNodes, make_client: Callable[..., Client]
) -> None:
    nodes = await start_nodes(4)
    dead = nodes[1]
    await dead.server.close()  # connection refused from now on
    balancer = CountingPeakEwma(rng=random.Random(12))
    client = make_client(addr=[n.addr for n in nodes], balancer=balancer)
    counts = Counter(await served_by(client, 200, concurrency=8))  # retries hide the failures
    assert "s1" not in counts
    assert balancer.picks[dead.port] <= 5, balancer.picks
    assert balancer.stats()[f"127.0.0.1:{dead.port}"]["ewma"] >= 0.5  # penalised
    assert sum(balancer.picks.values()) == 200 + balancer.picks[dead.port]


async def test_consistent_hash_over_real_servers(
    start_nodes: StartNodes, make_client: Callable[..., Client]
) -> None:
    nodes = await start_nodes(4)
    balancer = ConsistentHash("user-id")
    client = make_client(addr=[n.addr for n in nodes], balancer=balancer)
    names = await served_by(client, 400, headers=lambda i: {"user-id": f"user-{i % 40}"})
    by_key: dict[str, set[str]] = {}
    for i, name in enumerate(names):
        by_key.setdefault(f"user-{i % 40}", set()).add(name)
    assert all(len(served) == 1 for served in by_key.values()), by_key  # sticky
    assert len({next(iter(s)) for s in by_key.values()}) == 4  # and spread
    # the owner of a key goes away: the retry walks the ring to the key's next owner
    endpoints = [Endpoint.parse(n.addr) for n in nodes]
    key = "user-7"
    owner = balancer.owner(endpoints, key)
    victim = next(n for n in nodes if n.port == owner.port)
    await victim.server.close()
    rest = [e for e in endpoints if e != owner]
    expected = balancer.owner(rest, key)
    # a new client: no pooled connection to the victim, so the call is refused before
    # it is sent and retried (on an idempotent method a lost connection would be, too)
    client = make_client(addr=[n.addr for n in nodes], balancer=ConsistentHash("user-id"))
    for _ in range(5):
        reply = await client.call("echo", "x", headers={"user-id": key})
        assert reply == f"x@{next(n.name for n in nodes if n.port == expected.port)}"


class RecordZone:
    """A middleware placed before pick: keeps the zone decision of every call."""

    name = "record-zone"

    def __init__(self) -> None:
        self.decisions: Counter[str] = Counter()

    async def __call__(self, ctx: CallContext, call_next: Next) -> Any:
        try:
            return await call_next(ctx)
        finally:
            self.decisions[ctx.extras.get("zone", "-")] += 1


def zone_client(
    make_client: Callable[..., Client],
    endpoints: list[Endpoint],
    balancer: Balancer,
    zone: ZonePreference,
) -> tuple[Client, RecordZone]:
    resolver = StaticResolver(endpoints)
    recorder = RecordZone()
    chain = [
        ClientDeadline(5.0),
        Retry(RetryPolicy()),
        recorder,
        Pick(resolver, balancer, selectors=[zone]),
    ]
    return make_client(resolver=resolver, middlewares=chain), recorder


async def test_zone_preference_over_real_servers(
    start_nodes: StartNodes, make_client: Callable[..., Client]
) -> None:
    nodes = await start_nodes(4)
    zones = {"s0": "a", "s1": "a", "s2": "b", "s3": "b"}
    endpoints = [n.endpoint(zone=zones[n.name]) for n in nodes]
    client, recorder = zone_client(make_client, endpoints, RoundRobin(), ZonePreference("a"))
    counts = Counter(await served_by(client, 200))
    assert set(counts) == {"s0", "s1"}
    assert recorder.decisions == {"local": 200}
    # zone c has nobody: spill over to everyone
    client, recorder = zone_client(make_client, endpoints, RoundRobin(), ZonePreference("c"))
    counts = Counter(await served_by(client, 200))
    assert set(counts) == {"s0", "s1", "s2", "s3"}
    assert recorder.decisions == {"spill": 200}


async def test_zone_spills_when_local_zone_is_overloaded(
    start_nodes: StartNodes, make_client: Callable[..., Client]
) -> None:
    # the local zone's two servers take 50 ms; 16 concurrent callers keep them loaded
    nodes = await start_nodes(4, delays={"s0": 0.05, "s1": 0.05})
    zones = {"s0": "a", "s1": "a", "s2": "b", "s3": "b"}
    endpoints = [n.endpoint(zone=zones[n.name]) for n in nodes]
    balancer = PeakEwma(rng=random.Random(13))
    zone = ZonePreference("a", load=balancer.load, max_load=2.0)
    client, recorder = zone_client(make_client, endpoints, balancer, zone)
    counts = Counter(await served_by(client, 300, concurrency=16))
    assert recorder.decisions["local"] > 0
    assert recorder.decisions["spill"] > 0
    assert counts["s2"] + counts["s3"] > 0, counts
    # one caller at a time never loads the local zone: all local
    quiet = PeakEwma()
    client, recorder = zone_client(
        make_client, endpoints, quiet, ZonePreference("a", load=quiet.load, max_load=2.0)
    )
    counts = Counter(await served_by(client, 20, concurrency=1))
    assert recorder.decisions == {"local": 20}
    assert set(counts) <= {"s0", "s1"}
