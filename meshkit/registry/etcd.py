"""The etcd registry backend (``etcd://host:port[,host:port…]``), on asyncio-native ``aetcd``.

Layout: one key per instance, ``<prefix>/<service>/<instance_id>`` (prefix
``/meshkit/services`` by default), whose value is the JSON instance record and which is
bound to a lease of ``ttl`` seconds that this process keeps alive.

Keep-alive and repair. Every ``ttl / 3`` seconds a background task per registration
sends one lease keep-alive and reads its own key back (one small range request). If the
keep-alive says the lease is gone (TTL <= 0: it expired during an outage longer than the
TTL, or etcd lost its data), it grants a new lease and puts the record again; if the key
is missing or differs (someone deleted or overwrote it), it puts the record again on the
current lease. Failures are retried with a short backoff, logged once per outage, and
reflected in :attr:`EtcdRegistry.status`.

Watches. :meth:`EtcdRegistry.watch` reads the service prefix once, yields that snapshot,
then follows an etcd watch from the read's revision + 1, applying puts and deletes to an
in-memory map and yielding a full snapshot after each batch of events (never two equal
snapshots in a row). If the revision was compacted meanwhile it reads the prefix again
and continues. If the connection breaks it raises :class:`~meshkit.errors.Unavailable`;
the caller (:class:`~meshkit.registry.RegistryResolver`) keeps its last snapshot and opens
a new watch later, which reads the prefix afresh.

Connections. aetcd talks to one endpoint per client. The registry connects to the
endpoints in URL order (the first whose gRPC channel becomes ready within
``connect_timeout`` wins). A connection error on any request retires that client: watches
on it end with ``Unavailable`` and the next request connects again, trying the endpoints
in order starting after the one that failed (so a member that accepts connections but
fails requests, e.g. one without a leader, is not picked again first).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import structlog

from .._etcd import (
    CHANNEL_OPTIONS,
    CONNECTION_ERRORS,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_PORT,
    DEFAULT_REQUEST_TIMEOUT,
    ETCD_ERRORS,
    IMPORT_ERROR,
    aetcd,
    cancel_and_wait,
    close_client,
    error_text,
    format_endpoint,
    parse_endpoint,
    positive,
    wait_ready,
)
from .._redact import redact_url
from ..errors import ConfigError, InvalidArgument, Unavailable
from .base import Instance, Registry, validate_instance_id, validate_service_name

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_PORT",
    "DEFAULT_PREFIX",
    "DEFAULT_REQUEST_TIMEOUT",
    "DEFAULT_TTL",
    "EtcdRegistry",
]

_log = structlog.get_logger("meshkit.registry")

DEFAULT_TTL = 10.0
DEFAULT_PREFIX = "/meshkit/services"
#: First retry delay of a failing keep-alive (doubles up to ``ttl / 3``).
_RETRY_MIN = 0.25
#: How long close() spends withdrawing own registrations.
_CLOSE_BUDGET = 2.0

_URL_PARAMS = ("ttl", "prefix", "connect_timeout", "request_timeout")


class _Retired:
    """Queue item telling a watch that its connection was retired."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


_END = object()  # queue item: the aetcd watch stream ended without an error


@dataclass(eq=False)
class _Conn:
    """One aetcd client (one endpoint) and who is using it."""

    client: Any
    endpoint: str
    index: int  # position in EtcdRegistry.endpoints
    users: int = 0
    retired: bool = False
    reason: str = ""
    closing: bool = False
    watch_queues: set[asyncio.Queue[object]] = field(default_factory=set)


@dataclass(eq=False)
class _Registration:
    instance: Instance
    key: bytes
    value: bytes
    lease_id: int = 0
    granted_ttl: float = 0.0
    task: asyncio.Task[None] | None = None
    #: Serializes publishing, keep-alive rounds and withdrawal of this record.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class EtcdRegistry(Registry):
    """Registry on an etcd v3 cluster; see the module docstring.

    ``endpoints``: ``"host:port"``, ``"h1:p1,h2:p2"`` or a sequence of ``host:port``
    (tried in order). ``ttl``: lease TTL in seconds (etcd grants whole seconds; at least
    1, and etcd may raise it to its minimum). ``prefix``: key prefix. ``connect_timeout``:
    how long to wait for one endpoint's channel to become ready. ``request_timeout``:
    deadline of each etcd request.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str] = f"127.0.0.1:{DEFAULT_PORT}",
        *,
        ttl: float = DEFAULT_TTL,
        prefix: str = DEFAULT_PREFIX,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        url: str | None = None,
    ) -> None:
        if aetcd is None:
            raise ConfigError(
                "the etcd registry needs the aetcd package: pip install 'meshkit[etcd]' "
                f"({IMPORT_ERROR})"
            )
        items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
        where = endpoints if isinstance(endpoints, str) else ",".join(items)
        #: ``(host, port)`` pairs, in the order they are tried.
        self.endpoints: list[tuple[str, int]] = [parse_endpoint(e, where) for e in items]
        if not self.endpoints:
            raise ConfigError(f"expected at least one etcd endpoint, found {where!r}")
        self.ttl = positive("ttl", ttl)
        self.connect_timeout = positive("connect_timeout", connect_timeout)
        self.request_timeout = positive("request_timeout", request_timeout)
        if not isinstance(prefix, str) or not prefix.startswith("/") or "\x00" in prefix:
            raise ConfigError(f"expected a key prefix starting with '/', found {prefix!r}")
        self.prefix = prefix.rstrip("/")
        if url is None:
            url = "etcd://" + ",".join(format_endpoint(h, p) for h, p in self.endpoints)
        super().__init__(url)
        self._conn: _Conn | None = None
        self._first = 0  # index of the endpoint the next connect tries first
        self._connect_lock = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()
        self._own: dict[bytes, _Registration] = {}
        self._warned: dict[bytes, int] = {}  # key -> mod revision already warned about
        self._watch_queues: set[asyncio.Queue[object]] = set()
        self._closed = False

    @classmethod
    def from_url(cls, url: str, **options: Any) -> EtcdRegistry:
        """``etcd://host:port[,host:port…]``, optionally ``?ttl=10&prefix=/x&connect_timeout=2
        &request_timeout=5``. Keyword ``options`` override query parameters.
        """
        parts = urlsplit(url)
        shown = redact_url(url)
        if parts.scheme != "etcd":
            raise ConfigError(f"expected an etcd:// registry URL, found {shown!r}")
        if "@" in parts.netloc:
            raise ConfigError(
                f"expected etcd://host:port[,host:port…] without credentials, found {shown!r}"
            )
        if parts.path not in ("", "/") or parts.fragment:
            raise ConfigError(
                f"expected etcd://host:port[,host:port…][?ttl=…&prefix=…], found {shown!r} "
                f"(set the key prefix with ?prefix=)"
            )
        if not parts.netloc:
            raise ConfigError(f"expected etcd://host:port, found no endpoint in {shown!r}")
        params: dict[str, Any] = {}
        for name, values in parse_qs(parts.query, keep_blank_values=True).items():
            if name not in _URL_PARAMS:
                raise ConfigError(
                    f"expected etcd:// parameters {', '.join(_URL_PARAMS)}, "
                    f"found {name!r} in {shown!r}"
                )
            value = values[-1]
            if name == "prefix":
                params[name] = value
                continue
            try:
                params[name] = float(value)
            except ValueError:
                raise ConfigError(
                    f"expected {name} to be a number, found {value!r} in {shown!r}"
                ) from None
        params.update(options)
        return cls(parts.netloc, url=url, **params)

    # -- public helpers -----------------------------------------------------------------

    def key_for(self, service: str, instance_id: str) -> str:
        """The etcd key of an instance record: ``<prefix>/<service>/<instance_id>``."""
        validate_service_name(service)
        validate_instance_id(instance_id)
        return f"{self.prefix}/{service}/{instance_id}"

    @property
    def endpoint(self) -> str | None:
        """The endpoint currently connected to (``None`` when not connected)."""
        conn = self._conn
        return conn.endpoint if conn is not None and not conn.retired else None

    # -- the Registry interface -------------------------------------------------------

    async def register(self, instance: Instance) -> None:
        """Put the record on a fresh lease and keep the lease alive in the background.

        Registering the same instance id again updates the record (same lease). Raises
        :class:`~meshkit.errors.Unavailable` if etcd cannot be reached now.
        """
        self._check_open()
        key = self.key_for(instance.service, instance.instance_id).encode()
        value = json.dumps(instance.to_dict(), separators=(",", ":")).encode()
        reg = self._own.get(key)
        if reg is None:
            reg = self._own[key] = _Registration(instance, key, value)
        async with reg.lock:
            reg.instance, reg.value = instance, value
            try:
                await self._publish(reg)
            except BaseException:
                if reg.task is None and self._own.get(key) is reg:
                    del self._own[key]  # never published: nothing to keep alive
                raise
        if self._own.get(key) is not reg:
            return  # deregistered or closed meanwhile
        if reg.task is None or reg.task.done():
            reg.task = asyncio.create_task(
                self._keepalive(reg), name=f"meshkit-etcd-keepalive-{instance.instance_id}"
            )

    async def deregister(self, instance: Instance) -> None:
        """Stop the keep-alive, delete the key and revoke its lease."""
        key = self.key_for(instance.service, instance.instance_id).encode()
        if self._closed:
            return  # close() already withdrew this registry's own records
        reg = self._own.pop(key, None)
        if reg is None:
            await self._withdraw(key, 0)
            return
        await self._stop_keepalive(reg)
        async with reg.lock:  # wait for a register() of this instance in progress
            await self._withdraw(key, reg.lease_id)

    async def resolve(self, service: str) -> list[Instance]:
        """The records under ``<prefix>/<service>/`` now (malformed ones skipped)."""
        validate_service_name(service)
        self._check_open()
        records: dict[bytes, Instance] = {}
        async with self._use() as conn:
            await self._load(conn, service, records)
        return _snapshot(records)

    async def watch(self, service: str) -> AsyncGenerator[list[Instance], None]:
        """The current snapshot, then one per change; see the module docstring.

        Raises :class:`~meshkit.errors.Unavailable` when the connection breaks; ends when
        the registry is closed.
        """
        validate_service_name(service)
        self._check_open()
        prefix = self._service_prefix(service)
        queue: asyncio.Queue[object] = asyncio.Queue()
        # No "async with" around the yields: an abandoned generator is finalized by the
        # loop, and a nested context-manager generator may be finalized before it.
        conn = await self._acquire()
        self._watch_queues.add(queue)
        conn.watch_queues.add(queue)
        pump: asyncio.Task[None] | None = None
        try:
            records: dict[bytes, Instance] = {}
            revision = await self._load(conn, service, records)
            last = _snapshot(records)
            yield last
            while not self._closed:
                # The etcd watch is created and read in a task of its own: aetcd creates it
                # under asyncio.wait_for, which on 3.11 can swallow a cancellation of the
                # task it runs in (see cancel_and_wait).
                pump = asyncio.create_task(
                    _pump(conn, prefix, revision + 1, queue), name=f"meshkit-etcd-watch-{service}"
                )
                compacted: BaseException | None = None
                while compacted is None:
                    batch = [await queue.get()]
                    while not queue.empty():
                        batch.append(queue.get_nowait())
                    for item in batch:
                        if item is _END or isinstance(item, _Retired):
                            if self._closed:
                                return
                            reason = item.reason if isinstance(item, _Retired) else "stream ended"
                            raise Unavailable(
                                f"etcd watch of {service!r} at {conn.endpoint} ended: {reason}"
                            )
                        if isinstance(item, aetcd.exceptions.RevisionCompactedError):
                            compacted = item
                            break
                        if isinstance(item, BaseException):
                            raise item
                        revision = max(revision, self._apply(service, item, records))
                    self._mark_ok()
                    snapshot = _snapshot(records)
                    if snapshot != last:
                        last = snapshot
                        yield snapshot
                await cancel_and_wait(pump)
                pump = None
                while not queue.empty():  # leftovers of the compacted stream
                    queue.get_nowait()
                _log.info(
                    "etcd watch revision compacted; reloading",
                    service=service,
                    registry=self.url,
                    error=error_text(compacted),
                )
                records.clear()
                revision = await self._load(conn, service, records)
                snapshot = _snapshot(records)
                if snapshot != last:
                    last = snapshot
                    yield snapshot
        except Unavailable:
            raise
        except ETCD_ERRORS as exc:
            raise self._failure(conn, exc) from exc
        finally:
            try:
                self._watch_queues.discard(queue)
                conn.watch_queues.discard(queue)
                if pump is not None:
                    await cancel_and_wait(pump)
            finally:
                self._release(conn)

    async def close(self) -> None:
        """Stop keep-alives, end watches, withdraw own records (bounded), close clients."""
        if self._closed:
            return
        self._closed = True
        regs = list(self._own.values())
        self._own.clear()
        await asyncio.gather(*(self._stop_keepalive(r) for r in regs), return_exceptions=True)
        for queue in list(self._watch_queues):
            queue.put_nowait(_END)
        if regs:
            try:
                async with asyncio.timeout(min(_CLOSE_BUDGET, self.request_timeout)):
                    await asyncio.gather(
                        *(self._withdraw(r.key, r.lease_id) for r in regs),
                        return_exceptions=True,
                    )
            except TimeoutError:
                _log.warning(
                    "etcd registry closed before withdrawing its records; "
                    "they expire with their leases",
                    registry=self.url,
                    instances=[r.instance.instance_id for r in regs],
                )
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.retired = True
            if conn.users == 0:
                self._close_later(conn)
        # Give watches a moment to notice and release their connections.
        for _ in range(10):
            if conn is None or conn.users == 0:
                break
            await asyncio.sleep(0.01)
        if conn is not None and conn.users:
            self._close_later(conn)  # a watch nobody iterates any more: close anyway
        if self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)

    # -- watch internals ----------------------------------------------------------------

    async def _load(self, conn: _Conn, service: str, records: dict[bytes, Instance]) -> int:
        """Read every record of ``service`` into ``records``; returns the header revision."""
        result = await conn.client.get_prefix(self._service_prefix(service))
        self._mark_ok()
        for kv in result.kvs:
            instance = self._parse(service, kv.key, kv.value, kv.mod_revision)
            if instance is not None:
                records[kv.key] = instance
        return int(result.header.revision)

    def _apply(self, service: str, event: Any, records: dict[bytes, Instance]) -> int:
        """Apply one watch event to ``records``; returns its revision."""
        kv = event.kv
        if event.kind == "DELETE":
            records.pop(kv.key, None)
            self._warned.pop(kv.key, None)
        else:
            instance = self._parse(service, kv.key, kv.value, kv.mod_revision)
            if instance is None:
                records.pop(kv.key, None)
            else:
                records[kv.key] = instance
        return int(kv.mod_revision)

    def _parse(self, service: str, key: bytes, value: bytes, revision: int) -> Instance | None:
        """The instance in a record, or None (one warning per key and version) if malformed."""
        expected = self._service_prefix(service)
        try:
            instance_id = key[len(expected) :].decode()
            instance = Instance.from_dict(json.loads(value))
            if instance.service != service or instance.instance_id != instance_id:
                raise InvalidArgument(
                    f"expected a record for {service}/{instance_id}, "
                    f"found {instance.service}/{instance.instance_id}"
                )
        except (ValueError, InvalidArgument) as exc:  # JSON and UTF-8 errors are ValueErrors
            if self._warned.get(key) != revision:
                self._warned[key] = revision
                _log.warning(
                    "skipping malformed registry record",
                    key=key.decode(errors="replace"),
                    mod_revision=revision,
                    error=error_text(exc),
                )
            return None
        self._warned.pop(key, None)
        return instance

    def _service_prefix(self, service: str) -> bytes:
        return f"{self.prefix}/{service}/".encode()

    # -- registration internals ---------------------------------------------------------

    async def _publish(self, reg: _Registration) -> None:
        """Grant a lease if ``reg`` has none, then put its record on that lease."""
        async with self._use() as conn:
            for _ in range(2):
                if not reg.lease_id:
                    lease = await conn.client.lease(max(1, math.ceil(self.ttl)))
                    reg.lease_id, reg.granted_ttl = int(lease.id), float(lease.ttl)
                try:
                    await conn.client.put(reg.key, reg.value, lease=reg.lease_id)
                except aetcd.exceptions.ClientError as exc:
                    if "lease not found" not in str(exc) or isinstance(exc, CONNECTION_ERRORS):
                        raise
                    reg.lease_id = 0  # expired between grant/keep-alive and put: again
                    continue
                self._mark_ok()
                return
            raise Unavailable(f"etcd lost the lease of {reg.key.decode()} twice in a row")

    async def _keepalive(self, reg: _Registration) -> None:
        failing = False
        delay = self._interval(reg)
        while True:
            await asyncio.sleep(delay)
            try:
                async with reg.lock:
                    await self._keep(reg)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:
                    _log.warning(
                        "etcd keep-alive failed; will keep trying",
                        service=reg.instance.service,
                        instance=reg.instance.instance_id,
                        registry=self.url,
                        error=error_text(exc),
                    )
                interval = self._interval(reg)
                delay = min(delay * 2, interval) if failing else min(_RETRY_MIN, interval)
                failing = True
                continue
            if failing:
                _log.info(
                    "etcd keep-alive recovered",
                    service=reg.instance.service,
                    instance=reg.instance.instance_id,
                    registry=self.url,
                )
            failing = False
            delay = self._interval(reg)

    def _interval(self, reg: _Registration) -> float:
        return max((reg.granted_ttl or self.ttl) / 3, 0.05)

    async def _keep(self, reg: _Registration) -> None:
        """One keep-alive round: refresh the lease, verify the key, repair what is lost."""
        async with self._use() as conn:
            if reg.lease_id:
                reply = await conn.client.refresh_lease(reg.lease_id)
                if reply is None:
                    raise ConnectionError("etcd closed the lease keep-alive stream")
                if reply.TTL <= 0:
                    _log.warning(
                        "etcd lease lost; registering again",
                        service=reg.instance.service,
                        instance=reg.instance.instance_id,
                        lease=reg.lease_id,
                        registry=self.url,
                    )
                    reg.lease_id = 0
            if reg.lease_id:
                got = await conn.client.get(reg.key)
                self._mark_ok()
                if got is not None and got.lease == reg.lease_id and got.value == reg.value:
                    return
                _log.warning(
                    "registry record vanished or changed; registered it again",
                    service=reg.instance.service,
                    instance=reg.instance.instance_id,
                    key=reg.key.decode(),
                    found="nothing" if got is None else f"lease {got.lease}",
                )
        await self._publish(reg)
        _log.info(
            "registered again",
            service=reg.instance.service,
            instance=reg.instance.instance_id,
            lease=reg.lease_id,
            registry=self.url,
        )

    async def _stop_keepalive(self, reg: _Registration) -> None:
        task, reg.task = reg.task, None
        if task is not None:
            await cancel_and_wait(task)

    async def _withdraw(self, key: bytes, lease_id: int) -> None:
        async with self._use(closing=True) as conn:
            await conn.client.delete(key)
            if lease_id:
                try:
                    await conn.client.revoke_lease(lease_id)
                except aetcd.exceptions.ClientError as exc:
                    if "lease not found" not in str(exc) or isinstance(exc, CONNECTION_ERRORS):
                        raise
            self._mark_ok()

    # -- connection internals -----------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable(f"registry {self.url} is closed")

    @contextlib.asynccontextmanager
    async def _use(self, *, closing: bool = False) -> AsyncIterator[_Conn]:
        """A connected client for one operation; maps etcd failures to ``Unavailable``.

        A connection error retires the client (see :meth:`_retire`). ``closing`` allows
        connecting while :meth:`close` withdraws own records.
        """
        conn = await self._acquire(closing=closing)
        try:
            yield conn
        except Unavailable:
            raise
        except ETCD_ERRORS as exc:
            raise self._failure(conn, exc) from exc
        finally:
            self._release(conn)

    async def _acquire(self, *, closing: bool = False) -> _Conn:
        conn = await self._connection(closing=closing)
        conn.users += 1
        return conn

    def _release(self, conn: _Conn) -> None:
        conn.users -= 1
        if conn.retired and conn.users == 0:
            self._close_later(conn)

    def _failure(self, conn: _Conn, exc: BaseException) -> Unavailable:
        """Record a failed request on ``conn``; the error to raise."""
        self._mark_error(exc, conn.endpoint)
        if isinstance(exc, CONNECTION_ERRORS):
            self._retire(conn, exc)
            return Unavailable(f"etcd at {conn.endpoint} failed: {error_text(exc)}")
        return Unavailable(f"etcd at {conn.endpoint} refused: {error_text(exc)}")

    async def _connection(self, *, closing: bool = False) -> _Conn:
        conn = self._conn
        if conn is not None and not conn.retired:
            return conn
        async with self._connect_lock:
            conn = self._conn
            if conn is not None and not conn.retired:
                return conn
            if self._closed and not closing:
                raise Unavailable(f"registry {self.url} is closed")
            failures: list[str] = []
            count = len(self.endpoints)
            for index in (self._first + k for k in range(count)):
                index %= count
                host, port = self.endpoints[index]
                endpoint = format_endpoint(host, port)
                client = aetcd.Client(
                    host, port, timeout=self.request_timeout, options=dict(CHANNEL_OPTIONS)
                )
                try:
                    await client.connect()
                    await wait_ready(client.channel, self.connect_timeout)
                except Exception as exc:
                    failures.append(f"{endpoint}: {error_text(exc) or 'timed out'}")
                    with contextlib.suppress(Exception):
                        await client.close()
                    continue
                conn = self._conn = _Conn(client, endpoint, index)
                if failures:
                    _log.warning(
                        "etcd endpoint unreachable; connected to the next one",
                        registry=self.url,
                        endpoint=endpoint,
                        failed=failures,
                    )
                return conn
            message = f"cannot reach etcd at {self.url}: " + "; ".join(failures)
            self._mark_error(message, None)
            raise Unavailable(message)

    def _retire(self, conn: _Conn, exc: BaseException | str) -> None:
        if conn.retired:
            return
        conn.retired = True
        conn.reason = exc if isinstance(exc, str) else error_text(exc)
        if self._conn is conn:
            self._conn = None
            self._first = (conn.index + 1) % len(self.endpoints)
        for queue in list(conn.watch_queues):
            queue.put_nowait(_Retired(conn.reason))

    def _close_later(self, conn: _Conn) -> None:
        if conn.closing:
            return
        conn.closing = True
        task = asyncio.create_task(close_client(conn.client), name="meshkit-etcd-close")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _mark_ok(self) -> None:
        if self.status.mark_ok():
            _log.info("etcd reachable again", registry=self.url, endpoint=self.endpoint)

    def _mark_error(self, exc: BaseException | str, endpoint: str | None) -> None:
        if self.status.mark_error(exc):
            _log.warning(
                "etcd unreachable",
                registry=self.url,
                endpoint=endpoint,
                error=exc if isinstance(exc, str) else error_text(exc),
            )


def _snapshot(records: dict[bytes, Instance]) -> list[Instance]:
    return sorted(records.values(), key=lambda i: i.instance_id)


async def _pump(conn: _Conn, prefix: bytes, start: int, queue: asyncio.Queue[object]) -> None:
    """Watch ``prefix`` from revision ``start``; events go to ``queue``, then an error or _END."""
    stream: Any = None
    try:
        stream = await conn.client.watch_prefix(prefix, start_revision=start)
        async for event in stream:
            queue.put_nowait(event)
    except Exception as exc:
        queue.put_nowait(exc)
    else:
        queue.put_nowait(_END)
    finally:
        if stream is not None and not conn.retired:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await stream.cancel()
