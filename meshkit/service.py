"""``meshkit.Service``: the app object that composes RPC, health, registry and logs.

::

    svc = Service("echo", echo.Echo, version="1.0.0")

    @svc.implement
    class Echo:
        async def echo(self, message):
            return message

    svc.run()   # serve RPC + health, register, drain on SIGTERM/SIGINT, exit 0
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Mapping, Sequence
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
        self._stopped = False
        self._owns_registry = False
        self._clients: list[Client] = []
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
        """A client for another service, discovering through this service's registry."""
        if "addr" not in options and "registry" not in options and self.registry is not None:
            options["registry"] = self.registry
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
        # Settings are loaded before the first call can arrive (a ConfigError fails the start).
        await self.config.start(instance_id, {**self.tags, "version": self.version})
        self._config_started = True
        try:
            if self.service is None:
                await self._start_without_rpc(settings)
            else:
                await self._start_serving(settings, advertise, instance_id)
        except BaseException:
            self._config_started = False
            with contextlib.suppress(Exception):
                await self.config.stop()  # no watcher left behind by a failed start
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
        self.health = HealthServer(
            host=settings.health_host or settings.host,
            port=settings.health_port,
            state=self.state,
            registry=self.metrics_registry,
            info=self.info,
            loop_monitor=self.loop_monitor,
        )
        await self.server.start(settings.host, settings.port)
        await self.health.start()
        self.instance = Instance(
            service=self.name,
            instance_id=instance_id,
            host=advertise,
            port=self.server.port,
            health_port=self.health.port,
            version=self.version,
            weight=self.weight,
            tags=self.tags,
            start_time=self.started_at,
        )
        tracing_identity(service=self.name, instance=self.instance.instance_id)  # tracing
        self.state.set_phase(Phase.SERVING)
        if self._registry_arg is not None:
            if isinstance(self._registry_arg, Registry):
                self.registry = self._registry_arg
            else:
                url = None if self._registry_arg is DEFAULT else self._registry_arg
                self.registry = registry_from_url(url or settings.registry or None)
                self._owns_registry = True
            await self.registry.register(self.instance)
            self.state.set_registered(True)
        if self._mq is not None and self._mq.has_subscriptions:
            await self._mq.start()
        log.info(
            "service started",
            service=self.name,
            version=self.version,
            rpc=f"{settings.host}:{self.server.port}",
            health=self.health.url,
            registry=getattr(self.registry, "url", None),
            instance=self.instance.instance_id,
            pipeline=self.server.pipeline.describe(),
        )

    async def _start_without_rpc(self, settings: Settings) -> None:
        """A workers-only process: health endpoint and workers, no RPC, no registration."""
        self.state.requires_registration = False
        self.loop_monitor = LoopMonitor(service=self.name, registry=self.metrics_registry)
        self.loop_monitor.start()
        self.health = HealthServer(
            host=settings.health_host or settings.host,
            port=settings.health_port,
            state=self.state,
            registry=self.metrics_registry,
            info=self.info,
            loop_monitor=self.loop_monitor,
        )
        await self.health.start()
        if self._mq is not None and self._mq.has_subscriptions:
            await self._mq.start()
        self.state.set_phase(Phase.SERVING)
        log.info(
            "service started",
            service=self.name,
            version=self.version,
            health=self.health.url,
            rpc=None,
            workers=[w.group for w in self._mq.workers] if self._mq is not None else [],
        )

    async def stop(self, drain_timeout: float | None = None) -> bool:
        """Drain and stop: not ready → deregister → finish calls in flight → close.

        Returns ``True`` when every call in flight finished within the drain timeout.
        """
        if self._stopped:
            return True
        self._stopped = True
        timeout = self.settings.drain_timeout if drain_timeout is None else drain_timeout
        self.state.set_phase(Phase.DRAINING)
        if self.registry is not None and self.instance is not None:
            try:
                await self.registry.deregister(self.instance)
            except Exception as exc:
                log.warning("deregistration failed", service=self.name, error=str(exc))
            self.state.set_registered(False)
        finished = True
        # RPC calls and MQ messages in flight drain together; the publisher flushes after
        # both, since handlers of either kind may publish.
        workers_drained: asyncio.Task[bool] | None = None
        if self._mq is not None and self._mq.workers:
            workers_drained = asyncio.create_task(self._mq.drain(timeout))
        if self.server is not None:
            in_flight = self.server.in_flight
            finished = await self.server.drain(timeout)
            log.info(
                "service drained",
                service=self.name,
                calls_in_flight_at_stop=in_flight,
                finished=finished,
            )
        if workers_drained is not None:
            finished = await workers_drained and finished
        if self._mq is not None:
            await self._mq.close(timeout)
        self.state.set_phase(Phase.STOPPED)
        for client in self._clients:
            try:
                await client.close()
            except Exception as exc:
                log.warning("closing a client failed", service=self.name, error=str(exc))
        if self._config_started:
            self._config_started = False
            try:
                await self.config.stop()
            except Exception as exc:
                log.warning("stopping the config watcher failed", service=self.name, error=str(exc))
        if self.health is not None:
            await self.health.stop()
        # tracing: export the spans of the last calls before the process goes away.
        await asyncio.get_running_loop().run_in_executor(None, flush_traces)
        if self.loop_monitor is not None:
            await self.loop_monitor.stop()
        if self.registry is not None and self._owns_registry:
            await self.registry.close()
        return finished

    def request_stop(self) -> None:
        """Ask :meth:`serve` to drain and return (safe from signal handlers)."""
        if self._stop_requested is not None:
            self._stop_requested.set()

    async def serve(
        self, host: str | None = None, port: int | None = None, health_port: int | None = None
    ) -> None:
        """Start, run until :meth:`request_stop` (or cancellation), then drain and stop."""
        self._stop_requested = asyncio.Event()
        await self.start(host, port, health_port)
        try:
            await self._stop_requested.wait()
        finally:
            await asyncio.shield(self.stop())

    def run(self) -> None:
        """Serve in the foreground until SIGTERM or SIGINT, then drain and return.

        Uses uvloop when installed and configures logging from ``MESHKIT_LOG_LEVEL``.
        """
        from .logs import configure_logging

        configure_logging(service=self.name, processors=[add_trace_context])
        _loop.run(self._run_with_signals())

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
