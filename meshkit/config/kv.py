"""The key-value interface every config store backend implements.

The versioned layout (:mod:`meshkit.config.store`) is written once on top of this small
interface, so etcd, Consul KV and the ``local://`` file store only have to provide:

* ``get``/``scan`` with the store's **revision** (a number that grows with every write:
  etcd's revision, Consul's raft index, the local store's journal counter);
* ``txn``: compare the *modification revision* of some keys (``0`` means "absent"), and
  only if every comparison holds, apply puts and deletes atomically. Creating a key only
  if absent and compare-and-swap are both expressed with it;
* ``watch``: batches of events under a prefix from a start revision, in store order.
  A watch raises :class:`Compacted` when the store no longer has the history since the
  start revision (the caller lists again) and :class:`~meshkit.errors.Unavailable` when
  the store cannot be reached (the caller resumes from the last revision it saw).

Keys are ``/``-separated strings of path-safe segments; values are UTF-8 text (JSON).
"""

from __future__ import annotations

import abc
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal

from ..errors import InvalidArgument, MeshkitError, StatusCode

__all__ = [
    "KV",
    "Compacted",
    "Delete",
    "Entry",
    "Event",
    "Listing",
    "Put",
    "validate_key",
    "validate_prefix",
]

_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,199}")


def validate_key(key: str) -> str:
    """Return ``key`` if every ``/``-separated segment is path-safe, else raise."""
    if not isinstance(key, str) or not key:
        raise InvalidArgument(f"expected a non-empty config key, found {key!r}")
    for segment in key.split("/"):
        if not _SEGMENT.fullmatch(segment):
            raise InvalidArgument(
                f"expected config key segments of [A-Za-z0-9._-] (not starting with '.' or "
                f"'-'), found {segment!r} in {key!r}"
            )
    return key


def validate_prefix(prefix: str) -> str:
    """A list/watch prefix: a valid key followed by ``/``."""
    if not isinstance(prefix, str) or not prefix.endswith("/"):
        raise InvalidArgument(f"expected a config key prefix ending in '/', found {prefix!r}")
    validate_key(prefix[:-1])
    return prefix


class Compacted(MeshkitError):
    """The store no longer holds the history a watch asked for: list again."""

    code = StatusCode.UNAVAILABLE


@dataclass(frozen=True, slots=True)
class Entry:
    """One key's value and the revision of its last modification."""

    key: str
    value: str
    mod_revision: int


@dataclass(frozen=True, slots=True)
class Listing:
    """The entries under a prefix, read at store revision ``revision``."""

    entries: dict[str, Entry]
    revision: int


@dataclass(frozen=True, slots=True)
class Event:
    """A put or delete of ``key`` at ``revision`` (``value`` is ``None`` for deletes)."""

    kind: Literal["put", "delete"]
    key: str
    value: str | None
    revision: int


@dataclass(frozen=True, slots=True)
class Put:
    key: str
    value: str


@dataclass(frozen=True, slots=True)
class Delete:
    key: str


class KV(abc.ABC):
    """A key-value store with revisions, transactions and prefix watches."""

    #: The store's URL, without credentials.
    url: str

    @abc.abstractmethod
    async def get(self, key: str) -> Entry | None:
        """The entry at ``key``, or ``None``."""

    @abc.abstractmethod
    async def scan(self, prefix: str) -> Listing:
        """Every entry whose key starts with ``prefix`` (which ends in ``/``)."""

    @abc.abstractmethod
    async def txn(self, compares: Sequence[tuple[str, int]], ops: Sequence[Put | Delete]) -> bool:
        """If each ``(key, mod_revision)`` holds (``0``: absent), apply ``ops``; ``True`` if
        applied. Atomic: watchers see all of ``ops`` or none."""

    @abc.abstractmethod
    def watch(self, prefix: str, start_revision: int) -> AsyncIterator[list[Event]]:
        """Batches of events under ``prefix`` from ``start_revision`` on, in order.

        Raises :class:`Compacted` or :class:`~meshkit.errors.Unavailable` (see the module
        documentation); never ends by itself while the store is open.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections; watches end."""

    async def put(self, key: str, value: str) -> None:
        """Write ``key`` unconditionally."""
        await self.txn((), (Put(key, value),))

    async def delete(self, key: str) -> None:
        """Delete ``key`` (no error if absent)."""
        await self.txn((), (Delete(key),))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"
