"""Gray-release routing: rule matching, fallbacks, the dict form, then real servers on loopback.

Distribution assertions use tolerances several standard deviations wide and seeded random
sources; nothing here asserts on speed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from echo_support import EchoImpl, echo_thrift
from prometheus_client import CollectorRegistry

from meshkit import Client, InvalidArgument
from meshkit.errors import NoInstances
from meshkit.rpc.balancer import RoundRobin
from meshkit.rpc.context import CallContext
from meshkit.rpc.deadline import ClientDeadline
from meshkit.rpc.endpoint import Endpoint, StaticResolver
from meshkit.rpc.pick import EndpointSelector, Pick
from meshkit.rpc.pipeline import Next
from meshkit.rpc.retry import Retry, RetryPolicy
from meshkit.rpc.route import ROUTE_KEY, Regex, RouteRule, RoutingTable
from meshkit.rpc.server import RpcServer

CANARY = {"canary": "true"}


def ep(port: int, **tags: str) -> Endpoint:
    return Endpoint("10.0.0.1", port, instance_id=f"i{port}", tags=tags)


def call(method: str = "echo", caller: str = "", **headers: str) -> CallContext:
    return CallContext(service="echo", method=method, caller=caller, headers=dict(headers))


# 3 stable v1 instances, 1 canary v2
V1 = tuple(ep(i, version="1.0.0", zone="a" if i % 2 else "b") for i in (1, 2, 3))
V2 = ep(4, version="2.0.0", canary="true", zone="b")
SNAPSHOT = (*V1, V2)


def route_of(table: RoutingTable, ctx: CallContext, endpoints: Any = SNAPSHOT) -> tuple[Any, str]:
    chosen = table.select(endpoints, ctx)
    return chosen, ctx.extras[ROUTE_KEY]


# ================================================================== unit: matching


def test_rule_without_conditions_matches_every_call() -> None:
    rule = RouteRule("all", CANARY)
    assert rule.matches(call()) and rule.matches(call("reverse", caller="x", a="b"))


def test_methods_condition() -> None:
    rule = RouteRule("m", CANARY, methods=["reverse", "slow"])
    assert rule.methods == frozenset({"reverse", "slow"})
    assert rule.matches(call("reverse"))
    assert rule.matches(call("slow"))
    assert not rule.matches(call("echo"))


def test_caller_condition() -> None:
    rule = RouteRule("c", CANARY, caller={"web", "gateway"})
    assert rule.matches(call(caller="web"))
    assert rule.matches(call(caller="gateway"))
    assert not rule.matches(call(caller="batch"))
    assert not rule.matches(call())  # no caller known


def test_header_conditions_exact_list_and_regex() -> None:
    exact = RouteRule("exact", CANARY, headers={"region": "eu"})
    assert exact.matches(call(region="eu"))
    assert not exact.matches(call(region="eu-west"))
    assert not exact.matches(call())  # header missing
    listed = RouteRule("list", CANARY, headers={"user-id": ["42", "43"]})
    assert listed.headers["user-id"] == ("42", "43")
    assert listed.matches(call(**{"user-id": "42"}))
    assert listed.matches(call(**{"user-id": "43"}))
    assert not listed.matches(call(**{"user-id": "420"}))
    regex = RouteRule("re", CANARY, headers={"device": {"re": "ios|android-1[0-9]"}})
    assert isinstance(regex.headers["device"], Regex)
    assert regex.matches(call(device="ios"))
    assert regex.matches(call(device="android-12"))
    assert not regex.matches(call(device="ios-17"))  # full match, not search
    assert not regex.matches(call(device="android-9"))
    assert RouteRule("re2", CANARY, headers={"device": Regex("ios.*")}).matches(
        call(device="ios-17")
    )


def test_all_conditions_must_hold() -> None:
    rule = RouteRule(
        "all",
        CANARY,
        methods=["echo"],
        caller=["web"],
        headers={"user-id": ["42"], "device": {"re": "ios"}},
    )
    good = {"user-id": "42", "device": "ios"}
    assert rule.matches(call("echo", "web", **good))
    assert not rule.matches(call("reverse", "web", **good))
    assert not rule.matches(call("echo", "batch", **good))
    assert not rule.matches(call("echo", "web", **{"user-id": "42", "device": "android"}))
    assert not rule.matches(call("echo", "web", device="ios"))


def users(n: int) -> list[CallContext]:
    return [call(**{"user-id": f"user-{i}"}) for i in range(n)]


def test_percent_split_by_user_is_within_tolerance_and_sticky() -> None:
    rule = RouteRule("canary-10", CANARY, percent=10, hash_key="user-id")
    population = users(10_000)
    inside = {c.headers["user-id"] for c in population if rule.matches(c)}
    assert abs(len(inside) / 10_000 - 0.10) < 0.015, len(inside)  # sd 0.3 %
    # sticky: the same user lands on the same side every time, for any table or process
    # (the hash is md5, not Python's per-process salted hash())
    twin = RouteRule("canary-10", {"version": "2.0.0"}, percent=10, hash_key="user-id")
    for c in population[:500]:
        side = c.headers["user-id"] in inside
        assert all(rule.matches(c) == side for _ in range(3))
        assert twin.matches(c) == side
    # raising the percentage only adds users
    wider = dataclasses.replace(rule, percent=20)
    inside20 = {c.headers["user-id"] for c in population if wider.matches(c)}
    assert inside < inside20
    assert abs(len(inside20) / 10_000 - 0.20) < 0.02


def test_percent_salt_decides_which_users() -> None:
    population = users(10_000)
    a = RouteRule("a", CANARY, percent=50, hash_key="user-id")
    b = RouteRule("b", CANARY, percent=50, hash_key="user-id")
    in_a = {c.headers["user-id"] for c in population if a.matches(c)}
    in_b = {c.headers["user-id"] for c in population if b.matches(c)}
    # salted by name: independent halves, overlapping on about a quarter of the users
    assert abs(len(in_a & in_b) / 10_000 - 0.25) < 0.03
    same = RouteRule("b", CANARY, percent=50, hash_key="user-id", salt="a")
    assert {c.headers["user-id"] for c in population if same.matches(c)} == in_a


def test_percent_without_key_is_random_per_call() -> None:
    rng = random.Random(5)
    rule = RouteRule("canary-10", CANARY, percent=10, hash_key="user-id")
    anonymous = call()  # no user-id header: drawn per call
    hits = sum(rule.matches(anonymous, rng.random) for _ in range(10_000))
    assert abs(hits / 10_000 - 0.10) < 0.015
    no_key = RouteRule("r", CANARY, percent=30)
    hits = sum(no_key.matches(call(**{"user-id": "7"}), rng.random) for _ in range(10_000))
    assert abs(hits / 10_000 - 0.30) < 0.02


def test_percent_zero_and_hundred() -> None:
    population = users(200)
    assert not any(
        RouteRule("off", CANARY, percent=0, hash_key="user-id").matches(c) for c in population
    )
    assert all(
        RouteRule("on", CANARY, percent=100, hash_key="user-id").matches(c) for c in population
    )
    assert not any(RouteRule("off", CANARY, percent=0).matches(call()) for _ in range(200))


# ================================================================== unit: selection


def test_table_is_an_endpoint_selector() -> None:
    assert isinstance(RoutingTable(), EndpointSelector)


def test_matching_rule_routes_to_its_target() -> None:
    table = RoutingTable([RouteRule("beta", CANARY, headers={"user-id": ["42"]})])
    assert route_of(table, call(**{"user-id": "42"})) == ((V2,), "beta")
    # everyone else: the default stable pool is what no rule targets (the non-canary)
    assert route_of(table, call(**{"user-id": "7"})) == (V1, "stable")
    assert route_of(table, call()) == (V1, "stable")


def test_first_matching_rule_wins() -> None:
    table = RoutingTable(
        [
            RouteRule("v2-for-web", {"version": "2.0.0"}, caller=["web"]),
            RouteRule("zone-b-for-eu", {"zone": "b"}, headers={"region": "eu"}),
        ],
        stable={"version": "1.0.0"},
    )
    zone_b = tuple(e for e in SNAPSHOT if e.tags["zone"] == "b")
    assert route_of(table, call(caller="web", region="eu")) == ((V2,), "v2-for-web")
    assert route_of(table, call(caller="batch", region="eu")) == (zone_b, "zone-b-for-eu")
    # explicit stable pool: every v1 instance, even those some rule targets (zone b)
    assert route_of(table, call(caller="batch")) == (V1, "stable")


def test_target_without_instances_falls_back_to_stable() -> None:
    table = RoutingTable(
        [RouteRule("v3", {"version": "3.0.0"}, headers={"user-id": ["42"]})],
        stable={"version": "1.0.0"},
    )
    assert route_of(table, call(**{"user-id": "42"})) == (V1, "fallback:no-target:v3")
    assert route_of(table, call()) == (V1, "stable")


def test_next_matching_rule_is_tried_when_the_first_has_no_instance() -> None:
    table = RoutingTable(
        [
            RouteRule("v3", {"version": "3.0.0"}, headers={"user-id": ["42"]}),
            RouteRule("canary", CANARY, headers={"user-id": ["42"]}),
        ]
    )
    assert route_of(table, call(**{"user-id": "42"})) == ((V2,), "canary")


def test_empty_stable_pool_means_every_endpoint() -> None:
    only_canaries = (V2, ep(5, canary="true"))
    table = RoutingTable([RouteRule("beta", CANARY, headers={"user-id": ["42"]})])
    chosen, route = route_of(table, call(), only_canaries)
    assert chosen is only_canaries and route == "fallback:no-stable"
    assert route_of(table, call(**{"user-id": "42"}), only_canaries) == (only_canaries, "beta")
    # a rule without instances and no stable pool either: still never fails
    table = RoutingTable([RouteRule("v3", {"version": "3.0.0"})], stable={"version": "1.0.0"})
    chosen, route = route_of(table, call(), only_canaries)
    assert chosen is only_canaries and route == "fallback:no-target:v3,no-stable"


def test_retry_after_every_target_instance_was_tried_goes_stable() -> None:
    table = RoutingTable([RouteRule("beta", CANARY)])
    ctx = call()
    assert route_of(table, ctx) == ((V2,), "beta")
    ctx.tried.append(V2)  # the canary failed this call: its retry goes to the stable pool
    assert route_of(table, ctx) == (V1, "fallback:tried:beta")


def test_strict_table_fails_instead_of_leaving_the_target() -> None:
    table = RoutingTable([RouteRule("v3", {"version": "3.0.0"})], fallback_to_stable=False)
    ctx = call()
    with pytest.raises(NoInstances, match=r"'version': '3.0.0'.*v3"):
        table.select(SNAPSHOT, ctx)
    assert ctx.extras[ROUTE_KEY] == "v3"
    strict = RoutingTable([RouteRule("beta", CANARY)], fallback_to_stable=False)
    ctx = call()
    ctx.tried.append(V2)
    assert route_of(strict, ctx) == ((V2,), "beta")  # retries stay on the canary
    # calls that no rule takes are unaffected by strictness
    web_only = RoutingTable([RouteRule("web", CANARY, caller=["web"])], fallback_to_stable=False)
    assert route_of(web_only, call(caller="batch"), V1) == (V1, "stable")
    with pytest.raises(NoInstances):
        web_only.select(V1, call(caller="web"))


def test_partitions_are_cached_per_snapshot() -> None:
    table = RoutingTable([RouteRule("beta", CANARY, headers={"user-id": ["42"]})])
    first = table.select(SNAPSHOT, call())
    assert table.select(SNAPSHOT, call()) is first  # same snapshot: the same tuple
    assert table.select(SNAPSHOT, call(**{"user-id": "42"})) is table.select(
        SNAPSHOT, call(**{"user-id": "42"})
    )
    # a new snapshot (a new tuple from the resolver) is partitioned again
    grown = (*SNAPSHOT, ep(9, version="2.0.0", canary="true"))
    assert len(table.select(grown, call(**{"user-id": "42"}))) == 2
    # a pool that is the whole snapshot is the caller's own object
    plain = (ep(11), ep(12))
    assert table.select(plain, call()) is plain


# ================================================================== unit: the dict form


FULL = {
    "stable": {"canary": "false"},
    "fallback_to_stable": False,
    "rules": [
        {
            "name": "beta-users",
            "target": {"canary": "true"},
            "methods": ["echo", "reverse"],
            "caller": ["gateway", "web"],
            "headers": {
                "user-id": ["42", "43"],
                "region": "eu",
                "device": {"re": "ios|android"},
            },
            "percent": 12.5,
            "hash_key": "user-id",
            "salt": "beta",
        },
        {"name": "v2-for-batch", "target": {"version": "2.0.0"}, "caller": ["batch"]},
        {"name": "canary-10", "target": {"canary": "true"}, "percent": 10},
    ],
}


def test_dict_round_trip() -> None:
    table = RoutingTable.from_dict(json.loads(json.dumps(FULL)))
    assert table.to_dict() == FULL
    assert json.loads(json.dumps(table.to_dict())) == FULL  # JSON-safe
    again = RoutingTable.from_dict(table.to_dict())
    assert again.rules == table.rules
    assert again.stable == table.stable and again.fallback_to_stable is False
    rule = table.rules[0]
    assert rule.methods == frozenset({"echo", "reverse"})
    assert RouteRule.from_dict(rule.to_dict()) == rule
    # defaults
    minimal = RoutingTable.from_dict({"rules": [{"name": "c", "target": CANARY}]})
    assert minimal.to_dict() == {
        "rules": [{"name": "c", "target": CANARY}],
        "stable": None,
        "fallback_to_stable": True,
    }
    assert RoutingTable.from_dict({}).rules == ()


def bad_rule(**fields: Any) -> dict[str, Any]:
    rule: dict[str, Any] = {"name": "r1", "target": {"canary": "true"}, **fields}
    return {"rules": [{"name": "ok", "target": {"zone": "a"}}, rule]}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ([], r"routing table: table: expected a mapping.*found list"),
        ({"rule": []}, r"expected keys among rules, stable, fallback_to_stable.*'rule'"),
        ({"rules": {"name": "x"}}, r"rules: expected a list of rules, found dict"),
        ({"rules": ["x"]}, r"rules\[0\].*expected a mapping.*found str 'x'"),
        (bad_rule(weight=5), r"rules\[1\]: route rule 'r1': expected keys among .*'weight'"),
        ({"rules": [{"target": CANARY}]}, r"rules\[0\].*expected name, found none"),
        ({"rules": [{"name": "x"}]}, r"rules\[0\].*expected target, found none"),
        (bad_rule(name=""), r"rules\[1\].*name: expected a non-empty string"),
        (bad_rule(name="stable"), r"rules\[1\].*name: expected a name other than 'stable'"),
        (bad_rule(name="fallback:x"), r"rules\[1\].*name: expected a name other than"),
        (bad_rule(percent=150), r"rules\[1\]: route rule 'r1': percent: .*0 to 100.*int 150"),
        (bad_rule(percent=-1), r"'r1': percent: expected a number from 0 to 100"),
        (bad_rule(percent="10"), r"'r1': percent: .*found str '10'"),
        (bad_rule(percent=True), r"'r1': percent: .*found bool True"),
        (bad_rule(percent=float("nan")), r"'r1': percent"),
        (bad_rule(target={"canary": True}), r"'r1': target\['canary'\]: expected a string"),
        (bad_rule(target={}), r"'r1': target: expected at least one tag"),
        (bad_rule(target=["canary"]), r"'r1': target: expected a mapping of tag to value"),
        (bad_rule(methods="echo"), r"'r1': methods: expected a list of names.*found str"),
        (bad_rule(methods=[]), r"'r1': methods: expected at least one name"),
        (bad_rule(caller=["web", 3]), r"'r1': caller item: expected a non-empty string.*int 3"),
        (bad_rule(headers=["user-id"]), r"'r1': headers: expected a mapping"),
        (bad_rule(headers={"user-id": 42}), r"'r1': headers\['user-id'\]: expected a string, "),
        (bad_rule(headers={"user-id": []}), r"headers\['user-id'\]: expected at least one value"),
        (bad_rule(headers={"u": [1]}), r"headers\['u'\] item: expected a string"),
        (bad_rule(headers={"d": {"regex": "x"}}), r"headers\['d'\]: expected a regular exp"),
        (
            bad_rule(headers={"d": {"re": "ios("}}),
            r"'r1': headers\['d'\]: expected a valid regular expression, found 'ios\(' \(",
        ),
        (bad_rule(headers={"d": {"re": 5}}), r"headers\['d'\]: expected a regular expression"),
        (bad_rule(hash_key=5), r"'r1': hash_key: expected a header name"),
        (bad_rule(salt=1), r"'r1': salt: expected a string"),
        (bad_rule(name="ok"), r"rules\[1\] name: expected a name no earlier rule has.*'ok'"),
        ({"stable": {"canary": False}}, r"stable\['canary'\]: expected a string"),
        ({"stable": "v1"}, r"routing table: stable: expected a mapping"),
        ({"fallback_to_stable": "yes"}, r"fallback_to_stable: expected true or false"),
    ],
)
def test_from_dict_rejects_bad_input_saying_where_and_what(data: Any, expected: str) -> None:
    with pytest.raises(InvalidArgument, match=expected):
        RoutingTable.from_dict(data)


def test_rules_built_in_code_are_validated_too() -> None:
    with pytest.raises(InvalidArgument, match=r"route rule 'x': percent"):
        RouteRule("x", CANARY, percent=101)
    with pytest.raises(InvalidArgument, match=r"expected a valid regular expression"):
        Regex("(")
    with pytest.raises(InvalidArgument, match=r"rules\[0\]: expected a RouteRule"):
        RoutingTable([{"name": "x", "target": CANARY}])  # type: ignore[list-item]
    rule = RouteRule("x", {"canary": "true"})
    with pytest.raises(TypeError):
        rule.target["canary"] = "false"  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.percent = 5  # type: ignore[misc]


# ================================================================== unit: update


def test_update_swaps_rules_atomically() -> None:
    table = RoutingTable([RouteRule("beta", CANARY, headers={"user-id": ["42"]})])
    beta = call(**{"user-id": "42"})
    assert route_of(table, beta) == ((V2,), "beta")
    table.select(SNAPSHOT, call())  # warm the partition cache of the old rules
    table.update([RouteRule("v2-for-web", {"version": "2.0.0"}, caller=["web"])])
    assert route_of(table, call(**{"user-id": "42"})) == (V1, "stable")
    assert route_of(table, call(caller="web")) == ((V2,), "v2-for-web")
    # a whole table from config: rules, stable pool and fallback together
    table.update(
        RoutingTable.from_dict(
            {"rules": [{"name": "v3", "target": {"version": "3.0.0"}}], "stable": {"zone": "a"}}
        )
    )
    zone_a = tuple(e for e in SNAPSHOT if e.tags["zone"] == "a")
    assert table.stable == {"zone": "a"}
    assert route_of(table, call()) == (zone_a, "fallback:no-target:v3")
    # keyword overrides; unspecified settings are kept
    table.update([], fallback_to_stable=False)
    assert table.stable == {"zone": "a"} and table.fallback_to_stable is False
    table.update([], stable=None)
    assert table.stable is None and table.fallback_to_stable is False
    # a bad update raises and leaves the table as it was
    table.update([RouteRule("beta", CANARY)])
    with pytest.raises(InvalidArgument, match="no earlier rule"):
        table.update([RouteRule("a", CANARY), RouteRule("a", CANARY)])
    assert [r.name for r in table.rules] == ["beta"]


# ================================================================== real servers


class NamedEcho(EchoImpl):
    """Echo that answers with its server's name."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    async def echo(self, message: str) -> str:
        return self.name


@dataclass
class Node:
    name: str
    server: RpcServer
    tags: dict[str, str]

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint("127.0.0.1", self.server.port, instance_id=self.name, tags=self.tags)


@pytest.fixture
async def nodes() -> AsyncIterator[list[Node]]:
    """4 echo servers: s0, s1, s2 stable v1, s3 a v2 canary."""
    started: list[Node] = []
    for i in range(4):
        name = f"s{i}"
        tags = {"version": "2.0.0", "canary": "true"} if i == 3 else {"version": "1.0.0"}
        server = RpcServer(
            echo_thrift.Echo, NamedEcho(name), name="echo", metrics_registry=CollectorRegistry()
        )
        await server.start("127.0.0.1", 0)
        started.append(Node(name, server, tags))
    yield started
    for node in started:
        await node.server.close()


class RouteRecorder:
    """A middleware that keeps the route of every call with the endpoint that served it.

    After pick, it reads ``ctx.extras`` before calling on; before pick, after the call.
    """

    def __init__(self, name: str, *, after_pick: bool) -> None:
        self.name = name
        self.after_pick = after_pick
        self.seen: list[tuple[str, str]] = []

    async def __call__(self, ctx: CallContext, call_next: Next) -> Any:
        if self.after_pick:
            assert ctx.endpoint is not None
            self.seen.append((ctx.extras[ROUTE_KEY], ctx.endpoint.instance_id))
            return await call_next(ctx)
        try:
            return await call_next(ctx)
        finally:
            assert ctx.endpoint is not None
            self.seen.append((ctx.extras.get(ROUTE_KEY, "-"), ctx.endpoint.instance_id))


MakeClient = Callable[..., Awaitable[tuple[Client, RouteRecorder, RouteRecorder]]]


@pytest.fixture
async def routed_client(nodes: list[Node]) -> AsyncIterator[MakeClient]:
    """``await routed_client(table, caller=...)``: a client routing with ``table``."""
    clients: list[Client] = []

    async def make(
        table: RoutingTable, caller: str = "", endpoints: list[Endpoint] | None = None
    ) -> tuple[Client, RouteRecorder, RouteRecorder]:
        resolver = StaticResolver(endpoints or [n.endpoint for n in nodes])
        before = RouteRecorder("route-before", after_pick=False)
        after = RouteRecorder("route-after", after_pick=True)
        chain = [
            ClientDeadline(5),
            before,
            Retry(RetryPolicy()),
            Pick(resolver, RoundRobin(), selectors=[table]),
            after,
        ]
        client = Client(
            echo_thrift.Echo,
            "echo",
            resolver=resolver,
            middlewares=chain,
            caller=caller,
            metrics_registry=CollectorRegistry(),
        )
        clients.append(client)
        return client, before, after

    yield make
    for client in clients:
        await client.close()


async def served(
    client: Client,
    calls: int,
    headers: Callable[[int], dict[str, str] | None] = lambda i: None,
    concurrency: int = 8,
) -> list[str]:
    names = [""] * calls
    counter = iter(range(calls))

    async def worker() -> None:
        for i in counter:
            names[i] = await client.call("echo", "hi", headers=headers(i))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return names


async def test_header_routing_over_real_servers(routed_client: MakeClient) -> None:
    table = RoutingTable.from_dict(
        {"rules": [{"name": "beta", "target": CANARY, "headers": {"user-id": ["42"]}}]}
    )
    client, before, after = await routed_client(table)
    assert await client.call("echo", "x", headers={"user-id": "42"}) == "s3"
    names = await served(client, 120, lambda i: {"user-id": "42" if i % 4 == 0 else f"u{i}"})
    assert Counter(n for i, n in enumerate(names) if i % 4 == 0) == {"s3": 30}
    others = Counter(n for i, n in enumerate(names) if i % 4)
    # (which stable servers serve depends on round robin's one counter over both pools)
    assert set(others) <= {"s0", "s1", "s2"} and len(others) >= 2, others
    # the route is visible to middleware after pick, and before it once the call returns
    assert sorted(before.seen) == sorted(after.seen)
    assert Counter(route for route, _ in after.seen) == {"beta": 31, "stable": 90}
    assert all((route == "beta") == (name == "s3") for route, name in after.seen)


async def test_caller_routing_over_real_servers(routed_client: MakeClient) -> None:
    table = RoutingTable(
        [RouteRule("v2-for-web", {"version": "2.0.0"}, caller=["web"])],
        stable={"version": "1.0.0"},
    )
    web, _, web_routes = await routed_client(table, caller="web")
    batch, _, batch_routes = await routed_client(table, caller="batch")
    assert Counter(await served(web, 30)) == {"s3": 30}
    assert set(await served(batch, 30)) == {"s0", "s1", "s2"}
    assert {route for route, _ in web_routes.seen} == {"v2-for-web"}
    assert {route for route, _ in batch_routes.seen} == {"stable"}


async def test_canary_split_over_real_servers(routed_client: MakeClient) -> None:
    table = RoutingTable([RouteRule("canary-10", CANARY, percent=10)], rng=random.Random(3))
    client, _, after = await routed_client(table)
    counts = Counter(await served(client, 2000, concurrency=16))
    assert 0.06 <= counts["s3"] / 2000 <= 0.14, counts
    assert all(counts[name] > 400 for name in ("s0", "s1", "s2")), counts
    routes = Counter(route for route, _ in after.seen)
    assert routes == {"canary-10": counts["s3"], "stable": 2000 - counts["s3"]}


async def test_sticky_canary_users_over_real_servers(routed_client: MakeClient) -> None:
    table = RoutingTable([RouteRule("canary-20", CANARY, percent=20, hash_key="user-id")])
    client, _, _ = await routed_client(table)
    names = await served(client, 600, lambda i: {"user-id": f"u{i % 100}"})
    by_user: dict[str, set[str]] = {}
    for i, name in enumerate(names):
        by_user.setdefault(f"u{i % 100}", set()).add("canary" if name == "s3" else "stable")
    assert all(len(sides) == 1 for sides in by_user.values()), by_user  # sticky
    canary_users = sum(sides == {"canary"} for sides in by_user.values())
    assert 8 <= canary_users <= 32  # 20 % of 100 users, sd 4


async def test_canary_down_falls_back_to_stable_over_real_servers(
    nodes: list[Node], routed_client: MakeClient
) -> None:
    table = RoutingTable([RouteRule("beta", CANARY, headers={"user-id": ["42"]})])
    # the canary leaves discovery: its users go to the stable pool
    client, _, after = await routed_client(table, endpoints=[n.endpoint for n in nodes[:3]])
    assert await client.call("echo", "x", headers={"user-id": "42"}) in {"s0", "s1", "s2"}
    assert after.seen[-1][0] == "fallback:no-target:beta"
    # the canary is in discovery but dead: the refused attempt is retried on stable
    await nodes[3].server.close()
    client, before, after = await routed_client(table)
    assert await client.call("echo", "x", headers={"user-id": "42"}) in {"s0", "s1", "s2"}
    assert [route for route, _ in after.seen] == ["beta", "fallback:tried:beta"]
    assert before.seen == [after.seen[-1]]
