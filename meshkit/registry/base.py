"""The registry interface: instance records, the :class:`Registry` contract, status.

A registry stores one :class:`Instance` record per running instance of a service and
tells watchers when the set changes. Backends (``local://`` here; etcd and Consul later)
differ in how records are kept alive (heartbeats, leases, TTL checks) and watched
(polling, revisions, blocking queries), not in what callers see.

This package knows nothing of RPC; :mod:`meshkit.registry.resolver` adapts a registry to
the RPC client's resolver seam.
"""

from __future__ import annotations

import abc
import os
import re
import secrets
import socket
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from ..errors import InvalidArgument

__all__ = [
    "Instance",
    "Registry",
    "RegistryStatus",
    "new_instance_id",
    "validate_instance_id",
    "validate_service_name",
]

_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")
MAX_SERVICE_NAME = 128
MAX_INSTANCE_ID = 200


def _check_name(kind: str, name: object, limit: int) -> str:
    if not isinstance(name, str):
        raise InvalidArgument(f"expected {kind} to be a string, found {type(name).__name__}")
    if not name or len(name) > limit or not _NAME_RE.fullmatch(name) or name.startswith("."):
        raise InvalidArgument(
            f"expected {kind} of 1 to {limit} characters from [A-Za-z0-9._-], "
            f"not starting with '.', found {name!r}"
        )
    return name


def validate_service_name(name: object) -> str:
    """Return ``name`` if it is a valid service name, else raise :class:`InvalidArgument`.

    Valid: 1 to 128 characters from ``[A-Za-z0-9._-]``, not starting with ``.``; such a name
    is safe as a path component, an etcd key segment and a Consul service name.
    """
    return _check_name("a service name", name, MAX_SERVICE_NAME)


def validate_instance_id(instance_id: object) -> str:
    """Return ``instance_id`` if valid (as service names, up to 200 characters)."""
    return _check_name("an instance id", instance_id, MAX_INSTANCE_ID)


def new_instance_id(service: str, host: str | None = None) -> str:
    """A fresh instance id: ``<service>-<host>-<pid>-<random>``, safe for any backend."""
    validate_service_name(service)
    raw_host = host if host is not None else socket.gethostname()
    safe_host = re.sub(r"[^A-Za-z0-9._-]+", "-", raw_host).strip(".-") or "host"
    suffix = f"-{os.getpid()}-{secrets.token_hex(3)}"
    head = f"{service}-{safe_host}"[: MAX_INSTANCE_ID - len(suffix)]
    return head + suffix


def _expect_type(name: str, value: object, kind: type | tuple[type, ...], what: str) -> None:
    # bool is an int subclass: never accept it where a number is expected.
    if isinstance(value, bool) or not isinstance(value, kind):
        raise InvalidArgument(
            f"expected instance field {name!r} to be {what}, found {type(value).__name__} {value!r}"
        )


@dataclass(frozen=True, slots=True)
class Instance:
    """One running instance of a service, as stored in the registry (JSON-safe)."""

    service: str
    instance_id: str
    host: str
    port: int
    health_port: int = 0
    protocol: str = "thrift-theader"
    version: str = ""
    weight: int = 100
    tags: Mapping[str, str] = field(default_factory=dict, hash=False)
    start_time: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        validate_service_name(self.service)
        validate_instance_id(self.instance_id)
        _expect_type("host", self.host, str, "a non-empty string")
        if not self.host:
            raise InvalidArgument("expected instance field 'host' to be non-empty, found ''")
        _expect_type("port", self.port, int, "an integer")
        if not 0 < self.port < 65536:
            raise InvalidArgument(f"expected 'port' between 1 and 65535, found {self.port}")
        _expect_type("health_port", self.health_port, int, "an integer")
        if not 0 <= self.health_port < 65536:
            raise InvalidArgument(
                f"expected 'health_port' between 0 (none) and 65535, found {self.health_port}"
            )
        _expect_type("protocol", self.protocol, str, "a string")
        _expect_type("version", self.version, str, "a string")
        _expect_type("weight", self.weight, int, "an integer")
        if self.weight < 0:
            raise InvalidArgument(f"expected 'weight' >= 0, found {self.weight}")
        if not isinstance(self.tags, Mapping):
            raise InvalidArgument(
                f"expected instance field 'tags' to be a mapping of strings, "
                f"found {type(self.tags).__name__}"
            )
        tags = dict(self.tags)
        for key, value in tags.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise InvalidArgument(
                    f"expected instance tags to map strings to strings, found {key!r}: {value!r}"
                )
        object.__setattr__(self, "tags", tags)
        _expect_type("start_time", self.start_time, (int, float), "a number")
        object.__setattr__(self, "start_time", float(self.start_time))

    @property
    def address(self) -> str:
        """``host:port`` (``[v6]:port`` for IPv6 hosts) of the RPC endpoint."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def to_dict(self) -> dict[str, Any]:
        """The record as a JSON-safe dict."""
        return {
            "service": self.service,
            "instance_id": self.instance_id,
            "host": self.host,
            "port": self.port,
            "health_port": self.health_port,
            "protocol": self.protocol,
            "version": self.version,
            "weight": self.weight,
            "tags": dict(self.tags),
            "start_time": self.start_time,
        }

    @classmethod
    def from_dict(cls, data: object) -> Instance:
        """Parse a record; unknown keys are ignored (backends may add their own).

        Raises :class:`InvalidArgument` naming the field that is missing or mistyped.
        """
        if not isinstance(data, Mapping):
            raise InvalidArgument(
                f"expected an instance record (JSON object), found {type(data).__name__}"
            )
        missing = [k for k in ("service", "instance_id", "host", "port") if k not in data]
        if missing:
            raise InvalidArgument(
                f"expected instance record fields {', '.join(missing)}, found keys "
                f"{sorted(str(k) for k in data)}"
            )
        kwargs: dict[str, Any] = {}
        for name in cls.__dataclass_fields__:
            if name in data:
                kwargs[name] = data[name]
        # A missing start time must not read as "now": snapshots would never compare equal.
        kwargs.setdefault("start_time", 0.0)
        if "tags" in kwargs and not isinstance(kwargs["tags"], Mapping):
            raise InvalidArgument(
                f"expected instance field 'tags' to be an object, "
                f"found {type(kwargs['tags']).__name__}"
            )
        return cls(**kwargs)


@dataclass(slots=True)
class RegistryStatus:
    """How a registry backend (or a resolver following it) is faring.

    Backends update it on every round trip; it lets clients report "using last known
    snapshot" in logs, metrics and ``/info``.
    """

    connected: bool = False
    #: The most recent error (kept after recovery, for diagnostics).
    last_error: str | None = None
    #: ``time.time()`` of the last successful round trip (0 if none yet).
    last_ok: float = 0.0

    def mark_ok(self) -> bool:
        """Record a success. True if this ends an outage."""
        recovered = not self.connected and self.last_error is not None
        self.connected = True
        self.last_ok = time.time()
        return recovered

    def mark_error(self, error: BaseException | str) -> bool:
        """Record a failure. True if this starts an outage (first failure in a row)."""
        started = self.connected or self.last_error is None
        self.connected = False
        self.last_error = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        return started

    def to_dict(self) -> dict[str, Any]:
        return {"connected": self.connected, "last_error": self.last_error, "last_ok": self.last_ok}


class Registry(abc.ABC):
    """Where instances publish themselves and clients discover them.

    Contract for every backend:

    * :meth:`register` publishes a record and keeps it alive (heartbeat, lease, TTL check)
      until :meth:`deregister` or :meth:`close`; if the record vanishes meanwhile (lease
      expired during an outage, file deleted, agent restarted) the backend re-creates it.
    * :meth:`resolve` returns the live instances now, sorted by instance id; it raises
      :class:`~meshkit.errors.Unavailable` if the backend cannot be reached.
    * :meth:`watch` yields the current snapshot first, then a new full snapshot on every
      change (never two equal snapshots in a row). It ends when the registry is closed and
      raises :class:`~meshkit.errors.Unavailable` if the backend becomes unreachable; the
      caller keeps its last good snapshot and opens a new watch later.
    * :meth:`close` stops keep-alives, withdraws this registry's own registrations
      (best effort) and ends watches.
    * ``status`` tracks connectivity for logs, metrics and ``/info``.
    """

    url: str
    status: RegistryStatus

    def __init__(self, url: str) -> None:
        self.url = url
        self.status = RegistryStatus()

    @abc.abstractmethod
    async def register(self, instance: Instance) -> None:
        """Publish ``instance`` and keep it alive until deregistered or closed."""

    @abc.abstractmethod
    async def deregister(self, instance: Instance) -> None:
        """Withdraw ``instance`` and stop keeping it alive (no error if absent)."""

    @abc.abstractmethod
    async def resolve(self, service: str) -> list[Instance]:
        """The live instances of ``service``, sorted by instance id."""

    @abc.abstractmethod
    def watch(self, service: str) -> AsyncIterator[list[Instance]]:
        """Snapshots of ``service``: the current one, then one per change."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop keep-alives, withdraw own registrations, end watches. Idempotent."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"
