"""Fallbacks: answer with a default instead of failing when the service is unreachable.

``Fallback({"get_profile": EMPTY_PROFILE, "recommend": lambda ctx, err: []})``
turns a call of a listed method that failed for lack of service (by default
UNAVAILABLE, NO_INSTANCES, CIRCUIT_OPEN, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED)
into the method's fallback. A fallback is either

* a value, returned as is (the same object every time: use a callable when
  callers may mutate it), or
* a callable ``(ctx, error) -> value`` or ``-> awaitable``; if it raises, that
  exception goes to the caller (chained to the original error).

Exceptions declared in the IDL are answers from the service, never failures, and
always reach the caller; so do errors with other codes (INVALID_ARGUMENT,
INTERNAL, …) and cancellation. A fallback sets ``ctx.extras["fallback"] = True``,
counts ``meshkit_rpc_client_fallbacks_total{service,method,code}`` and logs a
warning with the original error, at most once per ``log_interval`` seconds per
method (the line says how many were not logged since the last one).

Place it before (outside) tracing and metrics: ``deadline → fallback → tracing →
metrics → …``. The call's span and the request metrics then still record the
failure, and only the caller sees the fallback.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter

from .._metrics import PerRegistry
from ..errors import MeshkitError, StatusCode
from .context import CallContext
from .pipeline import Next

log = structlog.get_logger("meshkit.rpc.client")

#: The status codes that mean "the service could not answer", replaced by default.
DEFAULT_FALLBACK_CODES: frozenset[StatusCode] = frozenset(
    {
        StatusCode.UNAVAILABLE,
        StatusCode.NO_INSTANCES,
        StatusCode.CIRCUIT_OPEN,
        StatusCode.DEADLINE_EXCEEDED,
        StatusCode.RESOURCE_EXHAUSTED,
    }
)

#: A fallback: a value, or ``(ctx, error) -> value | awaitable``.
FallbackFn = Callable[[CallContext, MeshkitError], Any | Awaitable[Any]]


class FallbackMetrics(PerRegistry):
    """``meshkit_rpc_client_fallbacks_total{service,method,code}`` in one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.fallbacks = Counter(
            "meshkit_rpc_client_fallbacks",
            "RPC client calls answered by a fallback, by called service, method and the "
            "status code of the failure replaced",
            ["service", "method", "code"],
            registry=registry,
        )


class Fallback:
    """Replace failures of listed methods with their fallback (see the module doc)."""

    name = "fallback"

    def __init__(
        self,
        per_method: Mapping[str, Any],
        *,
        on: Iterable[StatusCode] = DEFAULT_FALLBACK_CODES,
        log_interval: float = 10.0,
        metrics_registry: CollectorRegistry | None = None,
    ) -> None:
        self.per_method: dict[str, Any] = dict(per_method)
        self.on = frozenset(on)
        self.log_interval = log_interval
        self.metrics = FallbackMetrics.get(metrics_registry)
        self._counters: dict[tuple[str, str, str], Any] = {}
        self._log_after: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}

    async def __call__(self, ctx: CallContext, call_next: Next) -> Any:
        if ctx.method not in self.per_method:
            return await call_next(ctx)
        try:
            return await call_next(ctx)
        except MeshkitError as exc:
            if exc.code not in self.on:
                raise
            return await self._fallback(ctx, exc)

    async def _fallback(self, ctx: CallContext, error: MeshkitError) -> Any:
        fallback = self.per_method[ctx.method]
        value = fallback(ctx, error) if callable(fallback) else fallback
        if inspect.isawaitable(value):
            value = await value
        ctx.extras["fallback"] = True
        self._record(ctx, error)
        return value

    def _record(self, ctx: CallContext, error: MeshkitError) -> None:
        key = (ctx.service, ctx.method, error.code.value)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = self.metrics.fallbacks.labels(*key)
        counter.inc()
        now = time.monotonic()
        method = ctx.method
        if now < self._log_after.get(method, 0.0):
            self._unlogged[method] = self._unlogged.get(method, 0) + 1
            return
        self._log_after[method] = now + self.log_interval
        log.warning(
            "rpc call failed, answered with its fallback",
            service=ctx.service,
            method=method,
            peer=ctx.peer,
            code=error.code.value,
            error=error.message,
            not_logged_since_last=self._unlogged.pop(method, 0),
        )
