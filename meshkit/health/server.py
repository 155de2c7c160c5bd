"""The health endpoint every meshkit process serves (DESIGN.md section 2).

``GET /health/live``, ``/health/ready``, ``/metrics`` and ``/info`` over plain HTTP, on
aiohttp's server. The platform probes and scrapes exactly these.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import choose_encoder

from ..tracing.http import trace_context_middleware
from .loopmon import LoopMonitor
from .state import HealthState

__all__ = ["HealthServer"]

log = logging.getLogger(__name__)

_dumps = functools.partial(json.dumps, default=str)
_NO_STORE = {"Cache-Control": "no-store"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _render(
    encoder: Callable[[CollectorRegistry], bytes], registry: CollectorRegistry, gzip_ok: bool
) -> bytes:
    payload = encoder(registry)
    return gzip.compress(payload, compresslevel=6) if gzip_ok else payload


def _accepts_gzip(accept_encoding: str) -> bool:
    """Whether an ``Accept-Encoding`` header allows gzip (explicitly or via ``*``, q > 0)."""
    weights: dict[str, float] = {}
    for item in accept_encoding.split(","):
        name, _, params = item.partition(";")
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        weights[name.strip().lower()] = q
    return weights.get("gzip", weights.get("*", 0.0)) > 0


def _json(body: Mapping[str, Any], status: int = 200, **headers: str) -> web.Response:
    return web.json_response(body, status=status, dumps=_dumps, headers={**_NO_STORE, **headers})


class _DebugAccessLogger(AbstractAccessLogger):
    """Access log at DEBUG: probes arrive every few seconds and are not news."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.debug(
            "%s %s %s %.1fms", request.method, request.path_qs, response.status, time * 1000
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.DEBUG)


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn 404/405 and unexpected exceptions into JSON bodies; the server keeps serving."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}
        body = {"error": exc.reason, "status": exc.status, "path": request.path}
        return _json(body, exc.status, **headers)
    except Exception as exc:
        log.exception("health endpoint %s failed", request.path)
        body = {"error": type(exc).__name__, "message": str(exc), "path": request.path}
        return _json(body, 500)


class HealthServer:
    """HTTP server for ``/health/live``, ``/health/ready``, ``/metrics`` and ``/info``.

    It only reads: ``state`` (owned by the Service), ``registry`` (what ``/metrics``
    renders), ``info()`` (what ``/info`` shows) and, when given, ``loop_monitor``
    (what ``/health/live`` judges by; its owner starts and stops it).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        state: HealthState,
        registry: CollectorRegistry = REGISTRY,
        info: Callable[[], Mapping[str, Any]],
        loop_monitor: LoopMonitor | None = None,
        shutdown_timeout: float = 2.0,
    ) -> None:
        """Configure the server; nothing is bound until :meth:`start`.

        ``port=0`` picks a free port (read it from :attr:`port` after start).
        ``shutdown_timeout`` bounds how long :meth:`stop` waits for requests in flight.
        """
        self.host = host
        self.state = state
        self.registry = registry
        self.loop_monitor = loop_monitor
        self._requested_port = port
        self._info = info
        self._shutdown_timeout = shutdown_timeout
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._bound_host: str | None = None
        self._executor: ThreadPoolExecutor | None = None

    def _make_app(self) -> web.Application:
        # trace_context_middleware: a request with traceparent continues its caller's trace.
        app = web.Application(middlewares=[_json_errors, trace_context_middleware])
        app.router.add_get("/health/live", self._live)
        app.router.add_get("/health/ready", self._ready)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/info", self._info_handler)
        return app

    async def start(self) -> None:
        """Bind and start serving. Raises ``RuntimeError`` if already started."""
        if self._runner is not None:
            raise RuntimeError("HealthServer already started")
        runner = web.AppRunner(
            self._make_app(),
            access_log_class=_DebugAccessLogger,
            access_log=logging.getLogger("meshkit.health.access"),
            shutdown_timeout=self._shutdown_timeout,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self._requested_port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshkit-metrics")
        address = runner.addresses[0]
        self._bound_host, self._port = address[0], address[1]
        log.debug("health endpoint listening on %s", self.url)

    async def stop(self) -> None:
        """Stop serving and release the port. Idempotent."""
        runner, self._runner = self._runner, None
        executor, self._executor = self._executor, None
        if runner is not None:
            await runner.cleanup()
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    async def __aenter__(self) -> HealthServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        """The bound port (the free one picked when ``port=0``). Only after :meth:`start`."""
        if self._port is None:
            raise RuntimeError("HealthServer not started")
        return self._port

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8081`` (loopback when bound to all addresses)."""
        host = self._bound_host or self.host
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return f"http://{host}:{self.port}"
        if ip.is_unspecified:
            ip = ipaddress.ip_address("::1" if ip.version == 6 else "127.0.0.1")
        return f"http://[{ip}]:{self.port}" if ip.version == 6 else f"http://{ip}:{self.port}"

    # -- handlers -------------------------------------------------------------------------

    async def _live(self, request: web.Request) -> web.Response:
        mon = self.loop_monitor
        if mon is None:
            return _json({"status": "live", "loop_lag_ms": None})
        body: dict[str, Any] = {
            "loop_lag_ms": round(mon.lag_seconds * 1000, 3),
            "loop_lag_max_ms": round(mon.max_lag_recent * 1000, 3),
        }
        if mon.is_live():
            return _json({"status": "live", **body})
        age = mon.since_last_beat
        reason = f"event loop stalled: no beat for {age:.2f}s (limit {mon.stall_after}s)"
        return _json({"status": "stalled", "reason": reason, **body}, 503)

    async def _ready(self, request: web.Request) -> web.Response:
        ok, reason = self.state.ready()
        if ok:
            return _json({"status": "ready"})
        body = {"status": "not_ready", "reason": reason, "phase": self.state.phase.value}
        return _json(body, 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        # Rendering is pure Python and grows with the series count: measured at ~6 ms for
        # 400 lines and ~50 ms for 3,600 (a histogram per method and peer gets there fast),
        # so it runs off the loop, on the server's own single thread (scrapes queue up
        # there instead of competing with the RPC handlers' pool).
        executor = self._executor
        if executor is None:
            raise web.HTTPServiceUnavailable(reason="health server stopping")
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        gzip_ok = _accepts_gzip(request.headers.get("Accept-Encoding", ""))
        loop = asyncio.get_running_loop()
        payload = await loop.run_in_executor(executor, _render, encoder, self.registry, gzip_ok)
        headers = {"Content-Type": content_type, **_NO_STORE}
        if gzip_ok:
            headers["Content-Encoding"] = "gzip"
            headers["Vary"] = "Accept-Encoding"
        return web.Response(body=payload, headers=headers)

    async def _info_handler(self, request: web.Request) -> web.Response:
        info = dict(self._info())
        info["phase"] = self.state.phase.value
        return _json(info)
