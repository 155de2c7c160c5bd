"""``meshkit.Service``: the app object that composes RPC, health, registry and logs.

::

    svc = Service("echo", echo.Echo, version="1.0.0")

    @svc.implement
    class Echo:
        async def echo(self, message):
            return message

    svc.run()   # serve RPC + health, register, drain on SIGTERM/SIGINT
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import time
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, TypeVar

import structlog
from prometheus_client import REGISTRY, CollectorRegistry
from pydantic import BaseModel

from . import _loop
from .client import Client, set_process_service
from .config import ServiceConfig
from .config.manager import DEFAULT as _CONFIG_DEFAULT
from .config.store import ConfigStore
from .errors import ConfigError
from .health import HealthServer, HealthState, LoopMonitor, Phase
from .logs import bind_identity
from .registry import Instance, Registry, new_instance_id, registry_from_url
from .rpc.pipeline import Middleware
from .rpc.server import RpcServer
from .rpc.tracing import TracerHook
from .settings import Settings, parse_tags
from .tracing.logcontext import add_trace_context
from .tracing.provider import flush as flush_traces
from .tracing.provider import set_identity as tracing_identity
from .tracing.provider import setup_tracing

T = TypeVar("T")

log = structlog.get_logger("meshkit.service")


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Any = _Default()


class Service:
    """One Thrift service: its implementation, its server, and its place in the mesh.

    ``service`` (the Thrift service class) may be omitted for a process that only runs
    Kafka workers (``@svc.subscribe``): it then serves health and metrics, runs its
    workers and does not register (there is no RPC endpoint to discover).
    ``registry``: a :class:`~meshkit.registry.Registry`, a URL, ``DEFAULT``
    (``MESHKIT_REGISTRY`` or ``local://``) or ``None`` (do not register).
    ``config``: the settings schema (a pydantic model; see :mod:`meshkit.config`), followed
    in ``config_store`` (default ``MESHKIT_CONFIG`` or ``local://``; with no schema, only
    when ``MESHKIT_CONFIG`` is set), layered with ``config_file`` and ``config_overrides``.
    Listening addresses come from arguments, then ``MESHKIT_*`` variables.
    """

    def __init__(
        self,
        name: str,
        service: Any = None,
        *,
        version: str = "0.0.0",
        registry: Registry | str | None = DEFAULT,
        host: str | None = None,
        port: int | None = None,
        health_port: int | None = None,
        tags: Mapping[str, str] | None = None,
        weight: int = 100,
        drain_timeout: float | None = None,
        max_concurrency: int | None = None,
        default_timeout: float | None = None,
        middlewares: Sequence[Middleware] | None = None,
        tracer: TracerHook | None = None,
        metrics_registry: CollectorRegistry | None = None,
        settings: Settings | None = None,
        config: type[BaseModel] | ServiceConfig[Any] | None = None,
        config_store: ConfigStore | str | None = DEFAULT,
        config_file: str | os.PathLike[str] | None = None,
        config_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.service = service
        self.version = version
        self.tags = {**parse_tags(os.environ.get("MESHKIT_TAGS", "")), **(tags or {})}
        self.weight = weight
        base = settings if settings is not None else Settings.from_env()
        self.settings = base.with_overrides(
            host=host,
            port=port,
            health_port=health_port,
            drain_timeout=drain_timeout,
            max_concurrency=max_concurrency,
        )
        self.settings.validate()
        self._registry_arg = registry
        self.registry: Registry | None = None
        self.default_timeout = default_timeout
        self.middlewares = middlewares
        self.tracer = tracer
        self.metrics_registry = metrics_registry if metrics_registry is not None else REGISTRY
        self.implementation: Any = None
        self.instance: Instance | None = None
        self.state = HealthState(requires_registration=registry is not None)
        self.server: RpcServer | None = None
        self.health: HealthServer | None = None
        self.loop_monitor: LoopMonitor | None = None
        self.started_at = time.time()
        self._stop_requested: asyncio.Event | None = None
        self._force_stop = asyncio.Event()  # a second signal: stop draining now
        self._signalled = False
        self._stopped = False
        self._registering = False  # register() was called: stop() must deregister
        self._bind_log_identity = False  # run() configured this process's logging
        #: Whether the last :meth:`serve` ran its whole course: started, then drained with
        #: every call finished. :meth:`run` exits non-zero when it did not.
        self.clean_exit = True
        self._owns_registry = False
        self._clients: list[Client] = []
        if isinstance(registry, Registry):
            self.registry = registry
        # -- live configuration (meshkit.config) ----------------------------------------
        #: The service's settings: ``svc.config.value``, ``@svc.config.on_change``.
        self.config: ServiceConfig[Any]
        if isinstance(config, ServiceConfig):
            self.config = config
        else:
            if config_store is DEFAULT and config is None and not os.environ.get("MESHKIT_CONFIG"):
                config_store = None  # no schema and no store named: nothing to follow
            self.config = ServiceConfig(
                name,
                config,
                store=_CONFIG_DEFAULT if config_store is DEFAULT else config_store,
                file=config_file,
                overrides=config_overrides,
                metrics_registry=self.metrics_registry,
            )
        self._config_started = False
        # -- MQ (meshkit.mq, imported lazily: confluent-kafka is an optional extra) --
        self._mq: Any = None

    # -- building ----------------------------------------------------------

    def implement(self, implementation: T) -> T:
        """Bind the implementation: an object, or a class (instantiated with no arguments).

        Usable as a decorator; returns its argument unchanged.
        """
        self.implementation = (
            implementation() if isinstance(implementation, type) else implementation
        )
        return implementation

    def client(self, service: Any, name: str, **options: Any) -> Client:
        """A client for another service, discovering through this service's registry.

        Usable before :meth:`start` (e.g. at module level): the registry object is built
        then (building one opens no connection) and :meth:`start` registers in that same one.
        """
        if "addr" not in options and "registry" not in options:
            registry = self._get_registry(self.settings)
            if registry is not None:
                options["registry"] = registry
        options.setdefault("caller", self.name)
        client = Client(service, name, **options)
        self._clients.append(client)
        return client

    # -- MQ: Kafka workers and publishing -------------------------------------

    @property
    def mq(self) -> Any:
        """The :class:`meshkit.mq.runtime.MqRuntime` (created on first use)."""
        if self._mq is None:
            from .mq.runtime import MqRuntime

            self._mq = MqRuntime(
                self.name,
                self.settings.mq or None,
                metrics_registry=self.metrics_registry,
                drain_timeout=self.settings.drain_timeout,
            )
        return self._mq

    def subscribe(self, topic: str, **options: Any) -> Any:
        """Decorator: handle messages of ``topic`` with ``async def handler(msg, ctx)``.

        Options: ``group`` (default: the service name), ``model`` (payload type: a
        pydantic model, dataclass, Thrift struct, ``bytes``, or ``None`` for plain JSON),
        ``codec``, ``retry`` (a :class:`meshkit.mq.RetryPolicy`), and worker options
        (``concurrency``, ``max_buffered``, ``config``, …; see :class:`meshkit.mq.Worker`).
        Workers start with the service and drain when it stops.
        """
        return self.mq.subscribe(topic, **options)

    async def publish(self, topic: str, value: Any, **options: Any) -> Any:
        """Publish ``value`` to ``topic`` and wait for the broker (``key=``, ``headers=``,
        ``codec=``); see :meth:`meshkit.mq.Publisher.publish`."""
        return await self.mq.publish(topic, value, **options)

    # -- lifecycle -----------------------------------------------------------

    def _get_registry(self, settings: Settings) -> Registry | None:
        """The service's registry object, built once from the argument or settings."""
        if self.registry is None and self._registry_arg is not None:
            if isinstance(self._registry_arg, Registry):
                self.registry = self._registry_arg
            else:
                url = None if self._registry_arg is DEFAULT else self._registry_arg
                self.registry = registry_from_url(url or settings.registry or None)
                self._owns_registry = True
        return self.registry

    @property
    def port(self) -> int:
        if self.server is None:
            raise RuntimeError("the service has not started")
        return self.server.port

    @property
    def health_port(self) -> int:
        if self.health is None:
            raise RuntimeError("the service has not started")
        return self.health.port

    async def start(
        self, host: str | None = None, port: int | None = None, health_port: int | None = None
    ) -> None:
        """Start serving RPC and health, then register. Returns once ready."""
        if self.implementation is None and self.service is not None:
            raise ConfigError(
                f"service {self.name!r} has no implementation: use @svc.implement on a class "
                "or object that defines the IDL methods"
            )
        settings = self.settings.with_overrides(host=host, port=port, health_port=health_port)
        settings.validate()
        self.settings = settings
        set_process_service(self.name)
        tracing_identity(service=self.name)  # tracing: names the spans' service
        setup_tracing()  # tracing: MESHKIT_TRACES set → install the provider (bad value: fail now)
        self.state.set_phase(Phase.STARTING)
        advertise = settings.advertise_host or settings.host
        if advertise in ("0.0.0.0", "::", ""):
            advertise = "127.0.0.1"
        instance_id = new_instance_id(self.name, advertise)
        if self._bind_log_identity:
            bind_identity(service=self.name, instance=instance_id)  # every line from here on
        try:
            # Settings are loaded before the first call can arrive (a ConfigError fails the
            # start).
            self._config_started = True
            await self.config.start(instance_id, {**self.tags, "version": self.version})
            if self.service is None:
                await self._start_without_rpc(settings)
            else:
                await self._start_serving(settings, advertise, instance_id)
        except BaseException as exc:
            # Nothing started stays behind: no registration, listener, watcher or task.
            log.error(
                "start failed, stopping what was started",
                service=self.name,
                error=str(exc) or type(exc).__name__,
            )
            await asyncio.shield(self.stop(drain_timeout=0))
            raise

    async def _start_serving(self, settings: Settings, advertise: str, instance_id: str) -> None:
        self.server = RpcServer(
            self.service,
            self.implementation,
            name=self.name,
            middlewares=self.middlewares,
            max_concurrency=settings.max_concurrency,
            adaptive_concurrency=settings.concurrency == "adaptive",
            default_timeout=self.default_timeout,
            tracer=self.tracer,
            metrics_registry=self.metrics_registry,
        )
        self.loop_monitor = LoopMonitor(service=self.name, registry=self.metrics_registry)
        self.loop_monitor.start()
        await _listen(
            "RPC",
            f"{settings.host}:{settings.port}",
            "MESHKIT_HOST / --host, MESHKIT_PORT / --port",
            self.server.start(settings.host, settings.port),
        )
        health = await self._start_health(settings)
        self.instance = Instance(
            service=self.name,
            instance_id=instance_id,
            host=advertise,
            port=self.server.port,
            health_port=health.port,
            version=self.version,
            weight=self.weight,
            tags=self.tags,
            start_time=self.started_at,
        )
        tracing_identity(service=self.name, instance=self.instance.instance_id)  # tracing
        # Workers first: the instance is discoverable and ready only once all of it runs.
        if self._mq is not None and self._mq.has_subscriptions:
            await self._mq.start()
        registry = self._get_registry(settings)
        if registry is not None:
            self._registering = True
            await registry.register(self.instance)
            self.state.set_registered(True)
        self.state.set_phase(Phase.SERVING)
        log.info(
            "service started",
            service=self.name,
            version=self.version,
            rpc=f"{settings.host}:{self.server.port}",
            health=health.url,
            registry=getattr(self.registry, "url", None),
            instance=self.instance.instance_id,
            pipeline=self.server.pipeline.describe(),
        )

    async def _start_without_rpc(self, settings: Settings) -> None:
        """A workers-only process: health endpoint and workers, no RPC, no registration."""
        self.state.requires_registration = False
        self.loop_monitor = LoopMonitor(service=self.name, registry=self.metrics_registry)
        self.loop_monitor.start()
        health = await self._start_health(settings)
        if self._mq is not None and self._mq.has_subscriptions:
            await self._mq.start()
        self.state.set_phase(Phase.SERVING)
        log.info(
            "service started",
            service=self.name,
            version=self.version,
            health=health.url,
            rpc=None,
            workers=[w.group for w in self._mq.workers] if self._mq is not None else [],
        )

    async def _start_health(self, settings: Settings) -> HealthServer:
        self.health = health = HealthServer(
            host=settings.health_host or settings.host,
            port=settings.health_port,
            state=self.state,
            registry=self.metrics_registry,
            info=self.info,
            loop_monitor=self.loop_monitor,
        )
        await _listen(
            "health",
            f"{settings.health_host or settings.host}:{settings.health_port}",
            "MESHKIT_HEALTH_HOST (else MESHKIT_HOST / --host), MESHKIT_HEALTH_PORT / --health-port",
            health.start(),
        )
        return health

    async def stop(self, drain_timeout: float | None = None) -> bool:
        """Drain and stop: not ready → deregister → finish calls in flight → close.

        Returns ``True`` when every call in flight finished within the drain timeout (and
        no forced stop, :meth:`request_stop` with ``force=True``, cut the drain short).
        Every step runs even when an earlier one fails (the failure is logged).
        """
        if self._stopped:
            return True
        self._stopped = True
        timeout = self.settings.drain_timeout if drain_timeout is None else drain_timeout
        if not math.isfinite(timeout) or timeout < 0:
            log.warning("invalid drain timeout, not waiting", service=self.name, timeout=timeout)
            timeout = 0.0
        self.state.set_phase(Phase.DRAINING)
        if self.registry is not None and self.instance is not None and self._registering:
            self._registering = False
            await self._step("deregistration failed", self.registry.deregister(self.instance))
            self.state.set_registered(False)
        finished = True
        # RPC calls and MQ messages in flight drain together; the publisher flushes after
        # both, since handlers of either kind may publish.
        drains: list[asyncio.Task[bool]] = []
        if self._mq is not None and self._mq.workers:
            drains.append(asyncio.create_task(self._mq.drain(timeout)))
        in_flight = self.server.in_flight if self.server is not None else 0
        if self.server is not None:
            drains.append(asyncio.create_task(self.server.drain(timeout)))
        if drains:
            finished = await self._await_drains(drains)
        if self.server is not None:
            log.info(
                "service drained",
                service=self.name,
                calls_in_flight_at_stop=in_flight,
                finished=finished,
            )
        if self._mq is not None:
            await self._step("closing the publisher failed", self._mq.close(timeout))
        self.state.set_phase(Phase.STOPPED)
        for client in self._clients:
            await self._step("closing a client failed", client.close())
        if self._config_started:
            self._config_started = False
            await self._step("stopping the config watcher failed", self.config.stop())
        if self.health is not None:
            await self._step("stopping the health endpoint failed", self.health.stop())
        # tracing: export the spans of the last calls before the process goes away.
        loop = asyncio.get_running_loop()
        await self._step("flushing traces failed", loop.run_in_executor(None, flush_traces))
        if self.loop_monitor is not None:
            await self._step("stopping the loop monitor failed", self.loop_monitor.stop())
        if self.registry is not None and self._owns_registry:
            await self._step("closing the registry failed", self.registry.close())
        return finished

    async def _await_drains(self, drains: list[asyncio.Task[bool]]) -> bool:
        """Wait for the drains, or until a forced stop: then cut them off (``False``)."""
        forced = asyncio.create_task(self._force_stop.wait())
        try:
            await asyncio.wait({*drains, forced}, return_when=asyncio.FIRST_COMPLETED)
            while not forced.done() and not all(d.done() for d in drains):
                await asyncio.wait(
                    {forced, *(d for d in drains if not d.done())},
                    return_when=asyncio.FIRST_COMPLETED,
                )
        finally:
            forced.cancel()
        finished = True
        if not all(d.done() for d in drains):
            log.warning(
                "forced stop: calls and messages still in flight are abandoned",
                service=self.name,
                in_flight=self.server.in_flight if self.server is not None else 0,
            )
            finished = False
            for d in drains:
                d.cancel()
            if self.server is not None:
                await self._step("closing the RPC server failed", self.server.close())
        for d in drains:
            try:
                finished = await d and finished
            except asyncio.CancelledError:
                finished = False
            except Exception as exc:
                finished = False
                log.warning("draining failed", service=self.name, error=str(exc))
        return finished

    async def _step(self, what: str, step: Awaitable[Any]) -> None:
        try:
            await step
        except Exception as exc:
            log.warning(what, service=self.name, error=str(exc) or type(exc).__name__)

    def request_stop(self, *, force: bool = False) -> None:
        """Ask :meth:`serve` to drain and return (safe from signal handlers).

        ``force=True`` (a second SIGTERM/SIGINT) also cuts a drain under way short: calls
        still running are cancelled and :meth:`stop` returns ``False``.
        """
        if force:
            self._force_stop.set()
        if self._stop_requested is not None:
            self._stop_requested.set()

    async def serve(
        self, host: str | None = None, port: int | None = None, health_port: int | None = None
    ) -> None:
        """Start, run until :meth:`request_stop` (or cancellation), then drain and stop.

        A stop requested while starting abandons the start (everything started is stopped
        and deregistered) and returns; :attr:`clean_exit` is then ``False``, as it is when
        the drain did not finish every call.
        """
        if self._stop_requested is None or self._stop_requested.is_set():
            self._stop_requested = asyncio.Event()
        self.clean_exit = False
        starting = asyncio.create_task(self.start(host, port, health_port))
        stop_wait = asyncio.create_task(self._stop_requested.wait())
        try:
            await asyncio.wait({starting, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            starting.cancel()
            with contextlib.suppress(BaseException):
                await starting  # start() undoes itself when cancelled
            raise
        finally:
            stop_wait.cancel()
        if not starting.done():
            log.warning("stop requested while starting: start abandoned", service=self.name)
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            return
        starting.result()  # a failed start raises here (it has undone itself)
        try:
            await self._stop_requested.wait()
        finally:
            self.clean_exit = await asyncio.shield(self.stop())

    def run(self) -> None:
        """Serve in the foreground until SIGTERM or SIGINT, then drain and return.

        Uses uvloop when installed and configures logging from ``MESHKIT_LOG_LEVEL``.
        A second signal during the drain stops at once. Exits the process with status 1
        (``SystemExit``) when the service did not stop cleanly: calls cut off by the drain
        timeout or a second signal, or a stop requested before the start completed.
        """
        from .logs import configure_logging

        configure_logging(service=self.name, processors=[add_trace_context])
        self._bind_log_identity = True
        _loop.run(self._run_with_signals())
        if not self.clean_exit:
            log.warning(
                "exiting with status 1: the service did not stop cleanly", service=self.name
            )
            raise SystemExit(1)

    async def _run_with_signals(self) -> None:
        loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            await self.serve()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._signalled:
            log.warning(
                "second signal received, stopping now (calls in flight are cancelled)",
                service=self.name,
                signal=sig.name,
            )
            self.request_stop(force=True)
            return
        self._signalled = True
        log.info("signal received, draining", service=self.name, signal=sig.name)
        self.request_stop()

    # -- introspection -------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """What ``/info`` shows: identity, version, addresses, registry status."""
        status = getattr(self.registry, "status", None)
        return {
            "service": self.name,
            "version": self.version,
            "instance": self.instance.to_dict() if self.instance else None,
            "started_at": self.started_at,
            "uptime_s": round(time.time() - self.started_at, 3),
            "registry": {
                "url": getattr(self.registry, "url", None),
                "status": status.to_dict() if status is not None else None,
            },
            "rpc": {
                "pipeline": self.server.pipeline.describe() if self.server else None,
                "in_flight": self.server.in_flight if self.server else 0,
                "connections": len(self.server.connections) if self.server else 0,
            },
            "discovery": [
                {
                    "service": client.name,
                    "instances": len(client.resolver.endpoints()),
                    "stale": bool(getattr(client.resolver, "stale", False)),
                    **client.policy_state(),
                }
                for client in self._clients
            ],
            "config_version": self.config.version,
            "config": self.config.info() if self._config_started else None,
            "mq": self._mq.info() if self._mq is not None else None,
        }


async def _listen(listener: str, address: str, settings: str, start: Awaitable[None]) -> None:
    """Await ``start``; a bind failure names the listener, its address and its settings."""
    try:
        await start
    except OSError as exc:
        raise OSError(
            exc.errno,
            f"cannot listen for {listener} on {address} (set by {settings}): {exc.strerror or exc}",
        ) from exc
