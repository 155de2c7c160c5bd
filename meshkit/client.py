"""``meshkit.Client`` and ``meshkit.SyncClient``: RPC clients wired to discovery.

``Client(echo.Echo, "echo")`` finds instances of ``echo`` in the registry named
by ``MESHKIT_REGISTRY`` (default ``local://``), balances, retries and traces.
``addr="host:port"`` (or a list) skips discovery.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .registry import Registry, RegistryResolver, registry_from_url
from .rpc.client import RpcClient
from .rpc.client import SyncClient as _SyncClient
from .rpc.endpoint import Resolver, StaticResolver

_process_service = ""


def set_process_service(name: str) -> None:
    """Name the service this process runs, sent as ``meshkit-caller`` by its clients."""
    global _process_service
    _process_service = name


class Client(RpcClient):
    """Async RPC client for one service. See :class:`meshkit.rpc.client.RpcClient`."""

    def __init__(
        self,
        service: Any,
        name: str,
        *,
        addr: str | Sequence[str] | None = None,
        registry: Registry | str | None = None,
        resolver: Resolver | None = None,
        caller: str | None = None,
        **options: Any,
    ) -> None:
        self._owned_registry: Registry | None = None
        if resolver is None:
            if addr is not None:
                resolver = StaticResolver([addr] if isinstance(addr, str) else list(addr))
            elif isinstance(registry, Registry):
                resolver = RegistryResolver(registry, name)
            else:
                self._owned_registry = registry_from_url(registry)
                resolver = RegistryResolver(self._owned_registry, name)
        super().__init__(
            service,
            name,
            resolver=resolver,
            caller=_process_service if caller is None else caller,
            **options,
        )

    async def close(self) -> None:
        await super().close()
        if self._owned_registry is not None:
            await self._owned_registry.close()


class SyncClient(_SyncClient):
    """Blocking, thread-safe RPC client with the same options as :class:`Client`."""

    def __init__(self, service: Any, name: str, **options: Any) -> None:
        options.setdefault("client_factory", Client)
        super().__init__(service, name, **options)
