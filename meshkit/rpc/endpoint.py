"""Endpoints and the resolver seam between the RPC client and discovery.

``meshkit.rpc`` knows nothing of registries: a client asks a :class:`Resolver`
for the current endpoints of a service. ``meshkit.registry`` provides resolvers
backed by a registry; :class:`StaticResolver` serves fixed addresses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from ..errors import InvalidArgument


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One instance of a service that can take calls."""

    host: str
    port: int
    instance_id: str = ""
    weight: int = 100
    tags: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)
    # ``host:port``, made once: the pick stage reads it on every call.
    address: str = field(init=False, hash=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", f"{self.host}:{self.port}")

    @classmethod
    def parse(cls, address: str) -> Endpoint:
        """Parse ``host:port`` (``[v6]:port`` for IPv6)."""
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise InvalidArgument(f"expected an address of the form host:port, found {address!r}")
        host = host.strip("[]")
        number = int(port)
        if not 0 < number < 65536:
            raise InvalidArgument(
                f"expected a port between 1 and 65535, found {number} in {address!r}"
            )
        return cls(host, number, instance_id=f"{host}:{number}")


@runtime_checkable
class Resolver(Protocol):
    """Where a client learns the endpoints of the service it calls."""

    def endpoints(self) -> Sequence[Endpoint]:
        """The current snapshot (never blocks; may be the last good one)."""
        ...

    async def start(self) -> None:
        """Load the first snapshot and begin following changes."""
        ...

    async def close(self) -> None: ...


class StaticResolver:
    """A fixed list of addresses (``addr=`` on the client, tests, legacy peers)."""

    def __init__(self, endpoints: Sequence[Endpoint | str]) -> None:
        self._endpoints = tuple(
            e if isinstance(e, Endpoint) else Endpoint.parse(e) for e in endpoints
        )
        if not self._endpoints:
            raise InvalidArgument("expected at least one address, found none")

    def endpoints(self) -> Sequence[Endpoint]:
        return self._endpoints

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None
