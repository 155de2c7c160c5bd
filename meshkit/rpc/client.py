"""The RPC clients: :class:`RpcClient` (async) and :class:`SyncClient` (threads).

Both run the same pipeline (deadline → tracing → metrics → accesslog → retry →
pick → transport by default). IDL methods are attributes::

    client = RpcClient(echo.Echo, "echo", resolver=StaticResolver(["127.0.0.1:9090"]))
    await client.echo("hi")
    await client.call("echo", "hi", timeout=0.2, headers={"user-id": "42"})
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import os
import threading
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry

from ..errors import InvalidArgument, StatusCode
from .accesslog import AccessLog
from .balancer import Balancer, PeakEwma
from .breaker import CircuitBreakers
from .connection import ConnectionPool
from .context import CALLER_KEY, CallContext
from .deadline import ClientDeadline
from .endpoint import Resolver
from .fallback import Fallback
from .handler import MethodSpec, method_specs
from .hedge import Hedge, HedgePolicy
from .metrics import MetricsMiddleware, RpcMetrics
from .outlier import OutlierEjection
from .pick import EndpointObserver, EndpointSelector, Pick
from .pipeline import Middleware, Pipeline
from .retry import Retry, RetryPolicy
from .route import RoutingTable
from .theader import ProtocolId
from .tracing import AttemptTracing, TracerHook, Tracing
from .transport import Transport
from .zone import ZonePreference

CLIENT_BREAKER_CODES = frozenset(
    {StatusCode.UNAVAILABLE, StatusCode.DEADLINE_EXCEEDED, StatusCode.INTERNAL}
)


class RpcClient:
    """Async client for one service, resolved through a :class:`Resolver`.

    Safe to share between tasks: calls are multiplexed over pooled connections.
    Create it inside a running event loop, or let the first call start it.

    Default policies: peak-EWMA power-of-two-choices balancing, outlier ejection and
    per-instance circuit breakers (pass ``False`` to turn either off, or your own
    object), retries of unsent calls (and of idempotent methods on UNAVAILABLE),
    zone preference when ``zone=`` or ``MESHKIT_ZONE`` is set, gray-release
    ``routing=`` rules, backup requests (``hedge=HedgePolicy(methods=...)``, idempotent
    methods only) and per-method ``fallbacks=`` when given. Retries and hedges share
    one retry budget.
    """

    def __init__(
        self,
        service: Any,
        name: str,
        *,
        resolver: Resolver,
        timeout: float | None = 5.0,
        retry: RetryPolicy | None = None,
        balancer: Balancer | None = None,
        tracer: TracerHook | None = None,
        middlewares: Sequence[Middleware] | None = None,
        caller: str = "",
        headers: Mapping[str, str] | None = None,
        protocol: str = "binary",
        connect_timeout: float = 1.0,
        connections_per_endpoint: int = 1,
        max_frame_size: int = 16 * 1024 * 1024,
        idempotent: Sequence[str] = (),
        metrics_registry: CollectorRegistry | None = None,
        routing: RoutingTable | None = None,
        breakers: CircuitBreakers | bool = True,
        outliers: OutlierEjection | bool = True,
        zone: str | None = None,
        selectors: Sequence[EndpointSelector] = (),
        hedge: HedgePolicy | None = None,
        fallbacks: Mapping[str, Any] | None = None,
    ) -> None:
        if protocol not in ("binary", "compact"):
            raise InvalidArgument(f"expected protocol 'binary' or 'compact', found {protocol!r}")
        self.service = service
        self.name = name
        self.resolver = resolver
        self.caller = caller
        self.default_headers = dict(headers or {})
        self.specs: dict[str, MethodSpec] = method_specs(service)
        metrics = RpcMetrics.get("client", metrics_registry)
        connections = metrics.connections.labels(name)
        self.pool = ConnectionPool(
            service=name,
            connect_timeout=connect_timeout,
            connections_per_endpoint=connections_per_endpoint,
            max_frame_size=max_frame_size,
            on_count_change=connections.set,
        )
        # The default chain's health policies, for introspection (None when off or custom).
        self.breakers: CircuitBreakers | None = None
        self.outliers: OutlierEjection | None = None
        retry = retry if retry is not None else RetryPolicy()
        if idempotent:
            unknown = sorted(set(idempotent) - set(self.specs))
            if unknown:
                raise InvalidArgument(
                    f"idempotent methods must be IDL methods of {name}, found {unknown}"
                )
            retry = retry.with_idempotent(idempotent)
        if middlewares is None:
            if tracer is None:
                from ..tracing.otel import OTelHook

                tracer = OTelHook()
            balancer = balancer if balancer is not None else PeakEwma()
            chosen: list[EndpointSelector] = []
            watchers: list[EndpointObserver] = []
            if routing is not None:
                chosen.append(routing)  # first: it caches by snapshot identity
            if outliers is not False:
                ejector = (
                    outliers
                    if isinstance(outliers, OutlierEjection)
                    else OutlierEjection(metrics_registry=metrics_registry)
                )
                chosen.append(ejector)
                watchers.append(ejector)
                self.outliers = ejector
            if breakers is not False:
                breaker = (
                    breakers
                    if isinstance(breakers, CircuitBreakers)
                    # Shedding (RESOURCE_EXHAUSTED) is the server protecting itself; the
                    # balancer already steers away from it, and tripping on it would
                    # shut out a lone overloaded instance for reset_timeout.
                    else CircuitBreakers(
                        failure_codes=CLIENT_BREAKER_CODES, metrics_registry=metrics_registry
                    )
                )
                chosen.append(breaker)
                watchers.append(breaker)
                self.breakers = breaker
            chosen.extend(selectors)
            local_zone = zone if zone is not None else os.environ.get("MESHKIT_ZONE") or None
            if local_zone:
                load = getattr(balancer, "load", None)
                chosen.append(ZonePreference(local_zone, load=load, max_load=8.0 if load else None))
            middlewares = [ClientDeadline(timeout)]
            if fallbacks:
                unknown = sorted(set(fallbacks) - set(self.specs))
                if unknown:
                    raise InvalidArgument(
                        f"fallbacks must name IDL methods of {name}, found {unknown}"
                    )
                # Outside metrics and tracing, so they still record the failure.
                middlewares.append(Fallback(fallbacks, metrics_registry=metrics_registry))
            middlewares += [
                Tracing(tracer, "client"),
                MetricsMiddleware(metrics),
                AccessLog("client"),
                Retry(retry, metrics_registry=metrics_registry),
            ]
            if hedge is not None:
                middlewares.append(
                    Hedge(
                        hedge,
                        idempotent_methods=retry.idempotent_methods,
                        budget=retry.budget,
                        metrics_registry=metrics_registry,
                    )
                )
            middlewares.append(AttemptTracing(tracer))  # retries/hedges as child spans
            middlewares.append(Pick(resolver, balancer, selectors=chosen, observers=watchers))
        protocol_id = ProtocolId.BINARY if protocol == "binary" else ProtocolId.COMPACT
        self.pipeline = Pipeline(
            middlewares, Transport(self.pool, self.specs, protocol_id), terminal_name="transport"
        )
        self._started = False
        self._start_lock: asyncio.Lock | None = None
        for method in self.specs:
            if not hasattr(type(self), method):
                setattr(self, method, self._method(method))

    def __getattr__(self, name: str) -> Callable[..., Coroutine[Any, Any, Any]]:
        # IDL methods are set on the instance in __init__; this only runs for other
        # names, and exists so type checkers accept ``client.echo(...)``.
        raise AttributeError(
            f"{type(self).__name__} for {self.__dict__.get('name', '?')!r} has no method {name!r}"
        )

    def _method(self, method: str) -> Callable[..., Coroutine[Any, Any, Any]]:
        # A partial, not a wrapping coroutine: ``client.echo(...)`` is ``call``'s own
        # coroutine, one frame fewer to create, suspend and resume on every call.
        invoke = functools.partial(self.call, method)
        functools.update_wrapper(invoke, self.call, assigned=("__doc__",), updated=())
        invoke.__name__ = method  # type: ignore[attr-defined]
        invoke.__qualname__ = f"{self.name}.{method}"  # type: ignore[attr-defined]
        return invoke

    async def start(self) -> None:
        """Load the first discovery snapshot (done by the first call if not called)."""
        if self._started:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if not self._started:
                await self.resolver.start()
                self._started = True

    def build_args(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        spec = self.specs.get(method)
        if spec is None:
            raise InvalidArgument(
                f"expected one of the methods of {self.name} ({', '.join(self.specs)}), "
                f"found {method!r}"
            )
        if len(args) > len(spec.arg_names):
            raise InvalidArgument(
                f"{self.name}.{method} takes {len(spec.arg_names)} arguments "
                f"({', '.join(spec.arg_names)}), found {len(args)}"
            )
        obj = spec.args_cls()
        for name, value in zip(spec.arg_names, args, strict=False):
            setattr(obj, name, value)
        for name, value in kwargs.items():
            if name not in spec.arg_names:
                raise InvalidArgument(
                    f"{self.name}.{method} has no argument {name!r}; "
                    f"expected one of {', '.join(spec.arg_names) or '(none)'}"
                )
            setattr(obj, name, value)
        return obj

    async def call(
        self,
        method: str,
        /,
        *args: Any,
        timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Call ``method``; ``timeout`` overrides the client default for this call."""
        if not self._started:
            await self.start()
        ctx = CallContext(
            service=self.name,
            method=method,
            args=self.build_args(method, args, kwargs),
            headers={**self.default_headers, **headers} if headers else dict(self.default_headers),
            timeout=timeout,
            oneway=self.specs[method].oneway,
            caller=self.caller,
            idempotent=idempotent,
        )
        if self.caller:
            ctx.headers[CALLER_KEY] = self.caller
        return await self.pipeline(ctx)

    def policy_state(self) -> dict[str, Any]:
        """What the health policies think of the instances: for ``/info`` and debugging.

        ``breakers``: every breaker that is not clean (``{"host:port": state}``);
        ``ejected``: ejected instances and the seconds left (``{"host:port": s}``).
        """
        return {
            "breakers": self.breakers.states() if self.breakers is not None else {},
            "ejected": (
                {k: round(v, 3) for k, v in self.outliers.ejected().items()}
                if self.outliers is not None
                else {}
            ),
        }

    async def close(self) -> None:
        await self.pool.close()
        await self.resolver.close()

    async def __aenter__(self) -> RpcClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} [{self.pipeline.describe()}]>"


class _LoopThread:
    """One background event loop shared by every SyncClient in the process."""

    _lock = threading.Lock()
    _instance: _LoopThread | None = None

    def __init__(self) -> None:
        from .._loop import new_event_loop

        self.loop = new_event_loop()
        self.thread = threading.Thread(target=self._run, name="meshkit-sync-loop", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    @classmethod
    def get(cls) -> _LoopThread:
        with cls._lock:
            if cls._instance is None or not cls._instance.thread.is_alive():
                cls._instance = cls()
            return cls._instance

    def submit(self, factory: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        """Run ``factory()`` on the loop in the caller's context; block for the result."""
        if threading.current_thread() is self.thread:
            raise RuntimeError("a SyncClient cannot be called from its own event loop thread")
        context = contextvars.copy_context()
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def start() -> None:
            task = context.run(self.loop.create_task, factory())

            def finish(t: asyncio.Task[Any]) -> None:
                if t.cancelled():
                    done.cancel()
                elif (exc := t.exception()) is not None:
                    done.set_exception(exc)
                else:
                    done.set_result(t.result())

            task.add_done_callback(finish)

        self.loop.call_soon_threadsafe(start)
        return done.result()


class SyncClient:
    """Blocking client for code without an event loop (threads, scripts, WSGI).

    Thread-safe: all threads share one multiplexed client running on a
    background event loop. Deadlines and trace context of the calling thread are
    carried into the call.
    """

    def __init__(self, service: Any, name: str, **options: Any) -> None:
        self._runner = _LoopThread.get()
        factory: Callable[..., RpcClient] = options.pop("client_factory", RpcClient)

        async def make() -> RpcClient:
            return factory(service, name, **options)

        self._client: RpcClient = self._runner.submit(make)
        self.name = name
        for method in self._client.specs:
            if not hasattr(type(self), method):
                setattr(self, method, self._method(method))

    def __getattr__(self, name: str) -> Callable[..., Any]:
        # See RpcClient.__getattr__: lets type checkers accept ``client.echo(...)``.
        raise AttributeError(
            f"{type(self).__name__} for {self.__dict__.get('name', '?')!r} has no method {name!r}"
        )

    def _method(self, method: str) -> Callable[..., Any]:
        def invoke(*args: Any, **kwargs: Any) -> Any:
            return self.call(method, *args, **kwargs)

        invoke.__name__ = method
        return invoke

    def call(self, method: str, /, *args: Any, **kwargs: Any) -> Any:
        return self._runner.submit(lambda: self._client.call(method, *args, **kwargs))

    @property
    def pipeline(self) -> Pipeline:
        return self._client.pipeline

    def close(self) -> None:
        self._runner.submit(self._client.close)

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
