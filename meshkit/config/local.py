"""The embedded ``local://`` config store: a directory on one host, shared by its processes.

No server: every process on the host that opens the same directory sees the same keys
and the same revisions. Layout::

    <dir>/.lock              flock(2): writers exclusive, readers shared (taken without
                             blocking the event loop: retried every 1-20 ms for up to
                             ``lock_timeout``, 5 s by default, then Unavailable)
    <dir>/journal            one JSON line per transaction:
                             {"rev": N, "ops": [[key, value or null], ...]}; the first line is
                             a header {"base": B}: the journal holds revisions > B
    <dir>/rev                "<revision> <journal offset after that revision's line>"
    <dir>/kv/<a>/<b>/=<c>    the value of key "a/b/c": {"mod_revision": N, "value": "..."}

A write takes the lock, checks the transaction's comparisons against the data files,
appends the journal line, rewrites the data files (temp file + ``os.replace``) and
finally ``rev``. A writer that died after appending its line is repaired by the next
one (lines past ``rev``'s offset are replayed; a torn last line is cut off).

**Change notification.** A watcher keeps the journal open at the offset it has read and
polls its size with one ``fstat`` every ``poll_interval`` (default 20 ms). Polling rather
than inotify: it costs ~50 syscalls a second, works on every filesystem (inotify misses
writes made through another mount namespace, overlay or network filesystem, which is
exactly where a shared config directory tends to live), needs no dependency, and 20 ms
is far inside the time a config change is allowed to take. Because a watcher reads the
journal itself, it sees every transaction, in order, exactly once — across restarts too,
from any revision still in the journal.

**Compaction.** When the journal passes ``max_journal`` bytes (default 1 MiB) a writer
starts a new one whose header names the last revision of the old one. A watcher still
reading the old file finishes it first, then follows the new file; one that needs a
revision older than the header gets :class:`~meshkit.config.kv.Compacted` and lists again.

``local://`` uses ``<runtime dir>/config`` (next to the ``local://`` registry, see
:func:`meshkit.registry.local.default_directory`); ``local:///abs/dir`` uses that directory.
POSIX only.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import stat
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import structlog

from .._files import mkdir_private as _mkdir_private
from ..errors import ConfigError, Unavailable
from ..registry.local import default_directory
from .kv import KV, Compacted, Delete, Entry, Event, Listing, Put, validate_key, validate_prefix

__all__ = ["DEFAULT_POLL_INTERVAL", "LocalKV", "default_config_directory"]

_log = structlog.get_logger("meshkit.config")

DEFAULT_POLL_INTERVAL = 0.02
DEFAULT_MAX_JOURNAL = 1024 * 1024
DEFAULT_LOCK_TIMEOUT = 5.0
_LOCK_RETRY_MIN = 0.001
_LOCK_RETRY_MAX = 0.02
_URL_PARAMS = ("poll_interval", "max_journal", "lock_timeout")


def default_config_directory(environ: Mapping[str, str] | None = None) -> Path:
    """Where ``local://`` keeps config: ``config`` next to the ``local://`` registry."""
    return default_directory(environ).parent / "config"


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


class LocalKV(KV):
    """Config key-value store in a local directory; see the module documentation."""

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        max_journal: int = DEFAULT_MAX_JOURNAL,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    ) -> None:
        if not isinstance(lock_timeout, int | float) or not 0 < lock_timeout <= 3600:
            raise ConfigError(
                f"expected lock_timeout between 0 and 3600 seconds, found {lock_timeout!r}"
            )
        if not isinstance(poll_interval, int | float) or not 0 < poll_interval <= 60:
            raise ConfigError(
                f"expected poll_interval between 0 and 60 seconds, found {poll_interval!r}"
            )
        if not isinstance(max_journal, int) or max_journal < 1024:
            raise ConfigError(f"expected max_journal ≥ 1024 bytes, found {max_journal!r}")
        if directory is None or str(directory) == "":
            self.directory = default_config_directory()
            self.url = "local://"
        else:
            self.directory = Path(os.path.abspath(os.fspath(directory)))
            self.url = "local://" + quote(str(self.directory))
        self.poll_interval = float(poll_interval)
        self.max_journal = max_journal
        self.lock_timeout = float(lock_timeout)
        # /tmp is shared: only trust /tmp/meshkit-<uid> if it is ours (as the registry does).
        fallback = Path(f"/tmp/meshkit-{os.getuid()}")
        self._private_base = fallback if self.directory.parent == fallback else None
        self._closed = False
        self._closed_event = asyncio.Event()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> LocalKV:
        """``local://`` or ``local:///abs/dir``, optionally ``?poll_interval=0.02``
        (also ``max_journal``, ``lock_timeout``)."""
        parts = urlsplit(url)
        if parts.scheme != "local":
            raise ConfigError(f"expected a local:// config URL, found {url!r}")
        if parts.netloc:
            raise ConfigError(
                f"expected local:// or local:///absolute/dir, found {url!r} "
                f"(the directory must be absolute: three slashes)"
            )
        params: dict[str, Any] = {}
        for name, values in parse_qs(parts.query, keep_blank_values=True).items():
            if name not in _URL_PARAMS:
                raise ConfigError(
                    f"expected local:// parameters {', '.join(_URL_PARAMS)}, "
                    f"found {name!r} in {url!r}"
                )
            try:
                params[name] = int(values[-1]) if name == "max_journal" else float(values[-1])
            except ValueError:
                raise ConfigError(
                    f"expected {name} to be a number, found {values[-1]!r} in {url!r}"
                ) from None
        params.update(options)
        return cls(unquote(parts.path) or None, **params)

    # -- paths ----------------------------------------------------------------------------

    @property
    def _journal(self) -> Path:
        return self.directory / "journal"

    def _data_path(self, key: str) -> Path:
        *dirs, last = validate_key(key).split("/")
        return self.directory.joinpath("kv", *dirs, "=" + last)

    # -- locking and repair ---------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _locked(self, exclusive: bool) -> AsyncIterator[None]:
        """Hold the store lock for a section that must not await (the lock is per open
        file, so it also excludes other tasks and threads of this process).

        The lock is tried without blocking and retried with a short sleep, so another
        process holding it (a slow disk, a writer stopped in a debugger) never freezes
        the event loop; after ``lock_timeout`` it gives up with ``Unavailable``, which the
        watchers treat as an outage.
        """
        if self._closed:
            raise Unavailable(f"config store {self.url} is closed")
        self._check_base()
        try:
            _mkdir_private(self.directory)
            fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise Unavailable(f"cannot open config store {self.directory}: {exc}") from exc
        try:
            mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.lock_timeout
            delay = _LOCK_RETRY_MIN
            while True:
                try:
                    fcntl.flock(fd, mode)
                    break
                except BlockingIOError:
                    if loop.time() >= deadline:
                        raise Unavailable(
                            f"config store {self.directory} is locked by another process "
                            f"for more than {self.lock_timeout:g}s (see `fuser "
                            f"{self.directory / '.lock'}`)"
                        ) from None
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _LOCK_RETRY_MAX)
                except OSError as exc:
                    raise Unavailable(f"cannot lock config store {self.directory}: {exc}") from exc
            yield
        finally:
            os.close(fd)  # releases the lock

    def _check_base(self) -> None:
        """Refuse a ``/tmp/meshkit-<uid>`` that another user created (or a symlink)."""
        if self._private_base is None:
            return
        try:
            st = os.lstat(self._private_base)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise ConfigError(
                f"expected {self._private_base} to be a directory owned by uid {os.getuid()}; "
                "remove it or set MESHKIT_RUNTIME_DIR"
            )
        self._private_base = None  # checked once

    def _read_rev(self) -> tuple[int, int]:
        try:
            text = (self.directory / "rev").read_text()
        except FileNotFoundError:
            return 0, -1
        rev, _, offset = text.partition(" ")
        return int(rev), int(offset)

    def _ensure_journal(self) -> None:
        if not self._journal.exists():
            header = json.dumps({"base": self._read_rev()[0]}).encode() + b"\n"
            _write_atomic(self._journal, header)
            rev, _ = self._read_rev()
            _write_atomic(self.directory / "rev", f"{rev} {len(header)}".encode())

    def _repair(self) -> tuple[int, int]:
        """Under the exclusive lock: replay journal lines a dead writer left unapplied."""
        self._ensure_journal()
        rev, offset = self._read_rev()
        size = self._journal.stat().st_size
        if offset < 0 or size == offset:
            return rev, offset
        with open(self._journal, "rb") as f:
            f.seek(offset)
            tail = f.read()
        good = offset
        for raw in tail.splitlines(keepends=True):
            if not raw.endswith(b"\n"):
                break
            try:
                line = json.loads(raw)
                line_rev, ops = int(line["rev"]), line["ops"]
            except (ValueError, KeyError, TypeError):
                break
            if line_rev > rev:
                self._apply_files(line_rev, ops)
                rev = line_rev
            good += len(raw)
        if good < size:
            with open(self._journal, "r+b") as f:
                f.truncate(good)
        _write_atomic(self.directory / "rev", f"{rev} {good}".encode())
        _log.warning("config store repaired after an interrupted write", store=self.url, rev=rev)
        return rev, good

    def _apply_files(self, rev: int, ops: list[list[Any]]) -> None:
        for key, value in ops:
            path = self._data_path(key)
            if value is None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            _mkdir_private(path.parent)
            _write_atomic(path, json.dumps({"mod_revision": rev, "value": value}).encode())

    def _read_entry(self, key: str, path: Path) -> Entry | None:
        try:
            data = json.loads(path.read_bytes())
            return Entry(key, str(data["value"]), int(data["mod_revision"]))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            _log.warning("skipping unreadable config entry", path=str(path), error=str(exc))
            return None

    # -- the KV interface -----------------------------------------------------------------

    async def get(self, key: str) -> Entry | None:
        path = self._data_path(key)
        async with self._locked(exclusive=False):
            return self._read_entry(key, path)

    async def scan(self, prefix: str) -> Listing:
        validate_prefix(prefix)
        base = self.directory.joinpath("kv", *prefix[:-1].split("/"))
        async with self._locked(exclusive=False):
            try:
                rev, _ = self._read_rev()
                entries: dict[str, Entry] = {}
                for root, _dirs, files in os.walk(base):
                    rel = Path(root).relative_to(base)
                    for name in files:
                        if not name.startswith("="):
                            continue
                        parts = [*rel.parts, name[1:]] if rel.parts else [name[1:]]
                        key = prefix + "/".join(parts)
                        entry = self._read_entry(key, Path(root) / name)
                        if entry is not None:
                            entries[key] = entry
            except OSError as exc:
                raise Unavailable(f"cannot read config store {self.directory}: {exc}") from exc
        return Listing(entries, rev)

    async def txn(self, compares: Sequence[tuple[str, int]], ops: Sequence[Put | Delete]) -> bool:
        paths = {c[0]: self._data_path(c[0]) for c in compares}
        for op in ops:
            self._data_path(op.key)
        async with self._locked(exclusive=True):
            try:
                rev, offset = self._repair()
                for key, expected in compares:
                    entry = self._read_entry(key, paths[key])
                    if (entry.mod_revision if entry else 0) != expected:
                        return False
                if not ops:
                    return True
                rev += 1
                line_ops = [[op.key, op.value if isinstance(op, Put) else None] for op in ops]
                line = json.dumps({"rev": rev, "ops": line_ops}, separators=(",", ":")) + "\n"
                data = line.encode()
                if offset + len(data) > self.max_journal and offset > 64:
                    # Compact: the new journal starts after the current revision.
                    header = json.dumps({"base": rev - 1}).encode() + b"\n"
                    _write_atomic(self._journal, header)
                    offset = len(header)
                _append(self._journal, data)
                self._apply_files(rev, line_ops)
                _write_atomic(self.directory / "rev", f"{rev} {offset + len(data)}".encode())
            except OSError as exc:
                raise Unavailable(f"cannot write config store {self.directory}: {exc}") from exc
        return True

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[list[Event]]:
        validate_prefix(prefix)
        async with self._locked(exclusive=True):
            try:
                self._repair()
            except OSError as exc:
                raise Unavailable(f"cannot read config store {self.directory}: {exc}") from exc
        f = self._open_journal(start_revision)
        buffer = b""
        try:
            while not self._closed:
                chunk = f.read()
                if chunk:
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    batches = [
                        b for b in (self._events(raw, prefix, start_revision) for raw in lines) if b
                    ]
                    for batch in batches:
                        start_revision = batch[-1].revision + 1
                        yield batch
                    continue
                if self._rotated(f):
                    # Finish the old file (read above to its end), then follow the new one.
                    f.close()
                    if self._read_rev()[0] < start_revision - 1:
                        # The store was wiped and started again from revision 0.
                        raise Unavailable(f"config store {self.url} was reset")
                    f = self._open_journal(start_revision)
                    buffer = b""
                    continue
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_interval):
                        await self._closed_event.wait()
        finally:
            f.close()

    def _open_journal(self, start_revision: int) -> Any:
        try:
            f = open(self._journal, "rb")  # noqa: SIM115 - kept open across yields
        except OSError as exc:
            raise Unavailable(f"cannot read config journal {self._journal}: {exc}") from exc
        try:
            base = int(json.loads(f.readline())["base"])
        except (ValueError, KeyError, TypeError) as exc:
            f.close()
            raise Unavailable(f"config journal {self._journal} has no header: {exc}") from exc
        if start_revision <= base:
            f.close()
            raise Compacted(
                f"config store {self.url} compacted revisions up to {base}, "
                f"a watch needed {start_revision}"
            )
        return f

    def _rotated(self, f: Any) -> bool:
        try:
            st = os.stat(self._journal)
        except FileNotFoundError:
            return False
        own = os.fstat(f.fileno())
        return st.st_ino != own.st_ino or st.st_size < f.tell()

    @staticmethod
    def _events(raw: bytes, prefix: str, start_revision: int) -> list[Event]:
        try:
            line = json.loads(raw)
            rev = int(line["rev"])
        except (ValueError, KeyError, TypeError):
            return []
        if rev < start_revision:
            return []
        return [
            Event("put" if value is not None else "delete", key, value, rev)
            for key, value in line["ops"]
            if key.startswith(prefix)
        ]

    async def close(self) -> None:
        self._closed = True
        self._closed_event.set()
