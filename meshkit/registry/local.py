"""The embedded ``local://`` registry: a directory of JSON records on one host.

No server: every process on the host that uses the same directory sees the same
instances. Layout::

    <dir>/<service>/<instance_id>.json   {...instance record..., "pid", "heartbeat", "ttl"}

Records are written atomically (temp file + ``os.replace``). A registering process
rewrites its records every ``ttl / 3`` seconds (re-creating them if deleted). A record is
live while its process exists and its heartbeat is younger than its ``ttl``; readers skip
records that are not live and delete those whose process is gone. Watches poll the
service directory (one ``scandir`` plus a ``stat`` per record; records are re-read only
when they change).

``local://`` uses :func:`default_directory`; ``local:///abs/dir`` uses that directory.
POSIX only (liveness uses ``kill(pid, 0)``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import stat
import tempfile
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import structlog

from .._files import mkdir_private as _mkdir_private
from ..errors import ConfigError, InvalidArgument, Unavailable
from .base import Instance, Registry, validate_instance_id, validate_service_name

__all__ = ["DEFAULT_POLL_INTERVAL", "DEFAULT_TTL", "LocalRegistry", "default_directory"]

_log = structlog.get_logger("meshkit.registry")

DEFAULT_TTL = 5.0
DEFAULT_POLL_INTERVAL = 0.1

# A cached record is trusted only if it was read well after its mtime: a rewrite within the
# same timestamp tick (coarse kernel clocks) could otherwise leave size/mtime/inode equal.
_RACY_NS = 50_000_000

_StatKey = tuple[int, int, int]


def default_directory(environ: Mapping[str, str] | None = None) -> Path:
    """Where ``local://`` keeps its records.

    ``$MESHKIT_RUNTIME_DIR/registry``, else ``$XDG_RUNTIME_DIR/meshkit/registry``, else
    ``/tmp/meshkit-<uid>/registry``.
    """
    env = os.environ if environ is None else environ
    if runtime := env.get("MESHKIT_RUNTIME_DIR"):
        return Path(runtime) / "registry"
    if xdg := env.get("XDG_RUNTIME_DIR"):
        return Path(xdg) / "meshkit" / "registry"
    return Path(f"/tmp/meshkit-{os.getuid()}") / "registry"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return True  # cannot tell: do not delete anything on a guess
    return True


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"expected {name} to be a positive number, found {value!r}")
    if value <= 0:
        raise ConfigError(f"expected {name} to be a positive number, found {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True)
class _Record:
    instance: Instance
    pid: int
    heartbeat: float
    ttl: float | None


@dataclass(slots=True)
class _Cached:
    key: _StatKey
    read_ns: int
    data: bytes
    record: _Record | None  # None: malformed (already warned about)


class LocalRegistry(Registry):
    """Registry in a local directory; see the module docstring."""

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        ttl: float = DEFAULT_TTL,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
    ) -> None:
        self.ttl = _positive("ttl", ttl)
        self.poll_interval = _positive("poll_interval", poll_interval)
        if directory is None or str(directory) == "":
            self.directory = default_directory()
            url = "local://"
        else:
            self.directory = Path(os.path.abspath(os.fspath(directory)))
            url = "local://" + quote(str(self.directory))
        super().__init__(url)
        # /tmp is shared: only trust /tmp/meshkit-<uid> if it is ours.
        fallback = Path(f"/tmp/meshkit-{os.getuid()}")
        self._private_base = fallback if self.directory.parent == fallback else None
        self._base_checked = False
        self._own: dict[tuple[str, str], Instance] = {}
        self._heartbeats: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._cache: dict[str, dict[str, _Cached]] = {}
        self._closed = False
        self._closed_event = asyncio.Event()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> LocalRegistry:
        """``local://`` or ``local:///abs/dir``, optionally ``?ttl=5&poll_interval=0.1``.

        Keyword ``options`` override query parameters.
        """
        parts = urlsplit(url)
        if parts.scheme != "local":
            raise ConfigError(f"expected a local:// registry URL, found {url!r}")
        if parts.netloc:
            raise ConfigError(
                f"expected local:// or local:///absolute/dir, found {url!r} "
                f"(the directory must be absolute: three slashes)"
            )
        params: dict[str, Any] = {}
        for name, values in parse_qs(parts.query, keep_blank_values=True).items():
            if name not in ("ttl", "poll_interval"):
                raise ConfigError(
                    f"expected local:// parameters ttl or poll_interval, found {name!r} in {url!r}"
                )
            try:
                params[name] = float(values[-1])
            except ValueError:
                raise ConfigError(
                    f"expected {name} to be a number, found {values[-1]!r} in {url!r}"
                ) from None
        params.update(options)
        path = unquote(parts.path)
        return cls(path or None, **params)

    # -- the Registry interface -------------------------------------------------------

    async def register(self, instance: Instance) -> None:
        self._check_open()
        key = (instance.service, instance.instance_id)
        self._write(instance)
        self._own[key] = instance
        task = self._heartbeats.get(key)
        if task is None or task.done():
            self._heartbeats[key] = asyncio.create_task(
                self._heartbeat(key), name=f"meshkit-registry-heartbeat-{instance.instance_id}"
            )

    async def deregister(self, instance: Instance) -> None:
        key = (instance.service, instance.instance_id)
        self._own.pop(key, None)
        task = self._heartbeats.pop(key, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            self._path(instance.service, instance.instance_id).unlink(missing_ok=True)
        except OSError as exc:
            self.status.mark_error(exc)
            raise Unavailable(f"cannot remove registry record in {self.directory}: {exc}") from exc

    async def resolve(self, service: str) -> list[Instance]:
        validate_service_name(service)
        self._check_open()
        return self._read_live(service)

    async def watch(self, service: str) -> AsyncGenerator[list[Instance], None]:
        validate_service_name(service)
        self._check_open()
        last: list[Instance] | None = None
        while not self._closed:
            snapshot = self._read_live(service)
            if snapshot != last:
                last = snapshot
                yield snapshot
                if self._closed:
                    break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval):
                    await self._closed_event.wait()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._closed_event.set()
        tasks = list(self._heartbeats.values())
        self._heartbeats.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for service, instance_id in list(self._own):
            with contextlib.suppress(OSError):
                self._path(service, instance_id).unlink(missing_ok=True)
        self._own.clear()

    # -- internals ----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable(f"registry {self.url} is closed")

    def _path(self, service: str, instance_id: str) -> Path:
        validate_service_name(service)
        validate_instance_id(instance_id)
        return self.directory / service / f"{instance_id}.json"

    def _check_base(self) -> None:
        """Refuse a ``/tmp/meshkit-<uid>`` that another user created (or a symlink)."""
        if self._private_base is None or self._base_checked:
            return
        try:
            st = os.lstat(self._private_base)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise ConfigError(
                f"expected {self._private_base} to be a directory owned by uid {os.getuid()}, "
                f"found {'a directory' if stat.S_ISDIR(st.st_mode) else 'a non-directory'} "
                f"owned by uid {st.st_uid}; remove it or set MESHKIT_RUNTIME_DIR"
            )
        self._base_checked = True

    def _write(self, instance: Instance) -> None:
        """Atomically (re)write the record of ``instance`` with a fresh heartbeat."""
        path = self._path(instance.service, instance.instance_id)
        record = instance.to_dict()
        record.update(pid=os.getpid(), heartbeat=time.time(), ttl=self.ttl)
        data = json.dumps(record, separators=(",", ":")).encode()
        try:
            self._check_base()
            _mkdir_private(path.parent)
            self._check_base()
            fd, tmp = tempfile.mkstemp(
                prefix=f".{instance.instance_id}.{os.getpid()}.", suffix=".tmp", dir=path.parent
            )
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            self.status.mark_error(exc)
            raise Unavailable(f"cannot write registry record {path}: {exc}") from exc
        self.status.mark_ok()

    async def _heartbeat(self, key: tuple[str, str]) -> None:
        interval = self.ttl / 3
        failing = False
        while True:
            await asyncio.sleep(interval)
            instance = self._own.get(key)
            if instance is None:
                return
            failing = self._beat(key, instance, failing)

    def _beat(self, key: tuple[str, str], instance: Instance, failing: bool) -> bool:
        """One heartbeat; returns whether it failed (failures are logged once in a row)."""
        path = self._path(*key)
        vanished = not path.exists()
        try:
            self._write(instance)
        except Exception as exc:
            if not failing:
                _log.warning(
                    "registry heartbeat failed; will keep trying",
                    service=key[0],
                    instance=key[1],
                    error=str(exc),
                )
            return True
        if failing:
            _log.info("registry heartbeat recovered", service=key[0], instance=key[1])
        if vanished:
            _log.warning(
                "registry record vanished; registered it again",
                service=key[0],
                instance=key[1],
                path=str(path),
            )
        return False

    def _read_live(self, service: str) -> list[Instance]:
        """Live instances of ``service``, sorted by id; cleans records of dead processes."""
        service_dir = self.directory / service
        cache = self._cache.setdefault(service, {})
        now = time.time()
        live: list[Instance] = []
        seen: set[str] = set()
        try:
            self._check_base()
            with os.scandir(service_dir) as entries:
                for entry in entries:
                    name = entry.name
                    if name.startswith("."):
                        if name.endswith(".tmp"):
                            self._reap_temp(entry)
                        continue
                    if not name.endswith(".json"):
                        continue
                    seen.add(name)
                    record = self._load(service, entry, cache)
                    if record is None:
                        continue
                    if not _pid_alive(record.pid):
                        self._remove_dead(entry, record, cache)
                        continue
                    ttl = record.ttl if record.ttl is not None else self.ttl
                    if now - record.heartbeat < ttl:
                        live.append(record.instance)
        except FileNotFoundError:
            cache.clear()
            self.status.mark_ok()
            return []
        except OSError as exc:
            if self.status.mark_error(exc):
                _log.warning("local registry unreadable", path=str(service_dir), error=str(exc))
            raise Unavailable(f"cannot read registry directory {service_dir}: {exc}") from exc
        for name in cache.keys() - seen:
            del cache[name]
        self.status.mark_ok()
        live.sort(key=lambda i: i.instance_id)
        return live

    def _load(
        self, service: str, entry: os.DirEntry[str], cache: dict[str, _Cached]
    ) -> _Record | None:
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        cached = cache.get(entry.name)
        if cached is not None and cached.key == key and cached.read_ns - key[0] > _RACY_NS:
            return cached.record
        read_ns = time.time_ns()
        try:
            with open(entry.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        if cached is not None and cached.data == data:
            record = cached.record  # same bytes: no re-parse, no second warning
        else:
            record = self._parse(service, entry, data)
        cache[entry.name] = _Cached(key, read_ns, data, record)
        return record

    def _parse(self, service: str, entry: os.DirEntry[str], data: bytes) -> _Record | None:
        try:
            obj = json.loads(data)
            instance = Instance.from_dict(obj)
            pid, heartbeat, ttl = obj.get("pid"), obj.get("heartbeat"), obj.get("ttl")
            if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
                raise InvalidArgument(f"expected 'pid' to be a positive integer, found {pid!r}")
            if isinstance(heartbeat, bool) or not isinstance(heartbeat, int | float):
                raise InvalidArgument(f"expected 'heartbeat' to be a number, found {heartbeat!r}")
            if ttl is not None and (
                isinstance(ttl, bool) or not isinstance(ttl, int | float) or not ttl > 0
            ):
                raise InvalidArgument(f"expected 'ttl' to be a positive number, found {ttl!r}")
            if instance.service != service or f"{instance.instance_id}.json" != entry.name:
                raise InvalidArgument(
                    f"expected a record for {service}/{entry.name[:-5]}, "
                    f"found {instance.service}/{instance.instance_id}"
                )
        except (ValueError, InvalidArgument) as exc:  # JSONDecodeError is a ValueError
            _log.warning("skipping malformed registry record", path=entry.path, error=str(exc))
            return None
        return _Record(instance, pid, float(heartbeat), None if ttl is None else float(ttl))

    def _remove_dead(
        self, entry: os.DirEntry[str], record: _Record, cache: dict[str, _Cached]
    ) -> None:
        cached = cache.pop(entry.name, None)
        try:
            # Only if nobody rewrote it since we read it.
            st = os.stat(entry.path, follow_symlinks=False)
            if cached is None or (st.st_mtime_ns, st.st_size, st.st_ino) != cached.key:
                return
            os.unlink(entry.path)
        except FileNotFoundError:
            return
        except OSError as exc:
            _log.warning("cannot remove dead registry record", path=entry.path, error=str(exc))
            return
        _log.info(
            "removed registry record of a dead process",
            service=record.instance.service,
            instance=record.instance.instance_id,
            pid=record.pid,
        )

    def _reap_temp(self, entry: os.DirEntry[str]) -> None:
        """Remove a temp file left by a process that died mid-write."""
        parts = entry.name[1:-4].rsplit(".", 2)
        if len(parts) != 3 or not parts[1].isdigit():
            return
        if not _pid_alive(int(parts[1])):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
