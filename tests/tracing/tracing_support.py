"""Helpers shared by the tracing tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from echo_support import echo_thrift
from prometheus_client import CollectorRegistry

from meshkit import Client, Service
from meshkit.tracing.collector import Collector
from meshkit.tracing.otel import OTelHook


async def get_json(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, await resp.json(content_type=None)


async def get_trace(base_url: str, trace_id: str) -> tuple[int, Any]:
    """``GET /api/traces/{id}`` with each span's attrs/events/links merged into it."""
    status, body = await get_json(f"{base_url}/api/traces/{trace_id}")
    if status == 200:
        for i, span in enumerate(body["spans"]):
            span.update(attrs=body["attrs"][i], events=body["events"][i], links=body["links"][i])
    return status, body


async def flushed(collector: Collector) -> None:
    """Wait until everything the collector accepted is queryable."""
    ok = await asyncio.get_running_loop().run_in_executor(None, collector.store.flush, 10.0)
    assert ok, "the span store did not write its queue within 10 s"


XSS = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'


def otlp_json_span(
    trace_id: str,
    span_id: str,
    parent_id: str,
    name: str,
    start_ns: int,
    duration_ns: int,
    *,
    kind: int = 2,
    error: bool = False,
    attrs: dict[str, Any] | None = None,
    links: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    """One span in OTLP's JSON encoding."""

    def value(v: Any) -> dict[str, Any]:
        if isinstance(v, bool):
            return {"boolValue": v}
        if isinstance(v, int):
            return {"intValue": str(v)}
        if isinstance(v, float):
            return {"doubleValue": v}
        return {"stringValue": str(v)}

    span: dict[str, Any] = {
        "traceId": trace_id,
        "spanId": span_id,
        "parentSpanId": parent_id,
        "name": name,
        "kind": kind,
        "startTimeUnixNano": str(start_ns),
        "endTimeUnixNano": str(start_ns + duration_ns),
        "attributes": [{"key": k, "value": value(v)} for k, v in (attrs or {}).items()],
        "status": {"code": 2, "message": "boom"} if error else {"code": 1},
    }
    if links:
        span["links"] = [{"traceId": x["trace_id"], "spanId": x["span_id"]} for x in links]
    return span


def otlp_json_request(service: str, spans: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "resourceSpans": [
            {
                "resource": {
                    "attributes": [{"key": "service.name", "value": {"stringValue": service}}]
                },
                "scopeSpans": [{"scope": {"name": "test"}, "spans": spans}],
            }
        ]
    }


async def post_json(url: str, body: Any) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=body) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


def fan_out_trace(
    trace_id: str, start_ns: int, *, slow_child_ms: float = 30.0, xss: bool = False
) -> list[dict[str, Any]]:
    """gateway → auth (5 ms) alongside orders (``slow_child_ms``); orders → db (4 ms).

    Critical path: gateway root → orders → db (auth runs in parallel, inside orders' time).
    Span ids: root 1…, auth 2…, orders 3…, db 4….
    """
    ms = 1_000_000
    sid = [f"{i:016x}" for i in range(1, 6)]
    root_attrs: dict[str, Any] = {"meshkit.service": "gateway", "meshkit.deadline_ms": 100.0}
    if xss:
        root_attrs["user.comment"] = XSS
    return [
        otlp_json_span(
            trace_id, sid[0], "", "gateway/greet", start_ns, int(50 * ms), attrs=root_attrs
        ),
        otlp_json_span(
            trace_id,
            sid[1],
            sid[0],
            "auth/check",
            start_ns + 11 * ms,
            5 * ms,
            kind=3,
            attrs={"meshkit.service": "gateway", "rpc.service": "auth"},
        ),
        otlp_json_span(
            trace_id,
            sid[2],
            sid[0],
            "orders/list",
            start_ns + 10 * ms,
            int(slow_child_ms * ms),
            kind=3,
            attrs={"meshkit.service": "gateway", "rpc.service": "orders"},
        ),
        otlp_json_span(
            trace_id,
            sid[3],
            sid[2],
            "db/query",
            start_ns + 12 * ms,
            4 * ms,
            kind=3,
            error=xss,
            attrs={"meshkit.service": "orders", "rpc.service": "db"},
        ),
    ]


@contextlib.asynccontextmanager
async def traced_echo(hook: OTelHook, implementation: Any) -> AsyncIterator[Any]:
    """An echo :class:`Service` serving ``implementation`` and a :class:`Client` of it,
    both traced by ``hook``; the service stops when the block ends."""
    svc = Service(
        "echo", echo_thrift.Echo, registry=None, tracer=hook, metrics_registry=CollectorRegistry()
    )
    svc.implement(implementation)
    await svc.start(port=0, health_port=0)
    try:
        async with Client(
            echo_thrift.Echo,
            "echo",
            addr=f"127.0.0.1:{svc.port}",
            tracer=hook,
            metrics_registry=CollectorRegistry(),
        ) as client:
            yield client
    finally:
        await svc.stop(drain_timeout=1.0)
