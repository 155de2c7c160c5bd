"""Versioned configuration on top of a :class:`~meshkit.config.kv.KV` backend.

Every namespace (one per service, plus :data:`SHARED` for settings every service reads)
is a JSON document of keys and values, changed only by publishing a **new version**::

    <ns>/seq                 the last version number handed out
    <ns>/versions/<N>        version N: values, author, time, message, kind (immutable but
                             for the outcome of a gray release)
    <ns>/head/current        the version in force (a copy of its record)
    <ns>/head/gray           a gray release in progress: {"selector": …, "version": record}
    _status/<service>/<id>   what each running instance applied (see :class:`InstanceStatus`)
    _secrets/<service>       {"secret_keys": [...]}: the keys the service's schemas mark
                             secret, kept after its instances stop, so tools mask them

Publishing is one transaction: it checks that ``seq``, ``current`` and ``gray`` are still
what the publisher read, writes ``versions/N`` and moves ``current`` (or ``gray``); when
another publisher won the race it reads again and retries, so concurrent ``set`` calls on
different keys both land. Watchers follow only ``<ns>/head/``, whose values carry the
whole version, so a change reaches them in one event with nothing more to read.

Gray release: :meth:`ConfigStore.gray_publish` puts a version under ``head/gray`` with a
:class:`Selector`; instances it selects run it, the others keep ``current``.
:meth:`~ConfigStore.gray_promote` makes it ``current`` (one transaction), and
:meth:`~ConfigStore.gray_abort` removes it (the selected instances go back to
``current``). While a gray release is in progress other publishing is refused.
"""

from __future__ import annotations

import asyncio
import copy
import getpass
import hashlib
import json
import math
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from ..errors import ConfigError, InvalidArgument, Unavailable
from .kv import KV, Compacted, Delete, Entry, Event, Put

__all__ = [
    "SHARED",
    "ConfigStore",
    "GrayRelease",
    "InstanceStatus",
    "MalformedRecord",
    "NamespaceState",
    "Selector",
    "Version",
    "default_author",
    "diff_values",
    "validate_namespace",
]

_log = structlog.get_logger("meshkit.config")

#: The namespace every service reads below its own.
SHARED = "_shared"
_NAMESPACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_RETRIES = 20
_BACKOFF_MIN = 0.05
_BACKOFF_MAX = 2.0


def validate_namespace(name: object) -> str:
    """A service name usable as a config namespace, or :data:`SHARED`."""
    if name == SHARED:
        return SHARED
    if not isinstance(name, str) or not _NAMESPACE.fullmatch(name):
        raise InvalidArgument(
            f"expected a service name (1-128 of [A-Za-z0-9._-], starting with a letter or "
            f"digit) or {SHARED!r}, found {name!r}"
        )
    return name


def default_author() -> str:
    """``user@host`` of this process (``$MESHKIT_AUTHOR`` overrides)."""
    if author := os.environ.get("MESHKIT_AUTHOR"):
        return author
    try:
        user = getpass.getuser()
    except Exception:
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


@dataclass(frozen=True, slots=True)
class Version:
    """One published version of a namespace."""

    namespace: str
    version: int
    values: Mapping[str, Any]
    author: str
    time: float
    message: str = ""
    #: ``set``, ``unset``, ``replace``, ``rollback`` or ``gray``.
    kind: str = "set"
    #: For a rollback: the version whose values were republished.
    source: int | None = None
    #: For a gray version: ``promoted`` or ``aborted`` once decided.
    outcome: str | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "namespace": self.namespace,
            "version": self.version,
            "values": self.values,
            "author": self.author,
            "time": self.time,
            "message": self.message,
            "kind": self.kind,
        }
        if self.source is not None:
            data["source"] = self.source
        if self.outcome is not None:
            data["outcome"] = self.outcome
        return data

    @classmethod
    def from_json(cls, data: Any) -> Version:
        if not isinstance(data, Mapping) or not isinstance(data.get("values"), Mapping):
            # The record is not echoed: its values may hold secrets.
            raise InvalidArgument(
                f"expected a version record with 'values', found {_describe(data)}"
            )
        return cls(
            namespace=str(data["namespace"]),
            version=int(data["version"]),
            values=dict(data["values"]),
            author=str(data.get("author", "")),
            time=float(data.get("time", 0.0)),
            message=str(data.get("message", "")),
            kind=str(data.get("kind", "set")),
            source=None if data.get("source") is None else int(data["source"]),
            outcome=data.get("outcome"),
        )


@dataclass(frozen=True, slots=True)
class Selector:
    """Which instances a gray release goes to: every given condition must hold.

    ``instances``: instance ids; ``tags``: tags the instance must have (``version`` is one
    of them: the service version); ``percent``: a share of the instances, chosen by a hash
    of namespace and instance id (so raising it only adds instances).
    """

    instances: tuple[str, ...] = ()
    tags: Mapping[str, str] = field(default_factory=dict)
    percent: float | None = None

    def __post_init__(self) -> None:
        if not self.instances and not self.tags and self.percent is None:
            raise InvalidArgument(
                "expected a gray selector with instances, tags or percent, found none"
            )
        if self.percent is not None and (
            isinstance(self.percent, bool)
            or not isinstance(self.percent, int | float)
            or not math.isfinite(self.percent)
            or not 0 <= self.percent <= 100
        ):
            raise InvalidArgument(
                f"expected gray percent between 0 and 100, found {self.percent!r}"
            )

    def matches(self, namespace: str, instance_id: str, tags: Mapping[str, str]) -> bool:
        if self.instances and instance_id not in self.instances:
            return False
        if any(tags.get(k) != v for k, v in self.tags.items()):
            return False
        if self.percent is not None:
            digest = hashlib.md5(f"{namespace}:{instance_id}".encode()).digest()
            return int.from_bytes(digest[:4], "big") < self.percent / 100 * 2**32
        return True

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        if self.instances:
            data["instances"] = list(self.instances)
        if self.tags:
            data["tags"] = dict(self.tags)
        if self.percent is not None:
            data["percent"] = self.percent
        return data

    @classmethod
    def from_json(cls, data: Any) -> Selector:
        if not isinstance(data, Mapping):
            raise InvalidArgument(f"expected a gray selector object, found {data!r:.200}")
        tags = data.get("tags") or {}
        instances = data.get("instances") or ()
        if not isinstance(tags, Mapping) or not all(isinstance(v, str) for v in tags.values()):
            raise InvalidArgument(f"expected gray tags as string values, found {tags!r}")
        if not isinstance(instances, list | tuple):
            raise InvalidArgument(f"expected gray instances as a list, found {instances!r}")
        return cls(tuple(map(str, instances)), dict(tags), data.get("percent"))

    def describe(self) -> str:
        parts = []
        if self.instances:
            parts.append("instances " + ",".join(self.instances))
        if self.tags:
            parts.append("tags " + ",".join(f"{k}={v}" for k, v in self.tags.items()))
        if self.percent is not None:
            parts.append(f"{self.percent:g}% of instances")
        return " and ".join(parts)


@dataclass(frozen=True, slots=True)
class GrayRelease:
    version: Version
    selector: Selector

    def to_json(self) -> dict[str, Any]:
        return {"selector": self.selector.to_json(), "version": self.version.to_json()}

    @classmethod
    def from_json(cls, data: Any) -> GrayRelease:
        if not isinstance(data, Mapping):
            raise InvalidArgument(f"expected a gray release record, found {_describe(data)}")
        return cls(Version.from_json(data.get("version")), Selector.from_json(data.get("selector")))


@dataclass(frozen=True, slots=True)
class NamespaceState:
    """``current`` and ``gray`` of a namespace as of store revision ``revision``."""

    namespace: str
    current: Version | None
    gray: GrayRelease | None
    revision: int

    def for_instance(self, instance_id: str, tags: Mapping[str, str]) -> Version | None:
        """The version an instance with this id and tags should run."""
        if self.gray is not None and self.gray.selector.matches(self.namespace, instance_id, tags):
            return self.gray.version
        return self.current


@dataclass(frozen=True, slots=True)
class InstanceStatus:
    """What one running instance reports under ``_status/<service>/<instance>``.

    ``versions``: namespace → version applied (``0``: nothing published);
    ``rejected``: namespace → ``{"version": N, "error": "..."}`` for versions it refused;
    ``secret_keys``: dotted keys its schema marks secret (tools mask them).
    """

    service: str
    instance: str
    versions: Mapping[str, int]
    rejected: Mapping[str, Mapping[str, Any]]
    tags: Mapping[str, str]
    secret_keys: tuple[str, ...]
    time: float
    pid: int = 0
    host: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "instance": self.instance,
            "versions": dict(self.versions),
            "rejected": {k: dict(v) for k, v in self.rejected.items()},
            "tags": dict(self.tags),
            "secret_keys": list(self.secret_keys),
            "time": self.time,
            "pid": self.pid,
            "host": self.host,
        }

    @classmethod
    def from_json(cls, data: Any) -> InstanceStatus:
        return cls(
            service=str(data["service"]),
            instance=str(data["instance"]),
            versions={str(k): int(v) for k, v in dict(data.get("versions") or {}).items()},
            rejected={str(k): dict(v) for k, v in dict(data.get("rejected") or {}).items()},
            tags={str(k): str(v) for k, v in dict(data.get("tags") or {}).items()},
            secret_keys=tuple(map(str, data.get("secret_keys") or ())),
            time=float(data.get("time", 0.0)),
            pid=int(data.get("pid", 0)),
            host=str(data.get("host", "")),
        )


def _dumps(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), sort_keys=True)


def set_path(values: Mapping[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of ``values`` with dotted ``key`` set (intermediate objects created)."""
    out = copy.deepcopy(dict(values))
    parts = key.split(".")
    node = out
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value
    return out


def unset_path(values: Mapping[str, Any], key: str) -> dict[str, Any]:
    """A copy of ``values`` without dotted ``key``; raises if it is not there."""
    out = copy.deepcopy(dict(values))
    parts = key.split(".")
    node: Any = out
    for part in parts[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or parts[-1] not in node:
        raise ConfigError(f"key {key!r} is not set")
    del node[parts[-1]]
    return out


def get_path(values: Mapping[str, Any], key: str) -> Any:
    """The value at dotted ``key``; raises :class:`KeyError` if absent."""
    node: Any = values
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


class ConfigStore:
    """Versions, history, rollback, gray releases and status records on a KV backend."""

    def __init__(self, kv: KV) -> None:
        self.kv = kv

    @property
    def url(self) -> str:
        return self.kv.url

    async def close(self) -> None:
        await self.kv.close()

    # -- reading --------------------------------------------------------------------------

    async def state(self, namespace: str) -> NamespaceState:
        """``current`` and ``gray`` of ``namespace`` now."""
        ns = validate_namespace(namespace)
        listing = await self.kv.scan(f"{ns}/head/")
        return self._state(ns, {k: e.value for k, e in listing.entries.items()}, listing.revision)

    def _state(self, ns: str, head: Mapping[str, str], revision: int) -> NamespaceState:
        """The state in the head records; :class:`MalformedRecord` if one is unreadable."""
        current = gray = None
        if (raw := head.get(f"{ns}/head/current")) is not None:
            current = _parse(f"{ns}/head/current", raw, Version.from_json)
        if (raw := head.get(f"{ns}/head/gray")) is not None:
            gray = _parse(f"{ns}/head/gray", raw, GrayRelease.from_json)
        return NamespaceState(ns, current, gray, revision)

    def _publish_state(
        self,
        ns: str,
        entries: Mapping[str, Entry],
        revision: int,
        seq: Entry | None,
        whole: bool,
    ) -> NamespaceState:
        """The state a publish builds on. An unreadable current head record (a bad hand
        edit, a buggy or newer tool) refuses a publish that changes the current values,
        saying how to repair it; one of a whole document writes over it."""
        cur_key = f"{ns}/head/current"
        head = {k: e.value for k, e in entries.items()}
        try:
            return self._state(ns, head, revision)
        except MalformedRecord as exc:
            # Without the current record: raises again if the gray record is the bad one.
            state = self._state(ns, {k: v for k, v in head.items() if k != cur_key}, revision)
            if whole:
                _log.warning("writing over a malformed config head record", key=cur_key)
                return state
            last = int(seq.value) if seq is not None and seq.value.isdigit() else 0
            hint = (
                f"`meshkit config rollback {ns} {last}` republishes the last version"
                if last
                else f"`meshkit config replace {ns} FILE` publishes a whole document"
            )
            raise MalformedRecord(
                f"{exc.message}; a change of single keys needs the current values: {hint} "
                "over it (the history is intact: `meshkit config history`)"
            ) from None

    async def history(self, namespace: str) -> list[Version]:
        """Every version of ``namespace``, oldest first."""
        ns = validate_namespace(namespace)
        listing = await self.kv.scan(f"{ns}/versions/")
        versions = [Version.from_json(json.loads(e.value)) for e in listing.entries.values()]
        return sorted(versions, key=lambda v: v.version)

    async def version(self, namespace: str, number: int) -> Version:
        """Version ``number`` of ``namespace``; :class:`ConfigError` if there is none."""
        ns = validate_namespace(namespace)
        entry = await self.kv.get(f"{ns}/versions/{number:010d}")
        if entry is None:
            seq = await self.kv.get(f"{ns}/seq")
            last = int(seq.value) if seq else 0
            have = f"versions 1 to {last}" if last else "no versions yet"
            raise ConfigError(f"{ns!r} has no version {number} ({have})")
        return Version.from_json(json.loads(entry.value))

    async def namespaces(self) -> list[str]:
        """Namespaces with at least one version (``_shared`` included)."""
        listing = await self.kv.scan("_index/")
        return sorted(k.split("/", 1)[1] for k in listing.entries)

    # -- publishing -----------------------------------------------------------------------

    async def publish(
        self,
        namespace: str,
        change: Callable[[Mapping[str, Any]], Mapping[str, Any]],
        *,
        author: str | None = None,
        message: str = "",
        kind: str = "set",
        source: int | None = None,
        gray: Selector | None = None,
        whole: bool = False,
    ) -> Version:
        """Publish ``change(values of current)`` as a new version (or as a gray release).

        ``change`` may be called again if another publisher wins the race; it should be a
        pure function of its argument. Refused (:class:`~meshkit.errors.ConfigError`) while
        a gray release is in progress and when nothing would change. ``whole``: ``change``
        ignores the current values (a whole document, as :meth:`replace` and
        :meth:`rollback` publish); an unreadable current head record is then written
        over, which is how it is repaired, instead of refusing the publish.
        """
        ns = validate_namespace(namespace)
        author = author or default_author()
        for _ in range(_RETRIES):
            head = await self.kv.scan(f"{ns}/head/")
            seq_entry = await self.kv.get(f"{ns}/seq")
            state = self._publish_state(ns, head.entries, head.revision, seq_entry, whole)
            if state.gray is not None:
                raise ConfigError(
                    f"a gray release of {ns!r} version {state.gray.version.version} is in "
                    f"progress ({state.gray.selector.describe()}): promote or abort it first"
                )
            base = state.current.values if state.current else {}
            values = change(copy.deepcopy(dict(base)))
            if not isinstance(values, Mapping):
                raise InvalidArgument(f"expected the config of {ns!r} to be an object")
            values = json.loads(_dumps(values))  # JSON-only values, a private copy
            if state.current is not None and values == dict(state.current.values) and gray is None:
                raise ConfigError(
                    f"nothing to publish: {ns!r} version {state.current.version} already has "
                    "these values"
                )
            number = (int(seq_entry.value) if seq_entry else 0) + 1
            version = Version(
                ns, number, values, author, time.time(), message, "gray" if gray else kind, source
            )
            record = _dumps(version.to_json())
            cur_key, gray_key = f"{ns}/head/current", f"{ns}/head/gray"
            compares = [
                (f"{ns}/seq", seq_entry.mod_revision if seq_entry else 0),
                (cur_key, head.entries[cur_key].mod_revision if cur_key in head.entries else 0),
                (gray_key, 0),
            ]
            ops: list[Put | Delete] = [
                Put(f"{ns}/seq", str(number)),
                Put(f"{ns}/versions/{number:010d}", record),
                Put(f"_index/{ns}", "1"),
            ]
            if gray is None:
                ops.append(Put(cur_key, record))
            else:
                ops.append(Put(gray_key, _dumps(GrayRelease(version, gray).to_json())))
            if await self.kv.txn(compares, ops):
                _log.info(
                    "config version published",
                    namespace=ns,
                    version=number,
                    kind=version.kind,
                    author=author,
                    gray=gray.describe() if gray else None,
                )
                return version
        raise Unavailable(f"could not publish {ns!r}: {_RETRIES} concurrent publishers won first")

    async def set_key(self, namespace: str, key: str, value: Any, **kwargs: Any) -> Version:
        """Publish a version with dotted ``key`` set to ``value``."""
        _check_key(key)
        return await self.publish(namespace, lambda v: set_path(v, key, value), **kwargs)

    async def unset_key(self, namespace: str, key: str, **kwargs: Any) -> Version:
        """Publish a version without dotted ``key``."""
        _check_key(key)
        return await self.publish(namespace, lambda v: unset_path(v, key), kind="unset", **kwargs)

    async def replace(self, namespace: str, values: Mapping[str, Any], **kwargs: Any) -> Version:
        """Publish ``values`` as the whole document."""
        kwargs.setdefault("kind", "replace")
        return await self.publish(namespace, lambda _v: values, whole=True, **kwargs)

    async def rollback(self, namespace: str, number: int, **kwargs: Any) -> Version:
        """Republish the values of version ``number`` as a new version."""
        old = await self.version(namespace, number)
        if not kwargs.get("message"):
            kwargs["message"] = f"rollback to version {number}"
        return await self.publish(
            namespace, lambda _v: old.values, kind="rollback", source=number, whole=True, **kwargs
        )

    async def gray_publish(
        self,
        namespace: str,
        change: Callable[[Mapping[str, Any]], Mapping[str, Any]],
        selector: Selector,
        **kwargs: Any,
    ) -> Version:
        """Publish a version to the instances ``selector`` picks; the rest keep current."""
        return await self.publish(namespace, change, gray=selector, **kwargs)

    async def gray_promote(self, namespace: str, *, author: str | None = None) -> Version:
        """Make the gray version current for every instance."""
        return await self._finish_gray(namespace, "promoted", author)

    async def gray_abort(self, namespace: str, *, author: str | None = None) -> Version:
        """Withdraw the gray version: its instances go back to current."""
        return await self._finish_gray(namespace, "aborted", author)

    async def _finish_gray(self, namespace: str, outcome: str, author: str | None) -> Version:
        ns = validate_namespace(namespace)
        for _ in range(_RETRIES):
            head = await self.kv.scan(f"{ns}/head/")
            state = self._state(ns, {k: e.value for k, e in head.entries.items()}, head.revision)
            if state.gray is None:
                raise ConfigError(f"no gray release of {ns!r} is in progress")
            version = state.gray.version
            cur_key, gray_key = f"{ns}/head/current", f"{ns}/head/gray"
            decided = Version(
                **{**_fields(version), "outcome": outcome}  # the history records the outcome
            )
            compares = [
                (cur_key, head.entries[cur_key].mod_revision if cur_key in head.entries else 0),
                (gray_key, head.entries[gray_key].mod_revision),
            ]
            ops: list[Put | Delete] = []
            if outcome == "promoted":
                ops.append(Put(cur_key, _dumps(decided.to_json())))
            ops += [
                Delete(gray_key),
                Put(f"{ns}/versions/{version.version:010d}", _dumps(decided.to_json())),
            ]
            if await self.kv.txn(compares, ops):
                _log.info(
                    f"config gray release {outcome}",
                    namespace=ns,
                    version=version.version,
                    author=author or default_author(),
                )
                return decided
        raise Unavailable(f"could not finish the gray release of {ns!r}: too many races")

    # -- secret keys ----------------------------------------------------------------------

    async def record_secret_keys(self, service: str, keys: Sequence[str]) -> None:
        """Add ``keys`` to the secret keys recorded for ``service`` (never removes one:
        instances of an older schema may still run, and masking too much is harmless)."""
        ns = validate_namespace(service)
        key = f"_secrets/{ns}"
        for _ in range(_RETRIES):
            entry = await self.kv.get(key)
            known = _secret_record(key, entry.value) if entry is not None else set()
            if set(keys) <= known:
                return
            record = _dumps({"secret_keys": sorted(known | set(keys))})
            if await self.kv.txn([(key, entry.mod_revision if entry else 0)], [Put(key, record)]):
                return
        raise Unavailable(f"could not record the secret keys of {ns!r}: too many races")

    async def secret_keys(self, namespace: str) -> set[str]:
        """The secret keys recorded for ``namespace`` (for :data:`SHARED`: of every
        service, since every service reads it). Empty for stores written before these
        records existed."""
        ns = validate_namespace(namespace)
        if ns == SHARED:
            listing = await self.kv.scan("_secrets/")
            entries = list(listing.entries.values())
        else:
            entry = await self.kv.get(f"_secrets/{ns}")
            entries = [entry] if entry is not None else []
        out: set[str] = set()
        for entry in entries:
            out |= _secret_record(entry.key, entry.value)
        return out

    # -- status records -------------------------------------------------------------------

    async def write_status(self, status: InstanceStatus) -> None:
        await self.kv.put(f"_status/{status.service}/{status.instance}", _dumps(status.to_json()))

    async def delete_status(self, service: str, instance: str) -> None:
        await self.kv.delete(f"_status/{service}/{instance}")

    async def statuses(self, service: str | None = None) -> list[InstanceStatus]:
        """Status records of ``service``'s instances (every service's when ``None``)."""
        prefix = f"_status/{validate_namespace(service)}/" if service else "_status/"
        listing = await self.kv.scan(prefix)
        out = []
        for entry in listing.entries.values():
            try:
                out.append(InstanceStatus.from_json(json.loads(entry.value)))
            except (ValueError, KeyError, TypeError) as exc:
                _log.warning("skipping malformed config status", key=entry.key, error=str(exc))
        return sorted(out, key=lambda s: (s.service, s.instance))

    # -- following ------------------------------------------------------------------------

    async def follow(
        self,
        namespace: str,
        on_error: Callable[[BaseException | None], None] | None = None,
    ) -> AsyncIterator[NamespaceState]:
        """The state of ``namespace`` now, then after every change, forever.

        Survives outages: on :class:`~meshkit.errors.Unavailable` it waits (backing off
        from 50 ms to 2 s) and resumes the watch from the last revision it saw, so no
        change is lost or reordered; if the store compacted that history it reads the
        state afresh. ``on_error(exc)`` is told of each failure and ``on_error(None)`` of
        each recovery.
        """
        ns = validate_namespace(namespace)
        prefix = f"{ns}/head/"
        head: dict[str, str] = {}
        revision: int | None = None
        last: NamespaceState | None = None
        delay = _BACKOFF_MIN
        failing = False
        malformed_at: int | None = None  # the revision whose head records are unreadable

        def readable(revision: int) -> NamespaceState | None:
            # A malformed head record (a hand-written put, a buggy or newer tool) means no
            # acceptable version at this revision: keep what runs and go on watching, so
            # the repair (or the next publish) is picked up.
            nonlocal malformed_at
            try:
                state = self._state(ns, head, revision)
            except MalformedRecord as exc:
                if malformed_at != revision:
                    malformed_at = revision
                    _log.warning(
                        "config head record malformed; keeping the config in force",
                        namespace=ns,
                        store=self.url,
                        revision=revision,
                        error=exc.message,
                    )
                if on_error:
                    on_error(exc)
                return None
            if malformed_at is not None:
                malformed_at = None
                if on_error:
                    on_error(None)
            return state

        while True:
            try:
                if failing and revision is not None:
                    # Back after a failure: a store whose revision is now lower than the
                    # one we saw lost its data (an etcd member rebuilt): a watch from our
                    # revision would wait for nothing, so read the state again.
                    probe = await self.kv.scan(prefix)
                    if on_error:
                        on_error(None)
                    failing, delay = False, _BACKOFF_MIN
                    if probe.revision < revision:
                        _log.warning(
                            "config store revision went backwards (store reset?); reading "
                            "the state again",
                            namespace=ns,
                            store=self.url,
                            seen=revision,
                            now=probe.revision,
                        )
                        revision = None
                if revision is None:
                    listing = await self.kv.scan(prefix)
                    head = {k: e.value for k, e in listing.entries.items()}
                    revision = listing.revision
                    if failing and on_error:
                        on_error(None)
                    failing, delay = False, _BACKOFF_MIN
                    state = readable(revision)
                    if state is not None and (last is None or _changed(last, state)):
                        last = state
                        yield state
                async for batch in self.kv.watch(prefix, revision + 1):
                    if failing and on_error:
                        on_error(None)
                    failing, delay = False, _BACKOFF_MIN
                    # One state per store revision (one publish is one revision), so a
                    # watcher that was behind still sees every version, in order.
                    for group in _by_revision(batch):
                        _apply(head, group)
                        revision = group[-1].revision
                        state = readable(revision)
                        if state is not None and (last is None or _changed(last, state)):
                            last = state
                            yield state
                raise Unavailable(f"the watch on {self.url} ended")
            except Compacted as exc:
                _log.info(
                    "config watch history compacted; reading again", namespace=ns, error=str(exc)
                )
                revision = None
            except (Unavailable, OSError) as exc:
                if not failing:
                    _log.warning(
                        "config store unreachable; keeping the last good config",
                        namespace=ns,
                        store=self.url,
                        error=str(exc),
                    )
                failing = True
                if on_error:
                    on_error(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX)


class MalformedRecord(ConfigError):
    """A record in the store that is not valid JSON or not of the expected shape."""


def _parse(key: str, raw: str, build: Callable[[Any], Any]) -> Any:
    try:
        return build(json.loads(raw))
    except json.JSONDecodeError as exc:  # its message is a position, not the content
        raise MalformedRecord(f"{key} is not valid JSON ({exc})") from None
    except InvalidArgument as exc:
        raise MalformedRecord(f"{key}: {exc.message}") from None
    except KeyError as exc:
        raise MalformedRecord(f"{key}: the record has no field {exc}") from None
    except (ValueError, TypeError) as exc:
        raise MalformedRecord(f"{key}: a field has the wrong type ({type(exc).__name__})") from None


def _secret_record(key: str, raw: str) -> set[str]:
    try:
        data = json.loads(raw)
        keys = data["secret_keys"]
        if not isinstance(keys, list):
            raise TypeError("secret_keys is not a list")
        return {str(k) for k in keys}
    except (ValueError, KeyError, TypeError) as exc:
        _log.warning("ignoring malformed secret keys record", key=key, error=str(exc))
        return set()


def _describe(data: Any) -> str:
    if isinstance(data, Mapping):
        return "an object with keys " + ", ".join(sorted(map(str, data))[:10])
    return f"a JSON {type(data).__name__}"


def _fields(version: Version) -> dict[str, Any]:
    return {name: getattr(version, name) for name in Version.__slots__}


def _apply(head: dict[str, str], batch: Sequence[Event]) -> None:
    for event in batch:
        if event.kind == "delete":
            head.pop(event.key, None)
        else:
            assert event.value is not None
            head[event.key] = event.value


def _by_revision(batch: Sequence[Event]) -> list[list[Event]]:
    groups: list[list[Event]] = []
    for event in batch:
        if groups and groups[-1][-1].revision == event.revision:
            groups[-1].append(event)
        else:
            groups.append([event])
    return groups


def _changed(a: NamespaceState, b: NamespaceState) -> bool:
    return a.current != b.current or a.gray != b.gray


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not key or any(not p for p in key.split(".")):
        raise InvalidArgument(f"expected a dotted config key such as 'db.pool_size', found {key!r}")


def diff_values(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, str, Any, Any]]:
    """``(change, dotted key, old, new)`` for each leaf that differs, in key order of
    ``old`` then new keys; ``change`` is ``added``, ``removed`` or ``changed``."""
    a, b = _leaves(old), _leaves(new)
    out: list[tuple[str, str, Any, Any]] = []
    for key in [*a, *(k for k in b if k not in a)]:
        if key not in b:
            out.append(("removed", key, a[key], None))
        elif key not in a:
            out.append(("added", key, None, b[key]))
        elif a[key] != b[key]:
            out.append(("changed", key, a[key], b[key]))
    return out


def _leaves(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping) and value:
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
