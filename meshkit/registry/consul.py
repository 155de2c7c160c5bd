"""The Consul registry backend (``consul://host:8500``), over the agent's HTTP API v1.

Why plain HTTP (aiohttp, already a dependency) rather than ``py-consul``: meshkit is
asyncio-native and ``py-consul`` is synchronous (``requests``), so every call, and every
30-second blocking query, would hold a thread; and we use only five endpoints, each a
few lines of HTTP:

* ``PUT /v1/agent/service/register``: an agent service whose ID is the instance id, with
  ``Address``/``Port``, ``Tags`` (``version=…``, ``zone=…``), ``Meta`` (the whole instance
  record as strings), ``Weights`` and one check (``CheckID`` ``service:<id>``): a TTL
  check (default) or an HTTP check on ``http://host:health_port/health/ready``, both
  with ``DeregisterCriticalServiceAfter`` so the agent drops instances that died.
* ``PUT /v1/agent/check/pass/service:<id>``: the TTL heartbeat, every ``ttl / 3``. Consul
  gives new checks the status ``critical`` until the first update, so :meth:`register`
  passes the check at once. A 404 means the agent no longer knows the check (it
  restarted without its state): the heartbeat registers the service again by itself.
* ``GET /v1/agent/service/<id>``: in HTTP-check mode (no heartbeat), the same repair:
  every ``check_interval`` it asks whether the agent still has the service.
* ``PUT /v1/agent/service/deregister/<id>``: :meth:`deregister` and :meth:`close`.
* ``GET /v1/health/service/<name>?passing=true``: :meth:`resolve`, and :meth:`watch` as a
  blocking query (``index=<X-Consul-Index>&wait=30s``) that follows Consul's documented
  rules: the index is reset to 0 when it goes backwards and raised to 1 when it is not
  positive; queries are spaced and backed off so a misbehaving agent cannot make a hot
  loop; a snapshot is yielded only when the index moved *and* the instances differ.

Entries map back to :class:`Instance` from ``Service.ID``/``Address`` (the node's address
when empty)/``Port`` and ``Meta``. Entries registered by other tools (no meshkit
``Meta``) get defaults (weight 100, tags from ``key=value`` ``Tags``); malformed entries
are skipped with one warning each.

The ACL token (``?token=``, the ``token`` option or ``$CONSUL_HTTP_TOKEN``) travels only
in the ``X-Consul-Token`` header; it is not part of :attr:`~Registry.url`, ``repr()``,
log lines or error messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import time
from collections.abc import AsyncGenerator, Awaitable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal
from urllib.parse import parse_qs, quote, urlsplit

import aiohttp
import structlog

from .._redact import redact_url
from ..errors import ConfigError, InvalidArgument, Unavailable
from .base import Instance, Registry, validate_service_name

__all__ = [
    "DEFAULT_CHECK_INTERVAL",
    "DEFAULT_CHECK_TIMEOUT",
    "DEFAULT_DEREGISTER_CRITICAL_AFTER",
    "DEFAULT_PORT",
    "DEFAULT_REQUEST_TIMEOUT",
    "DEFAULT_TTL",
    "DEFAULT_WAIT",
    "ENV_TOKEN",
    "ConsulRegistry",
]

_log = structlog.get_logger("meshkit.registry")

DEFAULT_PORT = 8500
DEFAULT_TTL = 10.0
DEFAULT_DEREGISTER_CRITICAL_AFTER = 60.0
DEFAULT_WAIT = 30.0
DEFAULT_CHECK_INTERVAL = 10.0
DEFAULT_CHECK_TIMEOUT = 5.0
DEFAULT_REQUEST_TIMEOUT = 5.0
#: Environment variable Consul's own tools read the ACL token from.
ENV_TOKEN = "CONSUL_HTTP_TOKEN"
#: Consul caps a blocking query's ``wait`` at 10 minutes.
MAX_WAIT = 600.0

#: How long close() spends withdrawing own registrations.
_CLOSE_BUDGET = 2.0
#: Minimum gap between two blocking queries of one watch (rate limit).
_MIN_QUERY_GAP = 0.05
#: Backoff after an index reset or a non-positive index: doubles from here...
_BACKOFF_MIN = 0.1
#: ...up to here; also the bound for spacing watch retries after errors.
_BACKOFF_MAX = 5.0
#: Consul limits (agent/structs): Meta values are at most 512 bytes, 64 keys in all.
_META_VALUE_MAX = 512
_META_TAG_CHUNKS_MAX = 50
_DNS_WEIGHT_MAX = 65535

_URL_PARAMS = (
    "token",
    "check",
    "ttl",
    "deregister_critical_after",
    "wait",
    "dc",
    "datacenter",
    "check_interval",
    "check_timeout",
    "request_timeout",
)
_DEFAULT_PROTOCOL: Final[str] = str(Instance.__dataclass_fields__["protocol"].default)

CheckMode = Literal["ttl", "http"]


class _Secret:
    """Holds the ACL token; its ``repr()``/``str()`` never show it."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "<redacted>"

    __str__ = __repr__


_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def _parse_duration(name: str, value: object, *, allow_zero: bool = False) -> float:
    """Seconds from a number or a Go-style duration string (``"10s"``, ``"1m30s"``)."""
    seconds: float
    if isinstance(value, bool):
        raise ConfigError(f"expected {name} to be a duration, found {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            pos, total = 0, 0.0
            for match in _DURATION_RE.finditer(text):
                if match.start() != pos:
                    break
                total += float(match.group(1)) * _UNITS[match.group(2)]
                pos = match.end()
            if pos != len(text) or not text:
                raise ConfigError(
                    f"expected {name} to be seconds or a duration like '10s', '1m30s', "
                    f"found {value!r}"
                ) from None
            seconds = total
    else:
        raise ConfigError(f"expected {name} to be a duration, found {type(value).__name__}")
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        what = "a non-negative" if allow_zero else "a positive"
        raise ConfigError(f"expected {name} to be {what} duration, found {value!r}")
    return seconds


def _go_duration(seconds: float) -> str:
    """A duration Consul (Go's ``time.ParseDuration``) accepts: ``1m``, ``10s``, ``1500ms``."""
    ms = max(1, round(seconds * 1000))
    if ms % 60_000 == 0:
        return f"{ms // 60_000}m"
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def _host_port(netloc: str, where: str) -> tuple[str, int]:
    try:
        parts = urlsplit(f"//{netloc}")
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise ConfigError(f"expected host[:port] in {where}, found {netloc!r}: {exc}") from None
    if not host:
        raise ConfigError(f"expected host[:port] in {where}, found {netloc!r}")
    return host, port or DEFAULT_PORT


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _text(body: bytes, limit: int = 300) -> str:
    text = body.decode("utf-8", "replace").strip()
    return text if len(text) <= limit else text[:limit] + "…"


@dataclass(slots=True)
class _Registration:
    instance: Instance
    task: asyncio.Task[None] | None = None


class _Backoff:
    """Doubling delay between ``_BACKOFF_MIN`` and ``_BACKOFF_MAX``."""

    __slots__ = ("delay",)

    def __init__(self) -> None:
        self.delay = 0.0

    def next(self) -> float:
        self.delay = _BACKOFF_MIN if self.delay == 0 else min(self.delay * 2, _BACKOFF_MAX)
        return self.delay

    def reset(self) -> None:
        self.delay = 0.0


_CLOSED: Final = object()


class ConsulRegistry(Registry):
    """Registry backed by a Consul agent; see the module docstring.

    ``address`` is the agent's ``host:port``. Options:

    * ``token``: ACL token (default ``$CONSUL_HTTP_TOKEN``), sent as ``X-Consul-Token``;
    * ``check``: ``"ttl"`` (a heartbeat every ``ttl / 3``) or ``"http"`` (the agent polls
      ``http://host:health_port/health/ready`` every ``check_interval``, timing out after
      ``check_timeout``);
    * ``ttl``: TTL of the check (default 10 s); in HTTP mode, unused;
    * ``deregister_critical_after``: the agent removes an instance whose check stayed
      critical this long (default ``"1m"``, Consul's minimum; 0 disables);
    * ``wait``: how long a blocking query may hang (default ``"30s"``, at most 10 min);
    * ``datacenter``: the datacenter to discover in (default: the agent's);
    * ``request_timeout``: bound for each non-blocking request (default 5 s).

    Durations are seconds or Go-style strings (``"10s"``, ``"1m"``).
    """

    def __init__(
        self,
        address: str = f"127.0.0.1:{DEFAULT_PORT}",
        *,
        token: str | None = None,
        check: CheckMode = "ttl",
        ttl: float | str = DEFAULT_TTL,
        deregister_critical_after: float | str = DEFAULT_DEREGISTER_CRITICAL_AFTER,
        wait: float | str = DEFAULT_WAIT,
        datacenter: str | None = None,
        check_interval: float | str = DEFAULT_CHECK_INTERVAL,
        check_timeout: float | str = DEFAULT_CHECK_TIMEOUT,
        request_timeout: float | str = DEFAULT_REQUEST_TIMEOUT,
    ) -> None:
        host, port = _host_port(address, "the Consul agent address")
        if check not in ("ttl", "http"):
            raise ConfigError(f"expected check to be 'ttl' or 'http', found {check!r}")
        self.check: CheckMode = check
        self.ttl = _parse_duration("ttl", ttl)
        self.deregister_critical_after = _parse_duration(
            "deregister_critical_after", deregister_critical_after, allow_zero=True
        )
        self.wait = _parse_duration("wait", wait)
        if self.wait > MAX_WAIT:
            raise ConfigError(f"expected wait of at most 10m (Consul's limit), found {wait!r}")
        self.check_interval = _parse_duration("check_interval", check_interval)
        self.check_timeout = _parse_duration("check_timeout", check_timeout)
        self.request_timeout = _parse_duration("request_timeout", request_timeout)
        if datacenter is not None and (not isinstance(datacenter, str) or not datacenter):
            raise ConfigError(f"expected datacenter to be a non-empty string, found {datacenter!r}")
        self.datacenter = datacenter
        if token is None:
            token = os.environ.get(ENV_TOKEN) or None
        if token is not None and not isinstance(token, str):
            raise ConfigError(f"expected token to be a string, found {type(token).__name__}")
        self._token = _Secret(token) if token else None
        self.host, self.port = host, port
        self._base = f"http://{_bracket(host)}:{port}"
        url = f"consul://{_bracket(host)}:{port}"
        if datacenter:
            url += f"?dc={quote(datacenter)}"
        super().__init__(url)
        self._session: aiohttp.ClientSession | None = None
        self._own: dict[str, _Registration] = {}
        self._closed = False
        self._closed_event = asyncio.Event()
        self._watch_backoff = _Backoff()
        self._watch_retry_at = 0.0
        self._warned: set[tuple[str, str]] = set()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> ConsulRegistry:
        """``consul://host[:8500]`` with optional query parameters (see the class).

        ``consul://`` alone means ``$CONSUL_HTTP_ADDR``, else ``127.0.0.1:8500``. Query
        parameters: ``token``, ``check``, ``ttl``, ``deregister_critical_after``, ``wait``,
        ``dc`` (or ``datacenter``), ``check_interval``, ``check_timeout``,
        ``request_timeout``. Keyword ``options`` override them.
        """
        parts = urlsplit(url)
        if parts.scheme != "consul":
            raise ConfigError(f"expected a consul:// registry URL, found {redact_url(url)!r}")
        if parts.path not in ("", "/"):
            raise ConfigError(
                f"expected consul://host:port with no path, found {redact_url(url)!r}"
            )
        netloc = parts.netloc
        if "@" in netloc:
            raise ConfigError(
                f"expected consul://host:port without credentials, found {redact_url(url)!r} "
                "(pass the ACL token as ?token= or CONSUL_HTTP_TOKEN)"
            )
        if not netloc:
            env_addr = os.environ.get("CONSUL_HTTP_ADDR", "")
            netloc = env_addr.split("://", 1)[-1].rstrip("/") or f"127.0.0.1:{DEFAULT_PORT}"
        params: dict[str, Any] = {}
        for name, values in parse_qs(parts.query, keep_blank_values=True).items():
            if name not in _URL_PARAMS:
                raise ConfigError(
                    f"expected consul:// parameters {', '.join(_URL_PARAMS)}; found {name!r} "
                    f"in {redact_url(url)!r}"
                )
            params["datacenter" if name == "dc" else name] = values[-1]
        params.update(options)
        return cls(netloc, **params)

    def __repr__(self) -> str:
        return f"<ConsulRegistry {self.url} check={self.check}>"

    # -- the Registry interface -------------------------------------------------------

    async def register(self, instance: Instance) -> None:
        self._check_open()
        payload = self._service_payload(instance)
        await self._put_service(instance.instance_id, payload)
        reg = self._own.get(instance.instance_id)
        if reg is None:
            reg = self._own[instance.instance_id] = _Registration(instance)
        reg.instance = instance
        if self.check == "ttl":
            # A new TTL check is critical until its first update: pass it now.
            try:
                await self._pass(instance)
            except Unavailable as exc:
                _log.warning(
                    "consul: first check pass failed; the heartbeat will retry",
                    service=instance.service,
                    instance=instance.instance_id,
                    error=str(exc),
                )
        if reg.task is None or reg.task.done():
            reg.task = asyncio.create_task(
                self._keepalive(instance.instance_id),
                name=f"meshkit-consul-keepalive-{instance.instance_id}",
            )

    async def deregister(self, instance: Instance) -> None:
        reg = self._own.pop(instance.instance_id, None)
        if reg is not None:
            await _cancel(reg.task)
        if self._closed:
            return
        await self._deregister_id(instance.instance_id)

    async def resolve(self, service: str) -> list[Instance]:
        validate_service_name(service)
        self._check_open()
        entries, _index = await self._health(service, None)
        return self._instances(service, entries)

    async def watch(self, service: str) -> AsyncGenerator[list[Instance], None]:
        validate_service_name(service)
        self._check_open()
        # Rate-limit re-opened watches while the agent keeps failing.
        delay = self._watch_retry_at - time.monotonic()
        if delay > 0 and await self._sleep(delay):
            return
        index = 0
        last: list[Instance] | None = None
        backoff = _Backoff()
        pause = 0.0
        last_start = 0.0
        while not self._closed:
            gap = max(pause, last_start + _MIN_QUERY_GAP - time.monotonic())
            if gap > 0 and await self._sleep(gap):
                return
            last_start = time.monotonic()
            try:
                result = await self._race_close(self._health(service, index or None))
            except Unavailable:
                if self._closed:
                    return
                self._watch_retry_at = time.monotonic() + self._watch_backoff.next()
                raise
            if result is _CLOSED:
                return
            self._watch_backoff.reset()
            entries, new_index = result  # type: ignore[misc]
            changed = new_index != index
            if new_index < index:
                # Documented rule 1: an index that goes backwards restarts the loop.
                _log.info(
                    "consul index went backwards; restarting the blocking query",
                    service=service,
                    previous=index,
                    index=new_index,
                )
                index, pause = 0, backoff.next()
            elif new_index <= 0:
                # Documented rule 2: a non-positive index would never block; use 1.
                index, pause = 1, backoff.next()
            else:
                index, pause = new_index, 0.0
                backoff.reset()
            if last is not None and not changed:
                continue
            snapshot = self._instances(service, entries)
            if snapshot != last:
                last = snapshot
                yield snapshot

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._closed_event.set()
        regs = list(self._own.values())
        self._own.clear()
        await asyncio.gather(*(_cancel(r.task) for r in regs))
        if regs and self._session is not None:
            withdraw = [self._deregister_id(r.instance.instance_id) for r in regs]
            try:
                async with asyncio.timeout(_CLOSE_BUDGET):
                    results = await asyncio.gather(*withdraw, return_exceptions=True)
                for reg, result in zip(regs, results, strict=True):
                    if isinstance(result, Exception):
                        _log.warning(
                            "consul: could not withdraw registration on close",
                            instance=reg.instance.instance_id,
                            error=str(result),
                        )
            except TimeoutError:
                _log.warning(
                    "consul: withdrawing registrations timed out on close",
                    instances=[r.instance.instance_id for r in regs],
                )
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- payloads -----------------------------------------------------------------------

    def health_check_url(self, instance: Instance) -> str:
        """The URL the agent polls in HTTP-check mode."""
        return f"http://{_bracket(instance.host)}:{instance.health_port}/health/ready"

    def _service_payload(self, instance: Instance) -> dict[str, Any]:
        tags_json = json.dumps(dict(instance.tags), sort_keys=True, separators=(",", ":"))
        meta = {
            "version": instance.version,
            "weight": str(instance.weight),
            "health_port": str(instance.health_port),
            "protocol": instance.protocol,
            "start_time": repr(instance.start_time),
        }
        # Meta values are limited to 512 bytes: long tag sets span tags, tags_1, tags_2, …
        chunks = [
            tags_json[i : i + _META_VALUE_MAX] for i in range(0, len(tags_json), _META_VALUE_MAX)
        ]
        if len(chunks) > _META_TAG_CHUNKS_MAX:
            raise InvalidArgument(
                f"expected instance tags of at most {_META_VALUE_MAX * _META_TAG_CHUNKS_MAX} "
                f"bytes of JSON (Consul Meta limits), found {len(tags_json)}"
            )
        for n, chunk in enumerate(chunks):
            meta["tags" if n == 0 else f"tags_{n}"] = chunk
        tags = [f"version={instance.version}"] if instance.version else []
        tags += [f"{k}={v}" for k, v in sorted(instance.tags.items())]
        check: dict[str, Any] = {"CheckID": _check_id(instance.instance_id)}
        if self.check == "ttl":
            check.update(Name="meshkit TTL heartbeat", TTL=_go_duration(self.ttl))
        else:
            if not instance.health_port:
                raise InvalidArgument(
                    f"expected a health port for Consul HTTP checks of {instance.instance_id!r}, "
                    "found 0 (use check='ttl' or give the instance a health port)"
                )
            check.update(
                Name="meshkit /health/ready",
                HTTP=self.health_check_url(instance),
                Interval=_go_duration(self.check_interval),
                Timeout=_go_duration(self.check_timeout),
            )
        if self.deregister_critical_after > 0:
            check["DeregisterCriticalServiceAfter"] = _go_duration(self.deregister_critical_after)
        return {
            "ID": instance.instance_id,
            "Name": instance.service,
            "Address": instance.host,
            "Port": instance.port,
            "Tags": tags,
            "Meta": meta,
            # Consul requires Passing >= 1; the exact weight (0 included) is in Meta.
            "Weights": {"Passing": min(max(instance.weight, 1), _DNS_WEIGHT_MAX), "Warning": 1},
            "EnableTagOverride": False,
            "Check": check,
        }

    def _instances(self, service: str, entries: list[Any]) -> list[Instance]:
        found: dict[str, Instance] = {}
        for entry in entries:
            try:
                instance = _instance_from_entry(service, entry)
            except (InvalidArgument, ValueError, TypeError) as exc:
                self._warn_malformed(service, entry, exc)
                continue
            found[instance.instance_id] = instance
        return sorted(found.values(), key=lambda i: i.instance_id)

    def _warn_malformed(self, service: str, entry: object, exc: BaseException) -> None:
        sid = "?"
        if isinstance(entry, Mapping) and isinstance(entry.get("Service"), Mapping):
            sid = str(entry["Service"].get("ID", "?"))
        key = (f"{service}/{sid}", str(exc))
        if key in self._warned:
            return
        if len(self._warned) > 1000:
            self._warned.clear()
        self._warned.add(key)
        _log.warning(
            "consul: skipping malformed service entry", service=service, id=sid, error=str(exc)
        )

    # -- keep-alive ---------------------------------------------------------------------

    async def _keepalive(self, instance_id: str) -> None:
        interval = self.ttl / 3 if self.check == "ttl" else self.check_interval
        failing = False
        while True:
            await asyncio.sleep(interval)
            reg = self._own.get(instance_id)
            if reg is None:
                return
            instance = reg.instance
            try:
                present = (
                    await self._pass(instance)
                    if self.check == "ttl"
                    else await self._service_present(instance_id)
                )
                if not present:
                    await self._put_service(instance_id, self._service_payload(instance))
                    if self.check == "ttl":
                        await self._pass(instance)
                    _log.warning(
                        "consul agent lost the service; registered it again",
                        service=instance.service,
                        instance=instance_id,
                        registry=self.url,
                    )
            except (Unavailable, InvalidArgument) as exc:
                if not failing:
                    _log.warning(
                        "consul keep-alive failed; will keep trying",
                        service=instance.service,
                        instance=instance_id,
                        registry=self.url,
                        error=str(exc),
                    )
                failing = True
                continue
            if failing:
                _log.info(
                    "consul keep-alive recovered", service=instance.service, instance=instance_id
                )
            failing = False

    # -- HTTP -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable(f"registry {self.url} is closed")

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"X-Consul-Token": self._token.value} if self._token else {}
            self._session = aiohttp.ClientSession(
                headers=headers, connector=aiohttp.TCPConnector(limit=0)
            )
        return self._session

    def _scrub(self, text: str) -> str:
        if self._token is not None and self._token.value in text:
            text = text.replace(self._token.value, "<redacted>")
        return text

    async def _request(
        self,
        method: str,
        path: str,
        what: str,
        *,
        params: dict[str, str] | None = None,
        body: Any = None,
        timeout: float | None = None,
    ) -> tuple[int, bytes, Mapping[str, str]]:
        """One round trip; connection failures and timeouts raise :class:`Unavailable`."""
        limit = aiohttp.ClientTimeout(total=timeout or self.request_timeout)
        try:
            async with self._http().request(
                method, self._base + path, params=params, json=body, timeout=limit
            ) as resp:
                data = await resp.read()
                return resp.status, data, resp.headers
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            reason = self._scrub(str(exc) or type(exc).__name__)
            if self.status.mark_error(f"{type(exc).__name__}: {reason}"):
                _log.warning("consul agent unreachable", registry=self.url, error=reason)
            raise Unavailable(
                f"cannot reach the Consul agent at {self.host}:{self.port} to {what}: {reason}"
            ) from exc

    def _fail(self, status: int, body: bytes, what: str) -> Exception:
        text = self._scrub(_text(body))
        if status == 400:
            self.status.mark_ok()
            return InvalidArgument(f"Consul rejected the request to {what}: {text}")
        self.status.mark_error(f"HTTP {status}: {text}")
        if status == 403:
            hint = "; set a token with service:write/read (?token= or $CONSUL_HTTP_TOKEN)"
            return Unavailable(f"Consul denied the request to {what} (ACL): {text}{hint}")
        return Unavailable(f"Consul agent answered HTTP {status} to {what}: {text}")

    async def _put_service(self, instance_id: str, payload: dict[str, Any]) -> None:
        what = f"register {instance_id!r}"
        status, body, _ = await self._request(
            "PUT", "/v1/agent/service/register", what, body=payload
        )
        if status != 200:
            raise self._fail(status, body, what)
        self.status.mark_ok()

    async def _pass(self, instance: Instance) -> bool:
        """Pass the TTL check; False if the agent does not know it (404)."""
        what = f"pass the check of {instance.instance_id!r}"
        path = f"/v1/agent/check/pass/{quote(_check_id(instance.instance_id), safe='')}"
        timeout = min(self.request_timeout, max(self.ttl / 3, 0.5))
        return await self._found("PUT", path, what, timeout=timeout)

    async def _service_present(self, instance_id: str) -> bool:
        what = f"look up {instance_id!r}"
        path = f"/v1/agent/service/{quote(instance_id, safe='')}"
        return await self._found("GET", path, what)

    async def _found(self, method: str, path: str, what: str, timeout: float | None = None) -> bool:
        """Send the request: True on 200, False on 404 (unknown to the agent), else fail."""
        status, body, _ = await self._request(method, path, what, timeout=timeout)
        if status not in (200, 404):
            raise self._fail(status, body, what)
        self.status.mark_ok()
        return status == 200

    async def _deregister_id(self, instance_id: str) -> None:
        what = f"deregister {instance_id!r}"
        path = f"/v1/agent/service/deregister/{quote(instance_id, safe='')}"
        status, body, _ = await self._request("PUT", path, what)
        if status not in (200, 404):  # 404: already gone
            raise self._fail(status, body, what)
        self.status.mark_ok()

    async def _health(self, service: str, index: int | None) -> tuple[list[Any], int]:
        """Passing entries of ``service`` and ``X-Consul-Index``; blocks if ``index``."""
        what = f"read the health of {service!r}"
        params = {"passing": "true"}
        if self.datacenter:
            params["dc"] = self.datacenter
        timeout = None
        if index is not None:
            params.update(index=str(index), wait=_go_duration(self.wait))
            # The agent may add up to wait/16 of jitter.
            timeout = self.wait + self.wait / 16 + self.request_timeout
        path = f"/v1/health/service/{quote(service, safe='')}"
        status, body, headers = await self._request(
            "GET", path, what, params=params, timeout=timeout
        )
        if status != 200:
            raise self._fail(status, body, what)
        try:
            entries = json.loads(body)
            new_index = int(headers.get("X-Consul-Index", ""))
        except ValueError as exc:
            self.status.mark_error(f"bad response: {exc}")
            raise Unavailable(f"Consul agent sent an unreadable answer to {what}: {exc}") from None
        if entries is None:
            entries = []
        if not isinstance(entries, list):
            self.status.mark_error("bad response: not a list")
            raise Unavailable(
                f"Consul agent sent an unexpected answer to {what}: "
                f"expected a JSON list, found {type(entries).__name__}"
            )
        if self.status.mark_ok():
            _log.info("consul agent reachable again", registry=self.url)
        return entries, new_index

    async def _race_close(self, work: Awaitable[Any]) -> Any:
        """Await ``work``, or return ``_CLOSED`` as soon as the registry closes."""
        task = asyncio.ensure_future(work)
        closer = asyncio.ensure_future(self._closed_event.wait())
        try:
            await asyncio.wait({task, closer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closer.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if not task.done() or task.cancelled():
            return _CLOSED
        return task.result()

    async def _sleep(self, delay: float) -> bool:
        """Sleep ``delay`` seconds; True if the registry closed meanwhile."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._closed_event.wait()
        return self._closed


def _check_id(instance_id: str) -> str:
    return f"service:{instance_id}"


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is None or task.done():
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _meta_int(meta: Mapping[str, Any], key: str, default: int) -> int:
    value = meta.get(key)
    if value is None or value == "":
        return default
    if not isinstance(value, str):
        raise InvalidArgument(f"expected Meta[{key!r}] to be a string, found {value!r}")
    return int(value)


def _tags_from(meta: Mapping[str, Any], tags: object) -> tuple[dict[str, str], str | None]:
    """Instance tags (from Meta, else ``key=value`` Tags) and a version found in Tags."""
    if "tags" in meta:
        parts = [meta["tags"]]
        n = 1
        while f"tags_{n}" in meta:
            parts.append(meta[f"tags_{n}"])
            n += 1
        if not all(isinstance(p, str) for p in parts):
            raise InvalidArgument("expected Meta tags chunks to be strings")
        decoded = json.loads("".join(parts))
        if not isinstance(decoded, dict):
            raise InvalidArgument(
                f"expected Meta['tags'] to be a JSON object, found {type(decoded).__name__}"
            )
        return decoded, None
    result: dict[str, str] = {}
    version = None
    if tags is None:
        return result, None
    if not isinstance(tags, list):
        raise InvalidArgument(f"expected Tags to be a list, found {type(tags).__name__}")
    for tag in tags:
        if not isinstance(tag, str):
            raise InvalidArgument(f"expected Tags to hold strings, found {tag!r}")
        key, _, value = tag.partition("=")
        if key == "version":
            version = value
        else:
            result[key] = value
    return result, version


def _instance_from_entry(service: str, entry: object) -> Instance:
    """Map one ``/v1/health/service`` entry to an :class:`Instance`."""
    if not isinstance(entry, Mapping):
        raise InvalidArgument(f"expected a health entry object, found {type(entry).__name__}")
    svc = entry.get("Service")
    if not isinstance(svc, Mapping):
        raise InvalidArgument("expected the entry to have a Service object")
    node = entry.get("Node")
    meta = svc.get("Meta") or {}
    if not isinstance(meta, Mapping):
        raise InvalidArgument(f"expected Service.Meta to be an object, found {meta!r}")
    host = svc.get("Address") or (node.get("Address") if isinstance(node, Mapping) else None)
    tags, tag_version = _tags_from(meta, svc.get("Tags"))
    version = meta.get("version")
    if version is None:
        version = tag_version or ""
    start_time = meta.get("start_time")
    return Instance(
        service=service,
        instance_id=svc.get("ID"),  # type: ignore[arg-type]
        host=host or "",
        port=svc.get("Port"),  # type: ignore[arg-type]
        health_port=_meta_int(meta, "health_port", 0),
        protocol=meta.get("protocol") or _DEFAULT_PROTOCOL,
        version=version,
        weight=_meta_int(meta, "weight", 100),
        tags=tags,
        start_time=float(start_time) if start_time else 0.0,
    )
