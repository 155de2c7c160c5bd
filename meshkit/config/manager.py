"""``svc.config``: a service's typed, live, validated settings.

::

    class Settings(BaseModel):
        greeting: str = "hello"
        rate_limit: int = Field(100, ge=1)
        db_password: SecretStr | None = None

    svc = Service("echo", echo.Echo, config=Settings)

    @svc.config.on_change                 # every applied change
    async def changed(change): ...        # change.new, change.old, change.keys, change.versions

    @svc.config.on_change(key="rate_limit")  # only when this key (or keys under it) changes
    def limit_changed(change): ...           # plain def: runs in a worker thread

    svc.config.value.greeting            # the settings in force (read once per request)

How a change is applied. The instance follows its namespace and :data:`SHARED` in the
store. For each new state it picks the version meant for it (the gray one if the gray
selector picks this instance), merges the layers (see :mod:`meshkit.config.layers`),
validates with the schema and the ``@svc.config.validator`` functions, and only then swaps
the settings object in one assignment: a handler that reads ``svc.config.value`` once sees
one consistent version. A version that fails is **rejected**: the last good settings stay,
a warning is logged (keys and messages, never values), ``meshkit_config_rejected_total``
counts it, ``/info`` shows it and the instance's status record tells the publisher.

Callbacks run in a task per callback, never on the RPC path; one that raises is logged
and counted and the others still run. Store outages keep the last good settings; the
watch resumes from the last revision seen. With ``cache_file`` the last applied versions
are saved (mode 0600) and used when the store is unreachable at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar, overload

import structlog
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import ConfigError, MeshkitError, Unavailable
from .layers import (
    effective,
    env_layer,
    env_prefix_for,
    flatten,
    load_file,
    merge,
    render_errors,
    secret_paths,
)
from .metrics import ConfigMetrics
from .store import (
    SHARED,
    ConfigStore,
    InstanceStatus,
    MalformedRecord,
    NamespaceState,
    Version,
    validate_namespace,
)
from .url import store_from_url

__all__ = ["ConfigChange", "ConfigRejected", "FreeForm", "ServiceConfig"]

_log = structlog.get_logger("meshkit.config")

M = TypeVar("M", bound=BaseModel)
Callback = Callable[["ConfigChange[Any]"], Any]

ENV_CONFIG_FILE = "MESHKIT_CONFIG_FILE"
ENV_CONFIG_CACHE = "MESHKIT_CONFIG_CACHE"
DEFAULT_INITIAL_TIMEOUT = 3.0
DEFAULT_STATUS_INTERVAL = 15.0
_RESTART_MIN = 0.1
_RESTART_MAX = 5.0


class FreeForm(BaseModel):
    """The schema of a service that declares none: any keys, read as attributes."""

    model_config = ConfigDict(extra="allow")


class ConfigRejected(ConfigError):
    """A config version failed validation (raised by validators; reported, not thrown)."""


@dataclass(frozen=True, slots=True)
class ConfigChange(Generic[M]):
    """One applied change: the settings before and after, the dotted keys that changed,
    and the versions now in force (namespace → version, 0 for none)."""

    new: M
    old: M
    keys: frozenset[str]
    versions: Mapping[str, int]

    def touches(self, key: str) -> bool:
        return any(
            k == key or k.startswith(key + ".") or key.startswith(k + ".") for k in self.keys
        )


@dataclass(eq=False)
class _Subscriber:
    key: str | None
    callback: Callback | None
    queue: asyncio.Queue[ConfigChange[Any] | None] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Any = _Default()


def _number(version: Version | None) -> int:
    return version.version if version is not None else 0


class ServiceConfig(Generic[M]):
    """The settings of one service; see the module documentation.

    ``store``: a :class:`ConfigStore`, a URL, ``DEFAULT`` (``$MESHKIT_CONFIG``, else
    ``local://``) or ``None`` (no central store: defaults, file, env and overrides only).
    ``file``: a TOML (or ``.json``) file, default ``$MESHKIT_CONFIG_FILE``.
    ``env_prefix``: default the service name upper-cased plus ``_`` (``ECHO_RATE_LIMIT``).
    ``cache_file``: where to keep the last applied versions (default
    ``$MESHKIT_CONFIG_CACHE``; none when unset).
    """

    def __init__(
        self,
        service: str,
        schema: type[M] | None = None,
        *,
        store: ConfigStore | str | None = DEFAULT,
        file: str | os.PathLike[str] | None = None,
        env_prefix: str | None = None,
        overrides: Mapping[str, Any] | None = None,
        cache_file: str | os.PathLike[str] | None = None,
        initial_timeout: float = DEFAULT_INITIAL_TIMEOUT,
        status_interval: float = DEFAULT_STATUS_INTERVAL,
        metrics_registry: CollectorRegistry | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.service = validate_namespace(service)
        if self.service == SHARED:
            raise ConfigError(f"{SHARED!r} is the shared namespace, not a service name")
        self.schema: type[M] = schema if schema is not None else FreeForm  # type: ignore[assignment]
        if not (isinstance(self.schema, type) and issubclass(self.schema, BaseModel)):
            raise ConfigError(f"expected a pydantic BaseModel subclass as schema, found {schema!r}")
        env = os.environ if environ is None else environ
        self._environ = env
        self._store_arg = store
        self.store: ConfigStore | None = None
        file_text = env.get(ENV_CONFIG_FILE) if file is None else os.fspath(file)
        self.file = Path(file_text) if file_text else None
        self.env_prefix = env_prefix if env_prefix is not None else env_prefix_for(service)
        self.overrides = dict(overrides or {})
        cache_text = env.get(ENV_CONFIG_CACHE) if cache_file is None else os.fspath(cache_file)
        self.cache_file = Path(cache_text) if cache_text else None
        self.initial_timeout = initial_timeout
        self.status_interval = status_interval
        self.metrics = ConfigMetrics.get(metrics_registry)
        self.secret_keys = tuple(sorted(secret_paths(self.schema)))
        self.instance_id = ""
        self.tags: dict[str, str] = {}
        self._validators: list[Callable[[M], Any]] = []
        self._subscribers: list[_Subscriber] = []
        self._value: M | None = None
        self._sources: dict[str, str] = {}
        self._static: list[tuple[str, Mapping[str, Any]]] | None = None
        self._states: dict[str, NamespaceState] = {}
        self._applied: dict[str, Version | None] = {self.service: None, SHARED: None}
        self._rejected: dict[str, dict[str, Any]] = {}
        self._vanished: set[str] = set()
        self._store_errors: dict[str, str] = {}  # who saw it (a namespace or start) → error
        self._loaded_from_cache = False
        self._tasks: list[asyncio.Task[None]] = []
        self._status_dirty: asyncio.Event | None = None
        self._started = False
        self._owns_store = False

    # -- what a service developer uses ----------------------------------------------------

    @property
    def value(self) -> M:
        """The validated settings in force (one consistent version; read it once per use)."""
        if self._value is None:
            model, sources = self._build(self._applied)
            self._value, self._sources = model, sources
        return self._value

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.value, name)

    @property
    def versions(self) -> dict[str, int]:
        """Namespace → version applied (0: none)."""
        return {ns: _number(v) for ns, v in self._applied.items()}

    @property
    def version(self) -> int | None:
        """The version of this service's namespace in force (``None``: none published)."""
        applied = self._applied.get(self.service)
        return applied.version if applied is not None else None

    @overload
    def on_change(self, callback: Callback, *, key: str | None = None) -> Callback: ...
    @overload
    def on_change(
        self, callback: None = None, *, key: str | None = None
    ) -> Callable[[Callback], Callback]: ...

    def on_change(self, callback: Callback | None = None, *, key: str | None = None) -> Any:
        """Register ``callback(change)`` for applied changes (only those touching ``key``).

        Usable as ``@cfg.on_change`` and ``@cfg.on_change(key="db.pool_size")``. Async
        callbacks run on the event loop, plain ones in a worker thread; each callback has a
        task of its own, so a slow or failing one delays or breaks no other.
        """

        def register(fn: Callback) -> Callback:
            sub = _Subscriber(key, fn)
            self._subscribers.append(sub)
            if self._started:
                sub.task = asyncio.create_task(self._run_callback(sub), name="meshkit-config-cb")
            return fn

        return register(callback) if callback is not None else register

    async def changes(self, key: str | None = None) -> AsyncIterator[ConfigChange[M]]:
        """Each applied change (touching ``key`` if given), as an async iterator."""
        sub = _Subscriber(key, None)
        self._subscribers.append(sub)
        try:
            while True:
                change = await sub.queue.get()
                if change is None:
                    return
                yield change
        finally:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(sub)

    def validator(self, fn: Callable[[M], Any]) -> Callable[[M], Any]:
        """Register ``fn(settings)``: raising rejects a version (its message is reported).

        Validators are plain functions: a version is validated synchronously, before the
        one swap that applies it, so an ``async def`` is refused with a
        :class:`~meshkit.errors.ConfigError`.
        """
        if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004 - an object whose __call__ is async
        ):
            name = getattr(fn, "__qualname__", repr(fn))
            raise ConfigError(
                f"config validator {name} is async: validators must be plain functions "
                "(a version is validated before it is applied, with no await); do the check "
                "synchronously, or fetch what it needs in an on_change callback"
            )
        if not callable(fn):
            raise ConfigError(f"expected a function as config validator, found {fn!r}")
        self._validators.append(fn)
        return fn

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self, instance_id: str = "", tags: Mapping[str, str] | None = None) -> None:
        """Load the settings (store, else cache, else the other layers) and follow changes.

        Raises :class:`~meshkit.errors.ConfigError` when no acceptable settings exist
        (e.g. a required key is set nowhere, or a file is malformed).
        """
        if self._started:
            raise RuntimeError(f"the config of {self.service!r} is already started")
        self.instance_id = instance_id or f"{self.service}-{socket.gethostname()}-{os.getpid()}"
        self.tags = dict(tags or {})
        self._static = None
        self._static_layers()  # a bad file or environment fails the start, loudly
        if self._store_arg is DEFAULT:
            self.store = store_from_url(None)
            self._owns_store = True
        elif isinstance(self._store_arg, str):
            self.store = store_from_url(self._store_arg)
            self._owns_store = True
        else:
            self.store = self._store_arg
        try:
            if self.store is not None:
                await self._initial_states()
            self._reconcile()
            if self._value is None:
                # No acceptable store version: start on the layers without the store.
                model, sources = self._build({self.service: None, SHARED: None})
                self._value, self._sources = model, sources
                self._applied = {self.service: None, SHARED: None}
                self._publish_metrics()
        except BaseException:
            if self.store is not None and self._owns_store:
                await self.store.close()
            raise
        self._started = True
        for sub in self._subscribers:
            if sub.callback is not None and sub.task is None:
                sub.task = asyncio.create_task(self._run_callback(sub), name="meshkit-config-cb")
        if self.store is not None:
            self._status_dirty = asyncio.Event()
            self._status_dirty.set()
            for ns in (self.service, SHARED):
                self._tasks.append(
                    asyncio.create_task(self._follow(ns), name=f"meshkit-config-follow-{ns}")
                )
            self._tasks.append(
                asyncio.create_task(self._status_loop(), name="meshkit-config-status")
            )
        _log.info(
            "config loaded",
            service=self.service,
            store=self.store.url if self.store else None,
            versions=self.versions,
            from_cache=self._loaded_from_cache,
        )

    async def stop(self) -> None:
        """Stop following, end callback tasks and iterators, withdraw the status record."""
        self._started = False
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sub in list(self._subscribers):
            sub.queue.put_nowait(None)
        cb_tasks = [s.task for s in self._subscribers if s.task is not None]
        if cb_tasks:
            await asyncio.wait(cb_tasks, timeout=2.0)
            for t in cb_tasks:
                t.cancel()
        for sub in self._subscribers:
            sub.task = None
        if self.store is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await self.store.delete_status(self.service, self.instance_id)
            if self._owns_store:
                await self.store.close()

    # -- introspection --------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """What ``/info`` shows under ``config``: versions, gray, rejections, effective
        value and source of every key (secrets masked)."""
        gray = {
            ns: st.gray is not None and _number(self._applied.get(ns)) == st.gray.version.version
            for ns, st in self._states.items()
        }
        return {
            "store": self.store.url if self.store else None,
            "store_reachable": not self._store_errors,
            "store_error": self._store_error,
            "versions": self.versions,
            "gray": gray,
            "rejected": dict(self._rejected),
            "from_cache": self._loaded_from_cache,
            "file": str(self.file) if self.file else None,
            "env_prefix": self.env_prefix,
            "effective": self.effective(),
        }

    def effective(self) -> dict[str, dict[str, Any]]:
        """``{key: {"value", "source"}}`` of the settings in force, secrets masked."""
        value = self.value
        return effective(value, self._sources)

    # -- internals: layers and validation -------------------------------------------------

    def _static_layers(self) -> list[tuple[str, Mapping[str, Any]]]:
        if self._static is None:
            layers: list[tuple[str, Mapping[str, Any]]] = []
            if self.file is not None:
                layers.append(("file", load_file(self.file)))
            self._static = [
                *layers,
                ("env", env_layer(self.schema, self.env_prefix, self._environ)),
                ("override", self.overrides),
            ]
        return self._static

    def _build(self, versions: Mapping[str, Version | None]) -> tuple[M, dict[str, str]]:
        static = self._static_layers()
        head = [layer for layer in static if layer[0] == "file"]
        tail = [layer for layer in static if layer[0] != "file"]
        store: list[tuple[str, Mapping[str, Any]]] = []
        if (shared := versions.get(SHARED)) is not None:
            store.append(("shared", shared.values))
        if (own := versions.get(self.service)) is not None:
            store.append(("store", own.values))
        merged, sources = merge(self.schema, [*head, *store, *tail])
        try:
            model = self.schema.model_validate(merged)
        except ValidationError as exc:
            raise ConfigRejected(render_errors(exc, sources)) from None
        except Exception as exc:
            # A schema validator that raised something pydantic passes through
            # (TypeError, AttributeError, KeyError, ...). Its message is the validator's
            # own text; the input value is never added (it may be a secret).
            raise ConfigRejected(
                f"schema {self.schema.__qualname__} raised {type(exc).__name__}: {exc}"
            ) from None
        for check in self._validators:
            try:
                result = check(model)
            except Exception as exc:
                name = getattr(check, "__qualname__", repr(check))
                kind = (
                    ""
                    if isinstance(exc, ValueError | AssertionError)
                    else f"{type(exc).__name__}: "
                )
                raise ConfigRejected(f"validator {name}: {kind}{exc}") from None
            if inspect.isawaitable(result):
                # Not awaited (validation is synchronous): a check that never ran must not
                # pass the version.
                if inspect.iscoroutine(result):
                    result.close()
                name = getattr(check, "__qualname__", repr(check))
                raise ConfigRejected(
                    f"validator {name} returned an awaitable; validators must be plain functions"
                )
        return model, sources

    # -- internals: following the store --------------------------------------------------

    async def _initial_states(self) -> None:
        assert self.store is not None
        try:
            async with asyncio.timeout(self.initial_timeout):
                states = await asyncio.gather(
                    self.store.state(self.service), self.store.state(SHARED)
                )
            for state in states:
                self._states[state.namespace] = state
            self._set_store_error(None)
            return
        except (TimeoutError, MeshkitError, OSError, ValueError) as exc:
            # Unreachable, or a head record no version can be read from (MalformedRecord):
            # either way the cache, if any, is the best settings there are.
            error = str(exc) or f"no answer within {self.initial_timeout}s"
            self._set_store_error(error)
            _log.warning(
                "config store unreadable at start"
                if isinstance(exc, MalformedRecord | ValueError)
                else "config store unreachable at start",
                service=self.service,
                store=self.store.url,
                error=error,
                cache=str(self.cache_file) if self.cache_file else None,
            )
        cached = self._read_cache()
        if cached is not None:
            self._states = cached
            self._loaded_from_cache = True

    async def _follow(self, ns: str) -> None:
        """Follow ``ns`` until cancelled: no error of one version or of the store ends it."""
        assert self.store is not None
        delay = _RESTART_MIN
        while True:
            try:
                async for state in self.store.follow(
                    ns, on_error=lambda exc: self._set_store_error(exc, ns)
                ):
                    self._set_store_error(None, ns)
                    self._states[ns] = state
                    delay = _RESTART_MIN
                    try:
                        self._reconcile()
                    except Exception as exc:
                        # A bug on the apply path (ours or a validator's): refuse this
                        # version, keep the settings in force and go on watching.
                        _log.exception(
                            "config version could not be applied",
                            service=self.service,
                            namespace=ns,
                        )
                        version = state.for_instance(self.instance_id, self.tags)
                        self._reject(ns, version, f"{type(exc).__name__}: {exc}")
                raise Unavailable(f"the config watch of {ns!r} ended")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _log.exception(
                    "config watch failed; restarting it", service=self.service, namespace=ns
                )
                self._set_store_error(f"config watch failed: {type(exc).__name__}: {exc}", ns)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RESTART_MAX)

    def _set_store_error(self, exc: BaseException | str | None, ns: str = "") -> None:
        """Record (``exc``) or clear (``None``) the store problem the watch of ``ns`` (or
        the start, ``""``) sees; each watch clears only its own, so one namespace's bad
        record is not hidden by the other's good news."""
        if exc is None:
            self._store_errors.pop(ns, None)
            if ns:
                self._store_errors.pop("", None)  # a watch got through: the start's is over
        else:
            self._store_errors[ns] = str(exc)
        self.metrics.store_up.labels(self.service).set(0 if self._store_errors else 1)

    @property
    def _store_error(self) -> str | None:
        errors = list(dict.fromkeys(self._store_errors.values()))
        return "; ".join(errors) if errors else None

    def _reconcile(self) -> None:
        """Apply the versions meant for this instance, or reject them (see the module doc)."""
        chosen: dict[str, Version | None] = {}
        for ns in (self.service, SHARED):
            state = self._states.get(ns)
            chosen[ns] = (
                state.for_instance(self.instance_id, self.tags)
                if state is not None
                else self._applied.get(ns)
            )
            if chosen[ns] is None and self._applied.get(ns) is not None:
                # The namespace vanished from the store (deleted, or a store that lost its
                # data): nothing to validate, so keep what runs rather than fall back to
                # defaults behind everyone's back.
                if ns not in self._vanished:
                    self._vanished.add(ns)
                    _log.warning(
                        "config namespace vanished from the store; keeping the version in force",
                        service=self.service,
                        namespace=ns,
                        version=_number(self._applied.get(ns)),
                    )
                chosen[ns] = self._applied[ns]
            elif chosen[ns] is not None:
                self._vanished.discard(ns)
        changed = [ns for ns in chosen if _number(chosen[ns]) != _number(self._applied[ns])]
        if not changed:
            return
        # All changes together first; if that fails, each on its own (so a bad shared
        # version does not hold back a good service version, and the culprit is named).
        groups = [changed] + ([[ns] for ns in changed] if len(changed) > 1 else [])
        for group in groups:
            target = {**self._applied, **{ns: chosen[ns] for ns in group}}
            try:
                model, sources = self._build(target)
            except ConfigError as exc:
                if len(group) == 1:
                    self._reject(group[0], chosen[group[0]], exc.message)
                continue
            self._apply(model, sources, target, group)
            if group is changed:
                return

    def _reject(self, ns: str, version: Version | None, error: str) -> None:
        number = _number(version)
        previous = self._rejected.get(ns)
        if previous is not None and previous["version"] == number:
            return  # already reported
        self._rejected[ns] = {"version": number, "error": error, "time": time.time()}
        self.metrics.rejected.labels(self.service, ns).inc()
        _log.warning(
            "config version rejected; keeping the last good config",
            service=self.service,
            instance=self.instance_id,
            namespace=ns,
            version=number,
            running=_number(self._applied.get(ns)),
            error=error,
        )
        self._mark_status()

    def _apply(
        self, model: M, sources: dict[str, str], target: dict[str, Version | None], group: list[str]
    ) -> None:
        old = self._value
        keys = _changed_keys(old, model) if old is not None else frozenset()
        self._value, self._sources = model, sources  # the one swap handlers observe
        self._applied = target
        for ns in group:
            rejected = self._rejected.get(ns)
            if rejected is not None and rejected["version"] <= _number(target[ns]):
                del self._rejected[ns]
            self.metrics.applied.labels(self.service, ns).inc()
        self._publish_metrics()
        _log.info(
            "config applied",
            service=self.service,
            instance=self.instance_id,
            versions=self.versions,
            changed_keys=sorted(keys),
        )
        self._mark_status()
        self._save_cache()
        if old is not None and keys:
            change = ConfigChange(model, old, keys, self.versions)
            for sub in self._subscribers:
                if sub.key is None or change.touches(sub.key):
                    sub.queue.put_nowait(change)

    def _publish_metrics(self) -> None:
        for ns, version in self._applied.items():
            self.metrics.version.labels(self.service, ns).set(_number(version))
            state = self._states.get(ns)
            gray = (
                state is not None
                and state.gray is not None
                and _number(version) == state.gray.version.version
            )
            self.metrics.gray.labels(self.service, ns).set(1 if gray else 0)

    async def _run_callback(self, sub: _Subscriber) -> None:
        assert sub.callback is not None
        name = getattr(sub.callback, "__qualname__", repr(sub.callback))
        while True:
            change = await sub.queue.get()
            if change is None:
                return
            try:
                if inspect.iscoroutinefunction(sub.callback):
                    await sub.callback(change)
                else:
                    result = await asyncio.to_thread(sub.callback, change)
                    if inspect.isawaitable(result):
                        await result
            except asyncio.CancelledError:
                raise
            except Exception:
                self.metrics.callback_errors.labels(self.service).inc()
                _log.exception(
                    "config change callback raised; the new config stays applied",
                    service=self.service,
                    callback=name,
                    versions=change.versions,
                )

    # -- internals: status records and cache ----------------------------------------------

    def _mark_status(self) -> None:
        if self._status_dirty is not None:
            self._status_dirty.set()

    def status(self) -> InstanceStatus:
        return InstanceStatus(
            service=self.service,
            instance=self.instance_id,
            versions=self.versions,
            rejected=self._rejected,
            tags=self.tags,
            secret_keys=self.secret_keys,
            time=time.time(),
            pid=os.getpid(),
            host=socket.gethostname(),
        )

    async def _status_loop(self) -> None:
        assert self.store is not None and self._status_dirty is not None
        failing = False
        secrets_recorded = not self.secret_keys
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.status_interval if not failing else 0.5):
                    await self._status_dirty.wait()
            self._status_dirty.clear()
            try:
                if not secrets_recorded:
                    # Kept in the store after this instance stops, so tools still mask them.
                    await self.store.record_secret_keys(self.service, self.secret_keys)
                    secrets_recorded = True
                await self.store.write_status(self.status())
            except (MeshkitError, OSError) as exc:
                if not failing:
                    _log.warning("cannot write config status", service=self.service, error=str(exc))
                failing = True
                self._status_dirty.set()
                await asyncio.sleep(0.5)
                continue
            failing = False

    def _save_cache(self) -> None:
        if self.cache_file is None or self.store is None:
            return
        data = {
            "service": self.service,
            "store": self.store.url,
            "saved": time.time(),
            "namespaces": {
                ns: (v.to_json() if v is not None else None) for ns, v in self._applied.items()
            },
        }
        try:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".cache.", dir=self.cache_file.parent)
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
            os.replace(tmp, self.cache_file)
        except OSError as exc:
            _log.warning("cannot write config cache", path=str(self.cache_file), error=str(exc))

    def _read_cache(self) -> dict[str, NamespaceState] | None:
        if self.cache_file is None:
            return None
        try:
            data = json.loads(self.cache_file.read_text())
            if data.get("service") != self.service:
                raise ValueError(f"it belongs to service {data.get('service')!r}")
            states = {}
            for ns, raw in dict(data["namespaces"]).items():
                version = Version.from_json(raw) if raw is not None else None
                states[ns] = NamespaceState(ns, version, None, 0)
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, MeshkitError) as exc:
            _log.warning(
                "ignoring unreadable config cache", path=str(self.cache_file), error=str(exc)
            )
            return None
        _log.info(
            "starting from the config cache", path=str(self.cache_file), saved=data.get("saved")
        )
        return states


def _changed_keys(old: BaseModel, new: BaseModel) -> frozenset[str]:
    schema = type(new)
    a = flatten(old.model_dump(), schema=schema)
    b = flatten(new.model_dump(), schema=schema)
    return frozenset(k for k in a.keys() | b.keys() if a.get(k, _MISSING) != b.get(k, _MISSING))


_MISSING = object()
