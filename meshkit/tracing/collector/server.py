"""``meshkit traces serve``: OTLP/HTTP in, SQLite store, JSON API and the trace viewer.

Routes (all JSON unless noted):

* ``POST /v1/traces`` — OTLP/HTTP export, ``application/x-protobuf`` or
  ``application/json`` (gzip allowed). 200 with an ``ExportTraceServiceResponse`` (partial
  success lists rejected spans), 400 for a malformed body, 415 for another content type,
  413 past ``max_body``, 503 with ``Retry-After`` when the store is behind.
* ``GET /api/services`` — services and their operations.
* ``GET /api/traces?service=&operation=&tags=k=v k2=v2&min_ms=&max_ms=&errors=1``
  ``&lookback=&start_ms=&end_ms=&limit=`` — matching traces, newest first (duration,
  span count, services, errors, root).
* ``GET /api/traces/{trace_id}`` — spans, critical path, per-service self time, MQ links.
* ``GET /api/dependencies?window_s=3600`` — service graph edges (calls/s, error rate, p99).
* ``GET /api/compare?a=&b=`` — structural diff of two traces.
* ``GET /api/stats`` — store counters.
* ``GET /`` — the viewer (``/static/*``: its script and style sheet).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import signal
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceResponse,
)

from . import queries
from .otlp import Decoded, OtlpError, decode_json, decode_protobuf
from .store import SpanStore, StoreFull

__all__ = ["Collector"]

_dumps = functools.partial(json.dumps, default=str, separators=(",", ":"))
_SECURITY = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
}
_STATIC = {"app.js": "text/javascript", "app.css": "text/css", "index.html": "text/html"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(body: Any, status: int = 200, **headers: str) -> web.Response:
    return web.Response(
        text=_dumps(body),
        status=status,
        content_type="application/json",
        headers={"Cache-Control": "no-store", **headers},
    )


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _json({"error": exc.reason, "status": exc.status, "path": request.path}, exc.status)
    except queries.QueryError as exc:
        return _json({"error": str(exc), "status": 400}, 400)
    response.headers.update(_SECURITY)
    return response


class Collector:
    """The collector's HTTP server around one :class:`SpanStore`."""

    def __init__(
        self,
        store: SpanStore,
        *,
        host: str = "127.0.0.1",
        port: int = 4318,
        max_body: int = 32 * 1024 * 1024,
    ) -> None:
        self.store = store
        self.host = host
        self.requested_port = port
        self.max_body = max_body
        self.spans_received = 0
        self.spans_rejected = 0
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="meshkit-traces-q")
        static = resources.files(__package__).joinpath("static")
        self._static = {name: static.joinpath(name).read_bytes() for name in _STATIC}

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[_errors], client_max_size=self.max_body)
        app.router.add_post("/v1/traces", self._ingest)
        app.router.add_get("/api/services", self._services)
        app.router.add_get("/api/traces", self._search)
        app.router.add_get("/api/traces/{trace_id}", self._trace)
        app.router.add_get("/api/dependencies", self._dependencies)
        app.router.add_get("/api/compare", self._compare)
        app.router.add_get("/api/stats", self._stats)
        app.router.add_get("/", self._index)
        app.router.add_get("/static/{name}", self._asset)
        return app

    async def start(self) -> None:
        runner = web.AppRunner(self.make_app(), access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.requested_port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = runner.addresses[0][1]

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the collector has not started")
        return self._port

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    async def _run(self, func: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, func, *args)

    # -- OTLP ---------------------------------------------------------------------

    async def _ingest(self, request: web.Request) -> web.Response:
        kind = request.content_type
        if kind not in ("application/x-protobuf", "application/protobuf", "application/json"):
            raise web.HTTPUnsupportedMediaType(
                reason=f"expected Content-Type application/x-protobuf or application/json, "
                f"found {kind!r}"
            )
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise web.HTTPRequestEntityTooLarge(
                max_size=self.max_body,
                actual_size=request.content_length or 0,
                reason=f"expected at most {self.max_body} bytes of OTLP",
            ) from None
        # aiohttp has already inflated gzip/deflate bodies; a body that does not inflate
        # comes out empty, which would pass for an empty (valid) request.
        encoding = request.headers.get("Content-Encoding", "").lower()
        if encoding not in ("", "identity", "gzip", "deflate"):
            raise web.HTTPUnsupportedMediaType(
                reason=f"expected Content-Encoding gzip, deflate or none, found {encoding!r}"
            )
        if encoding in ("gzip", "deflate") and not body and (request.content_length or 0) > 0:
            raise web.HTTPBadRequest(reason=f"could not decompress the {encoding} body")
        as_json = kind == "application/json"
        try:
            decoded: Decoded = decode_json(body) if as_json else decode_protobuf(body)
        except OtlpError as exc:
            raise web.HTTPBadRequest(reason=str(exc)) from None
        try:
            self.store.add(decoded.spans)
        except StoreFull as exc:
            return _json({"error": str(exc), "status": 503}, 503, **{"Retry-After": "1"})
        self.spans_received += len(decoded.spans)
        self.spans_rejected += decoded.rejected
        response = ExportTraceServiceResponse()
        if decoded.rejected:
            response.partial_success.rejected_spans = decoded.rejected
            response.partial_success.error_message = decoded.first_error
        if as_json:
            body_json: dict[str, Any] = {}
            if decoded.rejected:
                body_json["partialSuccess"] = {
                    "rejectedSpans": str(decoded.rejected),
                    "errorMessage": decoded.first_error,
                }
            return _json(body_json)
        return web.Response(
            body=response.SerializeToString(), content_type="application/x-protobuf"
        )

    # -- API ----------------------------------------------------------------------

    async def _services(self, request: web.Request) -> web.Response:
        return _json({"services": await self._run(queries.services, self.store)})

    async def _search(self, request: web.Request) -> web.Response:
        q = queries.SearchQuery.from_params(request.query)
        return _json({"traces": await self._run(queries.search, self.store, q)})

    async def _trace(self, request: web.Request) -> web.Response:
        trace_id = request.match_info["trace_id"]
        if len(trace_id) != 32 or not all(c in "0123456789abcdefABCDEF" for c in trace_id):
            raise queries.QueryError(f"expected a trace id of 32 hex digits, found {trace_id!r}")
        text = await self._run(queries.get_trace_json, self.store, trace_id)
        if text is None:
            raise web.HTTPNotFound(reason=f"no trace {trace_id} in the store")
        return web.Response(
            text=text, content_type="application/json", headers={"Cache-Control": "no-store"}
        )

    async def _dependencies(self, request: web.Request) -> web.Response:
        window = queries._num(request.query, "window_s")
        end_ms = queries._num(request.query, "end_ms")
        result = await self._run(
            functools.partial(
                queries.dependencies,
                self.store,
                window_s=window if window is not None else 3600,
                end_ms=end_ms,
            )
        )
        return _json(result)

    async def _compare(self, request: web.Request) -> web.Response:
        a, b = request.query.get("a", ""), request.query.get("b", "")
        if not a or not b:
            raise queries.QueryError("expected two trace ids: ?a=…&b=…")
        result = await self._run(queries.compare, self.store, a, b)
        if result is None:
            raise web.HTTPNotFound(reason=f"trace {a} or {b} is not in the store")
        return _json(result)

    async def _stats(self, request: web.Request) -> web.Response:
        result = await self._run(queries.stats, self.store)
        result.update(spans_received=self.spans_received, spans_rejected=self.spans_rejected)
        return _json(result)

    # -- viewer -------------------------------------------------------------------

    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(body=self._static["index.html"], content_type="text/html")

    async def _asset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in _STATIC or name == "index.html":
            raise web.HTTPNotFound(reason=f"no asset {name!r}")
        return web.Response(body=self._static[name], content_type=_STATIC[name])


async def serve(
    db: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 4318,
    max_age: float | None = 7 * 86400,
    max_bytes: int | None = 1 << 30,
    ready: Callable[[Collector], None] | None = None,
) -> None:
    """Run a collector until cancelled, SIGTERM or SIGINT; then write what is queued."""
    store = SpanStore(db, max_age=max_age, max_bytes=max_bytes)
    collector = Collector(store, host=host, port=port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await collector.start()
        if ready is not None:
            ready(collector)
        await stop.wait()
    finally:
        await collector.stop()
        await asyncio.get_running_loop().run_in_executor(None, store.close)
