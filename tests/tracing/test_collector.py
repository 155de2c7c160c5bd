"""The bundled collector: OTLP/HTTP in (protobuf and JSON), SQLite, the JSON API, bad input."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path

import aiohttp
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from tracing_support import (
    fan_out_trace,
    flushed,
    get_json,
    get_trace,
    otlp_json_request,
    otlp_json_span,
    post_json,
)

from meshkit.tracing.collector import Collector, SpanStore
from meshkit.tracing.collector.otlp import decode_json
from meshkit.tracing.collector.queries import critical_path, self_times

TRACE_A = "0af7651916cd43dd8448eb211c80319c"
TRACE_B = "1af7651916cd43dd8448eb211c80319c"


async def test_json_ingest_search_trace_deps_and_compare(collector: Collector) -> None:
    now = time.time_ns()
    status, body = await post_json(
        collector.url + "/v1/traces",
        otlp_json_request("gateway", fan_out_trace(TRACE_A, now - 10**9)),
    )
    assert (status, body) == (200, {})
    status, _ = await post_json(
        collector.url + "/v1/traces",
        otlp_json_request("gateway", fan_out_trace(TRACE_B, now, slow_child_ms=35, xss=True)),
    )
    assert status == 200
    await flushed(collector)

    status, services = await get_json(collector.url + "/api/services")
    names = {s["service"]: s["operations"] for s in services["services"]}
    assert names["gateway"] == ["auth/check", "gateway/greet", "orders/list"]

    _, found = await get_json(collector.url + "/api/traces?service=gateway")
    assert [t["trace_id"] for t in found["traces"]] == [TRACE_B, TRACE_A]  # newest first
    summary = found["traces"][1]
    assert summary["spans"] == 4 and summary["errors"] == 0
    assert summary["root_operation"] == "gateway/greet"
    assert summary["services"] == ["gateway", "orders"]
    assert summary["duration_ms"] == 50.0

    for query, expected in [
        ("errors=1", [TRACE_B]),
        ("operation=orders/list&min_ms=32", [TRACE_B]),
        ("operation=orders/list&max_ms=32", [TRACE_A]),
        ("tags=rpc.service=db", [TRACE_B, TRACE_A]),
        ("tags=meshkit.deadline_ms=100.0", [TRACE_B, TRACE_A]),
        (f"start_ms={(now - 10**8) / 1e6}", [TRACE_B]),
        (f"end_ms={(now - 10**8) / 1e6}", [TRACE_A]),
        ("lookback=3600&limit=1", [TRACE_B]),
        ("service=nobody", []),
    ]:
        status, found = await get_json(f"{collector.url}/api/traces?{query}")
        assert status == 200, (query, found)
        assert [t["trace_id"] for t in found["traces"]] == expected, query

    status, trace = await get_trace(collector.url, TRACE_A.upper())
    assert status == 200
    assert trace["span_count"] == 4 and trace["duration_us"] == 50_000
    assert trace["critical_path"] == [f"{i:016x}" for i in (1, 3, 4)]
    selfs = {s["service"]: s["self_us"] for s in trace["services"]}
    # gateway: root 50 - orders 30 (auth runs inside orders' interval) + auth 5 + orders 30 - 4
    assert selfs == {"gateway": 20_000 + 5_000 + 26_000, "orders": 4_000}
    root = trace["spans"][0]
    assert root["deadline_ms"] == 100.0 and root["start_us"] == 0

    _, deps = await get_json(collector.url + "/api/dependencies?window_s=600")
    edges = {(e["caller"], e["callee"]): e for e in deps["edges"]}
    assert set(edges) == {("gateway", "auth"), ("gateway", "orders"), ("orders", "db")}
    assert edges[("orders", "db")]["calls"] == 2
    assert edges[("orders", "db")]["error_rate"] == 0.5
    assert edges[("gateway", "orders")]["p99_ms"] == 35.0
    assert deps["nodes"] == ["auth", "db", "gateway", "orders"]

    _, diff = await get_json(f"{collector.url}/api/compare?a={TRACE_A}&b={TRACE_B}")
    rows = {r["name"]: r for r in diff["rows"]}
    assert rows["orders/list"]["delta_us"] == 5_000 and rows["orders/list"]["in"] == "both"
    assert rows["db/query"]["b_error"] is True and rows["db/query"]["depth"] == 2
    assert diff["a"]["trace_id"] == TRACE_A and diff["b"]["trace_id"] == TRACE_B


async def test_protobuf_from_the_sdk_exporter_and_gzip(collector: Collector) -> None:
    provider = TracerProvider(resource=Resource.create({"service.name": "pb-app"}))
    # gzip-compressed, as exporters configured with compression send it
    exporter = OTLPSpanExporter(collector.url + "/v1/traces", compression=Compression.Gzip)
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    def produce() -> str:
        tracer = provider.get_tracer("t")
        with (
            tracer.start_as_current_span("parent") as parent,
            tracer.start_as_current_span("child", attributes={"n": 3, "ok": True}),
        ):
            pass
        return format(parent.get_span_context().trace_id, "032x")

    trace_id = await asyncio.to_thread(produce)
    await asyncio.to_thread(provider.shutdown)
    await flushed(collector)
    _, trace = await get_trace(collector.url, trace_id)
    spans = {s["name"]: s for s in trace["spans"]}
    assert spans["child"]["parent_id"] == spans["parent"]["span_id"]
    assert spans["child"]["attrs"] == {"n": 3, "ok": True}
    assert spans["parent"]["service"] == "pb-app"
    assert trace["resources"][spans["parent"]["resource"]]["service.name"] == "pb-app"


async def test_bad_input_is_refused_clearly_and_keeps_the_good_spans(
    collector: Collector,
) -> None:
    url = collector.url + "/v1/traces"
    async with aiohttp.ClientSession() as session:
        async with session.post(
            url, data=b"\xff\x01garbage", headers={"Content-Type": "application/x-protobuf"}
        ) as resp:
            assert resp.status == 400
            assert "protobuf" in (await resp.json())["error"]
        async with session.post(
            url, data=b"{not json", headers={"Content-Type": "application/json"}
        ) as resp:
            assert resp.status == 400
            assert "JSON" in (await resp.json())["error"]
        async with session.post(url, data=b"x", headers={"Content-Type": "text/plain"}) as resp:
            assert resp.status == 415
        async with session.post(
            url, data=b"x", headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}
        ) as resp:
            assert resp.status == 400
            assert "decompress" in (await resp.json())["error"]
    good = otlp_json_span(TRACE_A, "00000000000000aa", "", "ok", time.time_ns(), 1000)
    bad_id = otlp_json_span("xyz", "00000000000000ab", "", "bad", time.time_ns(), 1000)
    backwards = otlp_json_span(TRACE_A, "00000000000000ac", "", "back", 2000, -1000)
    status, body = await post_json(url, otlp_json_request("svc", [good, bad_id, backwards]))
    assert status == 200
    assert body["partialSuccess"]["rejectedSpans"] == "2"
    assert "spans[1]" in body["partialSuccess"]["errorMessage"]
    assert "traceId" in body["partialSuccess"]["errorMessage"]
    await flushed(collector)
    _, trace = await get_trace(collector.url, TRACE_A)
    assert [s["name"] for s in trace["spans"]] == ["ok"]

    for path, status_expected, word in [
        ("/api/traces/nothex", 400, "32 hex"),
        (f"/api/traces/{TRACE_B}", 404, TRACE_B),
        ("/api/traces?min_ms=-1", 400, "min_ms"),
        ("/api/traces?tags=novalue", 400, "key=value"),
        ("/api/traces?limit=0", 400, "limit"),
        ("/api/compare?a=" + TRACE_A, 400, "two trace ids"),
        ("/api/dependencies?window_s=abc", 400, "window_s"),
        ("/static/../../etc/passwd", 404, ""),
    ]:
        status, body = await get_json(collector.url + path)
        assert status == status_expected, (path, body)
        assert word in json.dumps(body), (path, body)


async def test_refuses_with_503_when_the_store_is_behind(tmp_path: Path) -> None:
    store = SpanStore(tmp_path / "t.db", max_queued_requests=1)
    server = Collector(store, port=0)
    await server.start()
    # Another process holding the database's write lock stalls the writer thread.
    blocker = sqlite3.connect(store.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        statuses = []
        for i in range(6):
            span = otlp_json_span(TRACE_A, f"{i + 1:016x}", "", "x", time.time_ns(), 10)
            status, body = await post_json(
                server.url + "/v1/traces", otlp_json_request("s", [span])
            )
            statuses.append(status)
            if status == 503:
                assert "retry later" in body["error"]
        assert statuses[0] == 200 and 503 in statuses
        assert store.requests_refused == statuses.count(503)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    try:
        await flushed(server)
        # every accepted span was written once the lock went away
        assert store.query("SELECT count(*) FROM spans")[0][0] == statuses.count(200)
    finally:
        await server.stop()
        await asyncio.to_thread(store.close)


def test_retention_by_age_and_size(tmp_path: Path) -> None:
    store = SpanStore(tmp_path / "r.db", max_age=3600, max_bytes=None, retention_every=3600)
    try:
        now = time.time_ns()
        old = decode_json(
            json.dumps(
                otlp_json_request(
                    "s",
                    [
                        otlp_json_span(TRACE_A, f"{i + 1:016x}", "", "old", now - 7200 * 10**9, 10)
                        for i in range(10)
                    ],
                )
            ).encode()
        ).spans
        new = decode_json(
            json.dumps(
                otlp_json_request(
                    "s",
                    [
                        otlp_json_span(TRACE_B, f"{i + 1:016x}", "", "new", now, 10)
                        for i in range(10)
                    ],
                )
            ).encode()
        ).spans
        store.add(old)
        store.add(new)
        assert store.flush()
        assert store.apply_retention(now) == 10
        assert {r[0] for r in store.query("SELECT DISTINCT name FROM spans")} == {"new"}
        store.max_age = None
        store.max_bytes = 1  # smaller than anything: deletes oldest tenths until empty
        store.apply_retention(now)
        assert store.query("SELECT count(*) FROM spans")[0][0] == 0
    finally:
        store.close()


def test_critical_path_and_self_time_edge_cases() -> None:
    def span(sid: str, parent: str, start: int, dur: int) -> dict[str, object]:
        return {"span_id": sid, "parent_id": parent, "start_ns": start, "duration_ns": dur}

    # sequential children: both on the path, in time order
    spans = [span("r", "", 0, 100), span("a", "r", 0, 40), span("b", "r", 50, 40)]
    assert critical_path(spans) == ["r", "a", "b"]
    # a child outliving its parent (async work) is clipped, not crashing
    spans = [span("r", "", 0, 10), span("a", "r", 5, 100)]
    assert critical_path(spans) == ["r", "a"]
    assert self_times(spans) == {"r": 5, "a": 100}
    # orphan (parent not received): its own root; the longest root is used
    spans = [span("x", "missing", 0, 5), span("y", "", 0, 50)]
    assert critical_path(spans) == ["y"]
    assert critical_path([]) == []


async def test_mq_producer_and_consumer_traces_are_linked(collector: Collector) -> None:
    now = time.time_ns()
    producer = otlp_json_span(
        TRACE_A, "00000000000000a1", "", "orders publish", now, 1000, kind=4,
        attrs={"messaging.destination.name": "orders"},
    )  # fmt: skip
    consumer = otlp_json_span(
        TRACE_B, "00000000000000b1", "", "orders process", now + 5000, 2000, kind=5,
        links=[{"trace_id": TRACE_A, "span_id": "00000000000000a1"}],
    )  # fmt: skip
    await post_json(collector.url + "/v1/traces", otlp_json_request("shop", [producer]))
    await post_json(collector.url + "/v1/traces", otlp_json_request("worker", [consumer]))
    await flushed(collector)
    _, produced = await get_trace(collector.url, TRACE_A)
    assert produced["linked_from"] == [
        {"trace_id": TRACE_B, "span_id": "00000000000000b1", "linked_span_id": "00000000000000a1"}
    ]
    _, consumed = await get_trace(collector.url, TRACE_B)
    (span,) = consumed["spans"]
    assert span["kind"] == "CONSUMER"
    assert span["links"] == [{"trace_id": TRACE_A, "span_id": "00000000000000a1", "attrs": {}}]
    _, deps = await get_json(collector.url + "/api/dependencies?window_s=600")
    assert [(e["caller"], e["callee"]) for e in deps["edges"]] == [("shop", "orders")]


def test_protobuf_spans_with_bad_ids_are_rejected_one_by_one() -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    from meshkit.tracing.collector.otlp import decode_protobuf

    request = ExportTraceServiceRequest()
    spans = request.resource_spans.add().scope_spans.add().spans
    cases = [
        (bytes.fromhex(TRACE_A), b"\x00" * 7 + b"\x01", b"", "good"),
        (b"\x01" * 15, b"\x00" * 7 + b"\x02", b"", "short trace id"),
        (bytes(16), b"\x00" * 7 + b"\x03", b"", "zero trace id"),
        (bytes.fromhex(TRACE_A), bytes(8), b"", "zero span id"),
        (bytes.fromhex(TRACE_A), b"\x00" * 7 + b"\x05", b"\x01" * 9, "long parent id"),
        (bytes.fromhex(TRACE_A), b"\x00" * 7 + b"\x06", b"\x00" * 7 + b"\x01", "child"),
    ]
    for trace_id, span_id, parent_id, name in cases:
        span = spans.add(trace_id=trace_id, span_id=span_id, parent_span_id=parent_id, name=name)
        span.start_time_unix_nano, span.end_time_unix_nano = 1000, 2000
    decoded = decode_protobuf(request.SerializeToString())
    assert [s.name for s in decoded.spans] == ["good", "child"]
    assert decoded.spans[1].parent_id == "0000000000000001"
    assert decoded.spans[0].trace_id == TRACE_A
    assert decoded.rejected == 4
    assert "spans[1]" in decoded.first_error and "traceId" in decoded.first_error
