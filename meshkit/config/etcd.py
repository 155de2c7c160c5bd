"""The etcd config store backend (``etcd://host:port[,host:port…][?prefix=/meshkit/config]``).

Keys live under ``prefix`` (default ``/meshkit/config``); :meth:`EtcdKV.txn` is one etcd
transaction (``mod_revision`` comparisons, then puts and deletes), and :meth:`EtcdKV.watch`
is an etcd prefix watch from the requested revision, so a watcher that reconnects after
an outage with ``last revision + 1`` receives every change it missed, in order (etcd
answers ``compacted`` when that history is gone, surfaced as
:class:`~meshkit.config.kv.Compacted`).

Connections follow the registry's etcd backend (:mod:`meshkit.registry.etcd`, whose
endpoint parsing and gRPC channel options are reused): one ``aetcd`` client at a time,
endpoints tried in URL order; a connection error drops that client (its watches end
with :class:`~meshkit.errors.Unavailable`) and the next request connects again, starting
after the endpoint that failed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

import structlog

from .. import _etcd as _reg
from .._redact import redact_url
from ..errors import ConfigError, Unavailable
from .kv import KV, Compacted, Delete, Entry, Event, Listing, Put, validate_key, validate_prefix

__all__ = ["DEFAULT_PREFIX", "EtcdKV"]

_log = structlog.get_logger("meshkit.config")

DEFAULT_PREFIX = "/meshkit/config"
_URL_PARAMS = ("prefix", "connect_timeout", "request_timeout")
_END = object()


class EtcdKV(KV):
    """Config key-value store on etcd v3; see the module documentation."""

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        prefix: str = DEFAULT_PREFIX,
        connect_timeout: float = _reg.DEFAULT_CONNECT_TIMEOUT,
        request_timeout: float = _reg.DEFAULT_REQUEST_TIMEOUT,
        url: str | None = None,
    ) -> None:
        if _reg.aetcd is None:
            raise ConfigError(
                "the etcd config store needs the aetcd package: pip install 'meshkit[etcd]'"
            )
        items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
        where = ",".join(items)
        self.endpoints = [_reg.parse_endpoint(e, where) for e in items]
        if not self.endpoints:
            raise ConfigError(f"expected at least one etcd endpoint, found {where!r}")
        if not isinstance(prefix, str) or not prefix.startswith("/") or "\x00" in prefix:
            raise ConfigError(f"expected a key prefix starting with '/', found {prefix!r}")
        self.prefix = prefix.rstrip("/") + "/"
        self.connect_timeout = _reg.positive("connect_timeout", connect_timeout)
        self.request_timeout = _reg.positive("request_timeout", request_timeout)
        self.url = url or "etcd://" + ",".join(
            _reg.format_endpoint(h, p) for h, p in self.endpoints
        )
        self._client: Any = None
        self._first = 0
        self._lock = asyncio.Lock()
        self._watch_queues: set[asyncio.Queue[object]] = set()
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    @classmethod
    def from_url(cls, url: str, **options: Any) -> EtcdKV:
        """``etcd://h:p[,h:p…]`` with optional ``?prefix=&connect_timeout=&request_timeout=``."""
        parts = urlsplit(url)
        shown = redact_url(url)
        if parts.scheme != "etcd":
            raise ConfigError(f"expected an etcd:// config URL, found {shown!r}")
        if "@" in parts.netloc:
            raise ConfigError(
                f"expected etcd://host:port[,host:port…] without credentials, found {shown!r}"
            )
        if not parts.netloc:
            raise ConfigError(f"expected etcd://host:port[,host:port…], found {shown!r}")
        if parts.path not in ("", "/") or parts.fragment:
            raise ConfigError(
                f"expected etcd://host:port[,host:port…][?prefix=…], found {shown!r} "
                "(set the key prefix with ?prefix=)"
            )
        params: dict[str, Any] = {}
        for name, values in parse_qs(parts.query, keep_blank_values=True).items():
            if name not in _URL_PARAMS:
                raise ConfigError(
                    f"expected etcd:// parameters {', '.join(_URL_PARAMS)}, "
                    f"found {name!r} in {shown!r}"
                )
            if name == "prefix":
                params[name] = values[-1]
                continue
            try:
                params[name] = float(values[-1])
            except ValueError:
                raise ConfigError(
                    f"expected {name} to be a number, found {values[-1]!r} in {shown!r}"
                ) from None
        params.update(options)
        return cls(parts.netloc, url=url.split("?")[0], **params)

    # -- connection -----------------------------------------------------------------------

    async def _connect(self) -> Any:
        client = self._client
        if client is not None:
            return client
        async with self._lock:
            if self._client is not None:
                return self._client
            if self._closed:
                raise Unavailable(f"config store {self.url} is closed")
            failures = []
            count = len(self.endpoints)
            for k in range(count):
                index = (self._first + k) % count
                host, port = self.endpoints[index]
                client = _reg.aetcd.Client(
                    host, port, timeout=self.request_timeout, options=dict(_reg.CHANNEL_OPTIONS)
                )
                try:
                    await client.connect()
                    await _reg.wait_ready(client.channel, self.connect_timeout)
                except Exception as exc:
                    failures.append(f"{host}:{port}: {_reg.error_text(exc) or 'timed out'}")
                    await _reg.close_client(client)
                    continue
                client.meshkit_index = index
                self._client = client
                return client
            raise Unavailable(f"cannot reach etcd at {self.url}: " + "; ".join(failures))

    def _drop(self, client: Any, exc: BaseException) -> Unavailable:
        if self._client is client:
            self._client = None
            self._first = (getattr(client, "meshkit_index", 0) + 1) % len(self.endpoints)
            for queue in list(self._watch_queues):
                queue.put_nowait(Unavailable(f"etcd connection dropped: {_reg.error_text(exc)}"))
            task = asyncio.get_running_loop().create_task(_reg.close_client(client))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        return Unavailable(f"etcd at {self.url} failed: {_reg.error_text(exc)}")

    async def _call(self, fn: str, *args: Any, **kwargs: Any) -> Any:
        client = await self._connect()
        try:
            return await getattr(client, fn)(*args, **kwargs)
        except _reg.CONNECTION_ERRORS as exc:
            raise self._drop(client, exc) from exc
        except _reg.aetcd.exceptions.ClientError as exc:
            raise Unavailable(f"etcd at {self.url} refused: {_reg.error_text(exc)}") from exc

    def _key(self, key: str) -> bytes:
        return (self.prefix + validate_key(key)).encode()

    # -- the KV interface -----------------------------------------------------------------

    async def get(self, key: str) -> Entry | None:
        got = await self._call("get", self._key(key))
        if got is None:
            return None
        return Entry(key, got.value.decode(), int(got.mod_revision))

    async def scan(self, prefix: str) -> Listing:
        full = (self.prefix + validate_prefix(prefix)).encode()
        result = await self._call("get_prefix", full)
        cut = len(self.prefix)
        entries = {
            kv.key.decode()[cut:]: Entry(
                kv.key.decode()[cut:], kv.value.decode(), int(kv.mod_revision)
            )
            for kv in result
        }
        return Listing(entries, int(result.header.revision) if hasattr(result, "header") else 0)

    async def txn(self, compares: Sequence[tuple[str, int]], ops: Sequence[Put | Delete]) -> bool:
        client = await self._connect()
        tx = client.transactions
        checks = [tx.mod(self._key(key)) == rev for key, rev in compares]
        success = [
            tx.put(self._key(op.key), op.value.encode())
            if isinstance(op, Put)
            else tx.delete(self._key(op.key))
            for op in ops
        ]
        try:
            ok, _ = await client.transaction(compare=checks, success=success, failure=[])
        except _reg.CONNECTION_ERRORS as exc:
            raise self._drop(client, exc) from exc
        except _reg.aetcd.exceptions.ClientError as exc:
            raise Unavailable(f"etcd at {self.url} refused: {_reg.error_text(exc)}") from exc
        return bool(ok)

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[list[Event]]:
        full = (self.prefix + validate_prefix(prefix)).encode()
        client = await self._connect()
        queue: asyncio.Queue[object] = asyncio.Queue()
        self._watch_queues.add(queue)
        pump = asyncio.create_task(
            _pump(client, full, start_revision, queue), name="meshkit-config-etcd-watch"
        )
        cut = len(self.prefix)
        try:
            while True:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                batch: list[Event] = []
                for item in items:
                    if item is _END:
                        if self._closed:
                            return
                        raise Unavailable(f"etcd watch on {self.url} ended")
                    if isinstance(item, _reg.aetcd.exceptions.RevisionCompactedError):
                        raise Compacted(f"etcd compacted the revisions a watch needed: {item}")
                    if isinstance(item, Unavailable):
                        raise item
                    if isinstance(item, BaseException):
                        if isinstance(item, _reg.CONNECTION_ERRORS):
                            raise self._drop(client, item)
                        raise Unavailable(f"etcd watch failed: {_reg.error_text(item)}")
                    kv = item.kv  # type: ignore[attr-defined]
                    deleted = item.kind == "DELETE"  # type: ignore[attr-defined]
                    batch.append(
                        Event(
                            "delete" if deleted else "put",
                            kv.key.decode()[cut:],
                            None if deleted else kv.value.decode(),
                            int(kv.mod_revision),
                        )
                    )
                if batch:
                    yield batch
        finally:
            self._watch_queues.discard(queue)
            await _reg.cancel_and_wait(pump)

    async def close(self) -> None:
        self._closed = True
        for queue in list(self._watch_queues):
            queue.put_nowait(_END)
        client, self._client = self._client, None
        if client is not None:
            await _reg.close_client(client)
        if self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)


async def _pump(client: Any, prefix: bytes, start: int, queue: asyncio.Queue[object]) -> None:
    stream: Any = None
    try:
        stream = await client.watch_prefix(prefix, start_revision=start)
        async for event in stream:
            queue.put_nowait(event)
    except Exception as exc:
        queue.put_nowait(exc)
    else:
        queue.put_nowait(_END)
    finally:
        if stream is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await stream.cancel()
