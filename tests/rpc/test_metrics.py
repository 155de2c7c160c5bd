"""RPC metrics are summed at scrape time: exact counts, consistent histograms, no resets."""

from __future__ import annotations

import contextlib
import gc
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from meshkit.errors import Unavailable
from meshkit.rpc.context import CallContext
from meshkit.rpc.metrics import LATENCY_BUCKETS, MetricsMiddleware, RpcMetrics


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def ok(ctx: CallContext) -> str:
    return "fine"


async def fail(ctx: CallContext) -> Any:
    raise Unavailable("down")


async def app_error(ctx: CallContext) -> Any:
    ctx.extras["app_error"] = "EchoError"
    raise ValueError("declared")


async def test_counts_codes_and_a_consistent_histogram() -> None:
    registry = CollectorRegistry()
    mw = MetricsMiddleware(RpcMetrics.get("client", registry))
    for _ in range(3):
        await mw(CallContext("echo", "echo"), ok)
    for handler in (fail, app_error):
        with contextlib.suppress(Exception):
            await mw(CallContext("echo", "echo"), handler)
    got = samples(registry)
    key = (("code", "OK"), ("method", "echo"), ("service", "echo"))
    assert got[("meshkit_rpc_client_requests_total", key)] == 3
    assert got[("meshkit_rpc_client_requests_total", (("code", "UNAVAILABLE"), *key[1:]))] == 1
    assert got[("meshkit_rpc_client_requests_total", (("code", "APP_ERROR"), *key[1:]))] == 1
    labels = (("method", "echo"), ("service", "echo"))
    assert got[("meshkit_rpc_client_latency_seconds_count", labels)] == 5
    buckets = [
        got[("meshkit_rpc_client_latency_seconds_bucket", (("le", le), *labels))]
        for le in [*(str(b) for b in LATENCY_BUCKETS), "+Inf"]
    ]
    assert buckets == sorted(buckets)  # cumulative
    assert buckets[-1] == 5
    assert got[("meshkit_rpc_client_latency_seconds_sum", labels)] > 0
    assert got[("meshkit_rpc_client_in_flight", (("service", "echo"),))] == 0


async def test_several_middlewares_sum_and_a_collected_one_keeps_its_counts() -> None:
    registry = CollectorRegistry()
    metrics = RpcMetrics.get("server", registry)
    first, second = MetricsMiddleware(metrics, "svc"), MetricsMiddleware(metrics, "svc")
    await first(CallContext("ignored", "m"), ok)
    await second(CallContext("ignored", "m"), ok)
    key = (
        "meshkit_rpc_server_requests_total",
        (("code", "OK"), ("method", "m"), ("service", "svc")),
    )
    assert samples(registry)[key] == 2
    del first
    gc.collect()
    assert samples(registry)[key] == 2  # a counter never goes backwards
    await second(CallContext("ignored", "m"), ok)
    assert samples(registry)[key] == 3


def test_one_family_per_registry() -> None:
    registry = CollectorRegistry()
    assert RpcMetrics.get("client", registry) is RpcMetrics.get("client", registry)
    assert RpcMetrics.get("client", registry) is not RpcMetrics.get("server", registry)
    names = {family.name for family in registry.collect()}
    assert {"meshkit_rpc_client_requests", "meshkit_rpc_server_latency_seconds"} <= names
