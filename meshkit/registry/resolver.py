"""A :class:`~meshkit.rpc.endpoint.Resolver` backed by a :class:`Registry`.

This module is the one place where the registry meets the RPC seam: it maps
:class:`Instance` records to :class:`~meshkit.rpc.endpoint.Endpoint` values. The rest of
:mod:`meshkit.registry` never imports :mod:`meshkit.rpc`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Self

import structlog
from prometheus_client import CollectorRegistry

from ..errors import Unavailable
from ..rpc.endpoint import Endpoint
from .base import Instance, Registry, RegistryStatus, validate_service_name
from .metrics import DiscoveryMetrics

__all__ = ["ChangeCallback", "RegistryResolver", "endpoint_for"]

_log = structlog.get_logger("meshkit.registry")

ChangeCallback = Callable[[tuple[Endpoint, ...]], object]


def endpoint_for(instance: Instance) -> Endpoint:
    """The RPC endpoint of an instance; its version (if any) goes in ``tags["version"]``."""
    tags = dict(instance.tags)
    if instance.version:
        tags["version"] = instance.version
    return Endpoint(
        host=instance.host,
        port=instance.port,
        instance_id=instance.instance_id,
        weight=instance.weight,
        tags=tags,
    )


async def _aclose(iterator: AsyncIterator[object]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


class RegistryResolver:
    """Follows ``service`` in ``registry`` and serves the current endpoints.

    :meth:`start` loads the first snapshot (raising :class:`~meshkit.errors.Unavailable`
    if the registry cannot be reached) and then follows the registry's watch in a
    background task. When the watch fails, the last good snapshot stays in use,
    :attr:`stale` becomes true, one warning is logged for the outage, and the watch is
    reopened with backoff (``initial_backoff`` doubling up to ``max_backoff``); the first
    snapshot after recovery replaces the old one.
    """

    def __init__(
        self,
        registry: Registry,
        service: str,
        *,
        initial_backoff: float = 0.1,
        max_backoff: float = 5.0,
        metrics_registry: CollectorRegistry | None = None,
    ) -> None:
        self.registry = registry
        self.service = validate_service_name(service)
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        #: This resolver's view of the registry (connected = following live changes).
        self.status = RegistryStatus()
        self._instances: list[Instance] = []
        self._endpoints: tuple[Endpoint, ...] = ()
        self._callbacks: list[ChangeCallback] = []
        self._task: asyncio.Task[None] | None = None
        self._started = False
        self._closed = False
        DiscoveryMetrics.get(metrics_registry).track(
            self.service, lambda: len(self._endpoints), lambda: self.stale
        )

    # -- Resolver protocol --------------------------------------------------------------

    def endpoints(self) -> tuple[Endpoint, ...]:
        """The current snapshot (the last good one while the registry is unreachable)."""
        return self._endpoints

    async def start(self) -> None:
        if self._closed:
            raise Unavailable(f"resolver for {self.service!r} is closed")
        if self._started:
            return
        watch = self.registry.watch(self.service)
        try:
            first = await anext(watch)
        except StopAsyncIteration:
            await _aclose(watch)
            raise Unavailable(
                f"registry {self.registry.url} closed before the first snapshot of {self.service!r}"
            ) from None
        except BaseException as exc:
            await _aclose(watch)
            if isinstance(exc, Exception):
                self.status.mark_error(exc)
            raise
        self._started = True
        self.status.mark_ok()
        self._apply(first)
        self._task = asyncio.create_task(
            self._follow(watch), name=f"meshkit-resolver-{self.service}"
        )

    async def close(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- extras -------------------------------------------------------------------------

    @property
    def stale(self) -> bool:
        """True while the snapshot is not being kept up to date (registry unreachable)."""
        return self._started and not self.status.connected

    @property
    def instances(self) -> list[Instance]:
        """The current snapshot as registry records."""
        return list(self._instances)

    def on_change(self, callback: ChangeCallback) -> Callable[[], None]:
        """Call ``callback(endpoints)`` whenever the snapshot changes; returns an unsubscriber.

        Callbacks run in the event loop; exceptions they raise are logged and ignored.
        """
        self._callbacks.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._callbacks.remove(callback)

        return unsubscribe

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- internals ----------------------------------------------------------------------

    def _apply(self, instances: list[Instance]) -> None:
        if instances == self._instances:
            return
        self._instances = list(instances)
        self._endpoints = tuple(endpoint_for(i) for i in instances)
        for callback in list(self._callbacks):
            try:
                callback(self._endpoints)
            except Exception:
                _log.exception("resolver on_change callback failed", service=self.service)

    async def _follow(self, watch: AsyncIterator[list[Instance]]) -> None:
        backoff = self.initial_backoff
        while True:
            try:
                async for snapshot in watch:
                    if self.status.mark_ok():
                        _log.info(
                            "registry reachable again; snapshot refreshed",
                            service=self.service,
                            registry=self.registry.url,
                            endpoints=len(snapshot),
                        )
                    backoff = self.initial_backoff
                    self._apply(snapshot)
            except Exception as exc:
                if self.status.mark_error(exc):
                    _log.warning(
                        "registry watch failed; using last known snapshot",
                        service=self.service,
                        registry=self.registry.url,
                        endpoints=len(self._endpoints),
                        error=str(exc),
                    )
            else:
                # The watch ends only when the registry is closed: nothing more will come.
                self.status.mark_error(f"registry {self.registry.url} was closed")
                _log.info(
                    "registry closed; keeping last known snapshot",
                    service=self.service,
                    registry=self.registry.url,
                )
                return
            finally:
                await _aclose(watch)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff)
            watch = self.registry.watch(self.service)
