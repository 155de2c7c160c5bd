"""An in-process HTTP double of the Consul agent endpoints meshkit uses.

No Consul binary is installable here (shared/INFRA.md), so the ``consul_contract`` tests run
against this double unless ``MESHKIT_CONSUL_ADDR`` names a real agent. It serves exactly the
endpoints :mod:`meshkit.registry.consul` calls, on ``127.0.0.1`` (aiohttp.web), and
reproduces the behaviours of a single Consul agent + server that the registry depends on.
Sources: the Consul HTTP API docs (developer.hashicorp.com/consul/api-docs: agent/service,
agent/check, health, features/blocking, ACL) and, where the docs are silent, the agent's
source (``agent/agent_endpoint.go``, ``agent/acl.go``, ``agent/structs/structs.go``,
``agent/checks/check.go``).

Endpoints:

* ``PUT /v1/agent/service/register`` - JSON field names matched case-insensitively (Go's
  decoder); ``ID`` defaults to ``Name``; 400 ``Missing service name``; 400 ``Invalid service
  address`` for ``0.0.0.0``/``::``; ``Meta`` validated like ``validateMetaPair`` (at most
  64 keys, keys ``^[a-zA-Z0-9_-]+$`` up to 128 bytes, no ``consul-`` prefix, values up to
  512 bytes: 400 ``Invalid Service Meta: …``); ``Weights`` default ``{Passing: 1,
  Warning: 1}`` and are validated like ``ValidateWeights`` (``Passing`` >= 1: 400
  ``Invalid Weights: …``); ``Check``/``Checks`` need ``TTL`` or ``HTTP`` + ``Interval``
  (400 otherwise); durations are Go duration strings (or integer nanoseconds) and a bad one
  is a 400 ``Request decode failed``. ``CheckID`` defaults to ``service:<id>``
  (``service:<id>:<n>`` for several). A new check starts ``critical`` unless ``Status`` is
  given (agent/check docs: "If not specified, the initial status is critical"); a check
  re-registered under the same ID keeps its status (the agent snapshots check state).
  HTTP check intervals below 1 s are raised to 1 s (``checks.MinInterval``); ``Timeout``
  defaults to 10 s. ``DeregisterCriticalServiceAfter`` below ``deregister_min`` (Consul:
  1 minute) is raised to it. Re-registering an identical service is not a catalog write
  (no index change), as the state store skips identical writes.
* ``PUT /v1/agent/service/deregister/<id>`` - removes the service and its checks; 404
  ``Unknown service ID "<id>". Ensure that the service ID is passed, not the service name.``
* ``GET /v1/agent/service/<id>`` - the agent's view of one service; 404 ``unknown service
  ID: <id>``.
* ``PUT /v1/agent/check/pass/<check_id>`` (``?note=`` sets the output) - a TTL check becomes
  ``passing`` and its TTL timer restarts; 404 ``Unknown check ID "<id>". Ensure that the check
  ID is passed, not the check name.``; 500 ``CheckID "<id>" does not have associated TTL`` for
  non-TTL checks. When the TTL runs out the check turns ``critical`` with output ``TTL
  expired`` (agent/checks CheckTTL). Output-only changes are not catalog writes (the agent
  defers them by ``check_update_interval``); status changes are.
* ``GET /v1/health/service/<name>`` - entries ``{Node, Service, Checks}`` shaped like the
  real API (node check ``serfHealth`` always passing, ``Service.Address`` as registered,
  possibly empty, ``Node.Address`` the agent's); ``?passing`` (bare, or a Go ``ParseBool``
  value; else 400 ``Invalid value for ?passing``) keeps only entries whose every check is
  ``passing``; ``?dc=`` other than the double's datacenter is a 500 ``No path to
  datacenter``. Blocking queries (features/blocking): ``X-Consul-Index`` on every answer;
  with ``?index=N`` (N > 0) the request hangs until the raft index exceeds N or ``wait``
  (default 5 m, capped at 10 m, plus up to ``wait/16`` of random jitter) elapses, then
  answers with the current data and index (the same index on timeout); 400 ``Invalid
  index`` / ``Invalid wait time`` for bad values. ``X-Consul-KnownLeader`` and
  ``X-Consul-LastContact`` are sent as a healthy leader would.
* Every other method on these paths is a 405; unknown paths are 404.

State and time. One global raft-like index increases on every catalog change
(registration, deregistration, check status change, reaping, restart) and every record
carries ``CreateIndex``/``ModifyIndex``. It is global, so a blocking query may return for a
change to another service: the docs say a return is "no guarantee of a change". The
``X-Consul-Index`` header is sent by the read endpoint that supports blocking (the agent
PUT endpoints send none, as on a real agent). The reaper runs every
``check_reap_interval`` (Consul: 30 s) and removes a service whose check has been critical
longer than its ``DeregisterCriticalServiceAfter``, counted from the moment the check went
critical (or was registered critical). HTTP checks are really run: ``GET`` of the URL every
``Interval`` after a random initial stagger within one interval (disable with
``http_check_stagger=False``); 2xx is passing, 429 warning, anything else or no answer
critical.

ACLs (``acl_token=...``: default-deny, one token with full rights). The token is read from
``X-Consul-Token``, ``Authorization: Bearer`` or ``?token=`` (in that order, as
``parseToken``). An unknown token is a 403 ``ACL not found``; the anonymous token gets 403
``Permission denied`` for writes and for ``GET /v1/agent/service/<id>``, and an empty,
filtered list from ``/v1/health/service`` (reads are filtered, not refused). Existence is
checked before permission for deregister and check pass (404 before 403), as in
``vetServiceUpdate``/``vetCheckUpdate``.

Fault injection (double-only): :meth:`ConsulDouble.stop`/:meth:`~ConsulDouble.start`
take the HTTP listener down and up on the same port (in-flight requests are aborted, new
connections refused; timers keep running, like a partitioned agent);
:meth:`~ConsulDouble.restart` is an agent restart without persisted state (all services
and checks dropped); :meth:`~ConsulDouble.set_index` moves the raft index, even backwards
(as after a snapshot restore). :attr:`~ConsulDouble.requests` records every request.

Not reproduced: anything outside these endpoints, consistency modes (``stale``,
``consistent``), ``filter``/``tag``/``near`` parameters, namespaces, Connect, script/TCP/
gRPC checks, ``replace-existing-checks``, and per-service indexes (the index is global).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

__all__ = ["CheckRecord", "ConsulDouble", "RequestRecord", "ServiceRecord", "parse_go_duration"]

PASSING, WARNING, CRITICAL = "passing", "warning", "critical"
MAX_WAIT = 600.0
DEFAULT_WAIT = 300.0
CHECK_MIN_INTERVAL = 1.0
DEFAULT_HTTP_TIMEOUT = 10.0
INVALID_CHECK = "Must provide TTL or Script/DockerContainerID/HTTP/TCP and Interval"

_GO_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_GO_PART = re.compile(r"(\d+\.?\d*|\.\d+)([a-zµμ]+)")
_META_KEY = re.compile(r"^[a-zA-Z0-9_-]+$")
_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


def parse_go_duration(text: str) -> float:
    """Seconds in ``text``, parsed like Go's ``time.ParseDuration`` (a unit is required)."""
    raw = text
    if text in ("0", "+0", "-0"):
        return 0.0
    sign = 1.0
    if text[:1] in "+-" and text:
        sign = -1.0 if text[0] == "-" else 1.0
        text = text[1:]
    if not text:
        raise ValueError(f'time: invalid duration "{raw}"')
    pos, total = 0, 0.0
    while pos < len(text):
        match = _GO_PART.match(text, pos)
        if match is None:
            if re.match(r"\d+\.?\d*$|\.\d+$", text[pos:]):
                raise ValueError(f'time: missing unit in duration "{raw}"')
            raise ValueError(f'time: invalid duration "{raw}"')
        unit = match.group(2)
        if unit not in _GO_UNITS:
            raise ValueError(f'time: unknown unit "{unit}" in duration "{raw}"')
        total += float(match.group(1)) * _GO_UNITS[unit]
        pos = match.end()
    return sign * total


def _duration(value: Any) -> float | None:
    """A check duration field: a Go duration string or integer nanoseconds (FixupCheckType)."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError(f"cannot decode {value!r} as a duration")
    if isinstance(value, int | float):
        return float(value) / 1e9
    if isinstance(value, str):
        return parse_go_duration(value)
    raise ValueError(f"cannot decode {value!r} as a duration")


def _lower_keys(data: dict[str, Any]) -> dict[str, Any]:
    return {str(k).lower(): v for k, v in data.items()}


@dataclass
class ServiceRecord:
    """A service as the agent holds it."""

    id: str
    name: str
    tags: list[str]
    address: str
    port: int
    meta: dict[str, str]
    weights: dict[str, int]
    enable_tag_override: bool = False
    create_index: int = 0
    modify_index: int = 0

    def same_as(self, other: ServiceRecord) -> bool:
        keys = ("id", "name", "tags", "address", "port", "meta", "weights", "enable_tag_override")
        return all(getattr(self, k) == getattr(other, k) for k in keys)

    def to_json(self) -> dict[str, Any]:
        return {
            "ID": self.id,
            "Service": self.name,
            "Tags": list(self.tags),
            "Address": self.address,
            "Meta": dict(self.meta),
            "Port": self.port,
            "Weights": {"Passing": self.weights["Passing"], "Warning": self.weights["Warning"]},
            "EnableTagOverride": self.enable_tag_override,
            "Proxy": {"Mode": "", "MeshGateway": {}, "Expose": {}},
            "Connect": {},
            "PeerName": "",
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


@dataclass
class CheckRecord:
    """A health check as the agent holds it."""

    check_id: str
    name: str
    service_id: str
    service_name: str
    kind: str  # "ttl" or "http"
    status: str
    output: str = ""
    notes: str = ""
    ttl: float | None = None
    http: str | None = None
    interval: float | None = None
    timeout: float | None = None
    deregister_after: float | None = None  # already raised to the minimum
    critical_since: float | None = None
    create_index: int = 0
    modify_index: int = 0
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def definition(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "ttl": self.ttl,
            "http": self.http,
            "interval": self.interval,
            "timeout": self.timeout,
            "deregister_after": self.deregister_after,
            "name": self.name,
        }

    def to_json(self, node: str) -> dict[str, Any]:
        return {
            "Node": node,
            "CheckID": self.check_id,
            "Name": self.name,
            "Status": self.status,
            "Notes": self.notes,
            "Output": self.output,
            "ServiceID": self.service_id,
            "ServiceName": self.service_name,
            "ServiceTags": [],
            "Type": self.kind,
            "Interval": "" if self.interval is None else f"{self.interval}s",
            "Timeout": "" if self.timeout is None else f"{self.timeout}s",
            "ExposedPort": 0,
            "Definition": {},
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


@dataclass
class RequestRecord:
    """One request the double received (for tests to inspect)."""

    method: str
    path: str
    query: dict[str, str]
    token: str | None
    started: float
    finished: float | None = None
    status: int | None = None
    index: int | None = None  # X-Consul-Index answered, if any
    body: Any = None

    @property
    def duration(self) -> float | None:
        return None if self.finished is None else self.finished - self.started


_current: ContextVar[RequestRecord] = ContextVar("consul_double_request")


class _Forbidden(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConsulDouble:
    """A fake Consul agent on ``127.0.0.1``; see the module docstring."""

    def __init__(
        self,
        *,
        acl_token: str | None = None,
        datacenter: str = "dc1",
        node: str = "meshkit-double",
        node_address: str = "127.0.0.1",
        check_reap_interval: float = 30.0,
        deregister_min: float = 60.0,
        wait_jitter: bool = True,
        http_check_stagger: bool = True,
        index: int = 1,
    ) -> None:
        self.acl_token = acl_token
        self.datacenter = datacenter
        self.node = node
        self.node_id = str(uuid.uuid4())
        self.node_address = node_address
        self.check_reap_interval = check_reap_interval
        self.deregister_min = deregister_min
        self.wait_jitter = wait_jitter
        self.http_check_stagger = http_check_stagger
        self.index = index
        self.port = 0
        self.services: dict[str, ServiceRecord] = {}
        self.checks: dict[str, CheckRecord] = {}
        #: Every request, in arrival order.
        self.requests: list[RequestRecord] = []
        #: ``(time.monotonic(), check_id, status)`` for every check status change.
        self.status_history: list[tuple[float, str, str]] = []
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._inflight: dict[asyncio.Task[Any], asyncio.Transport | None] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._client: aiohttp.ClientSession | None = None

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT`` of the listener."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """``consul://127.0.0.1:PORT``."""
        return f"consul://{self.address}"

    @property
    def running(self) -> bool:
        return self._runner is not None

    async def start(self) -> None:
        """Start listening (on a free port the first time, on the same port afterwards)."""
        if self._runner is not None:
            return
        if self._client is None:
            self._client = aiohttp.ClientSession()
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_loop(), name="consul-double-reaper")
        app = web.Application(middlewares=[self._middleware])
        app.router.add_route("*", "/v1/agent/service/register", self._register)
        app.router.add_route("*", "/v1/agent/service/deregister/{id}", self._deregister)
        app.router.add_route("*", "/v1/agent/service/{id}", self._agent_service)
        app.router.add_route("*", "/v1/agent/check/pass/{id}", self._check_pass)
        app.router.add_route("*", "/v1/health/service/{name}", self._health_service)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        if not self.port:
            self.port = runner.addresses[0][1]

    async def stop(self) -> None:
        """Take the listener down: abort requests in flight, refuse new connections.

        State and timers live on (TTLs keep expiring), like an agent cut off by the network.
        """
        runner, self._runner = self._runner, None
        if runner is None:
            return
        for task, transport in list(self._inflight.items()):
            if transport is not None:
                transport.abort()
            task.cancel()
        self._inflight.clear()
        await runner.cleanup()

    async def restart(self, *, reset_index: bool = False) -> None:
        """An agent restart that loses every registration (no persisted state).

        ``reset_index`` also resets the raft index to 1 (a dev-mode agent is its own
        server: its index starts over), so clients see the index go backwards.
        """
        await self.stop()
        for check in list(self.checks.values()):
            self._stop_check(check)
        self.checks.clear()
        self.services.clear()
        if reset_index:
            self.index = 1
            self._wake()
        else:
            self._bump()
        await self.start()

    def set_index(self, index: int) -> None:
        """Set the raft index (backwards too). Blocked queries are not woken by this."""
        self.index = index

    async def close(self) -> None:
        """Stop everything."""
        await self.stop()
        for check in list(self.checks.values()):
            self._stop_check(check)
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def __aenter__(self) -> ConsulDouble:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- inspection -----------------------------------------------------------------------

    def check_status(self, check_id: str) -> str | None:
        check = self.checks.get(check_id)
        return None if check is None else check.status

    def requests_to(self, prefix: str, method: str | None = None) -> list[RequestRecord]:
        return [
            r
            for r in self.requests
            if r.path.startswith(prefix) and (method is None or r.method == method)
        ]

    # -- state changes ----------------------------------------------------------------------

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _bump(self) -> int:
        self.index += 1
        self._wake()
        return self.index

    def _set_status(self, check: CheckRecord, status: str, output: str) -> bool:
        """Update a check; True (and a new index) if its status changed."""
        check.output = output
        if status == check.status:
            return False
        check.status = status
        check.critical_since = time.monotonic() if status == CRITICAL else None
        check.modify_index = self._bump()
        self.status_history.append((time.monotonic(), check.check_id, status))
        return True

    def _arm_ttl(self, check: CheckRecord) -> None:
        if check.timer is not None:
            check.timer.cancel()
        assert check.ttl is not None
        loop = asyncio.get_running_loop()
        check.timer = loop.call_later(check.ttl, self._expire, check.check_id)

    def _expire(self, check_id: str) -> None:
        check = self.checks.get(check_id)
        if check is None:
            return
        check.timer = None
        self._set_status(check, CRITICAL, "TTL expired")

    def _stop_check(self, check: CheckRecord) -> None:
        if check.timer is not None:
            check.timer.cancel()
            check.timer = None
        if check.task is not None:
            check.task.cancel()
            check.task = None

    def _remove_service(self, service_id: str) -> bool:
        if self.services.pop(service_id, None) is None:
            return False
        for check in [c for c in self.checks.values() if c.service_id == service_id]:
            self._stop_check(check)
            del self.checks[check.check_id]
        self._bump()
        return True

    async def _reap_loop(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.05)
            now = time.monotonic()
            if now - last < self.check_reap_interval:
                continue
            last = now
            for check in list(self.checks.values()):
                if (
                    check.deregister_after is not None
                    and check.status == CRITICAL
                    and check.critical_since is not None
                    and now - check.critical_since > check.deregister_after
                ):
                    self._remove_service(check.service_id)

    async def _run_http_check(self, check_id: str) -> None:
        # Re-registering replaces the record and restarts this task, so the definition
        # read here stays current for the task's life.
        check = self.checks[check_id]
        url, interval = check.http, check.interval
        assert url is not None and interval is not None
        timeout = aiohttp.ClientTimeout(total=check.timeout or DEFAULT_HTTP_TIMEOUT)
        if self.http_check_stagger:
            await asyncio.sleep(random.uniform(0, interval))
        while check_id in self.checks and self._client is not None:
            try:
                async with self._client.get(url, timeout=timeout) as resp:
                    body = (await resp.read())[:4096].decode("utf-8", "replace")
                    status = (
                        PASSING
                        if 200 <= resp.status < 300
                        else WARNING
                        if resp.status == 429
                        else CRITICAL
                    )
                    output = f"HTTP GET {url}: {resp.status} {resp.reason} Output: {body}"
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                status, output = CRITICAL, f"Get {url!r}: {exc}"
            if check_id in self.checks:
                self._set_status(self.checks[check_id], status, output)
            await asyncio.sleep(interval)

    # -- HTTP plumbing ----------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        token = request.headers.get("X-Consul-Token")
        if not token:
            auth = request.headers.get("Authorization", "")
            if auth.lower().startswith("bearer "):
                token = auth[7:].strip()
        if not token:
            token = request.query.get("token") or None
        record = RequestRecord(
            method=request.method,
            path=request.path,
            query={k: v for k, v in request.query.items() if k != "token"},
            token=token,
            started=time.monotonic(),
        )
        self.requests.append(record)
        task = asyncio.current_task()
        assert task is not None
        self._inflight[task] = request.transport
        try:
            _current.set(record)
            response: web.StreamResponse = await handler(request)
        except web.HTTPException as exc:
            record.status = exc.status
            raise
        except _Forbidden as exc:
            response = web.Response(status=403, text=exc.reason)
        finally:
            self._inflight.pop(task, None)
            record.finished = time.monotonic()
        record.status = response.status
        index = response.headers.get("X-Consul-Index")
        record.index = int(index) if index else None
        return response

    def _acl(self, request: web.Request) -> bool:
        """Resolve the token: False for anonymous, True for the management token.

        Raises 403 "ACL not found" for a token that is not known.
        """
        if self.acl_token is None:
            return True
        token = _current.get().token
        if token is None:
            return False
        if token != self.acl_token:
            raise _Forbidden("ACL not found")
        return True

    def _require_write(self, request: web.Request) -> None:
        if not self._acl(request):
            raise _Forbidden("Permission denied")

    @staticmethod
    def _method(request: web.Request, allowed: str) -> web.Response | None:
        if request.method != allowed:
            return web.Response(status=405, text=f"method {request.method} not allowed")
        return None

    @staticmethod
    def _bad(text: str) -> web.Response:
        return web.Response(status=400, text=text)

    # -- endpoints ------------------------------------------------------------------------

    async def _register(self, request: web.Request) -> web.Response:
        if (wrong := self._method(request, "PUT")) is not None:
            return wrong
        raw = await request.read()
        try:
            data = json.loads(raw or b"null")
        except ValueError as exc:
            return self._bad(f"Request decode failed: {exc}")
        _current.get().body = data
        if not isinstance(data, dict):
            return self._bad("Request decode failed: expected a JSON object")
        args = _lower_keys(data)
        name = args.get("name") or ""
        if not isinstance(name, str) or not name:
            return self._bad("Missing service name")
        service_id = args.get("id") or name
        address = args.get("address") or ""
        if address in ("0.0.0.0", "::", "[::]"):
            return self._bad("Invalid service address")
        port = args.get("port") or 0
        tags = args.get("tags") or []
        meta = args.get("meta") or {}
        if not isinstance(port, int) or isinstance(port, bool):
            return self._bad("Request decode failed: Port must be an integer")
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            return self._bad("Request decode failed: Tags must be a list of strings")
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            return self._bad("Request decode failed: Meta must map strings to strings")
        if (problem := _meta_problem(meta)) is not None:
            return self._bad(f"Invalid Service Meta: {problem}")
        weights_in = args.get("weights")
        weights = {"Passing": 1, "Warning": 1}
        if weights_in is not None:
            if not isinstance(weights_in, dict):
                return self._bad("Request decode failed: Weights must be an object")
            w = _lower_keys(weights_in)
            weights = {"Passing": w.get("passing", 0), "Warning": w.get("warning", 0)}
            if (problem := _weights_problem(weights)) is not None:
                return self._bad(f"Invalid Weights: {problem}")
        definitions: list[dict[str, Any]] = []
        # An all-empty check definition is no check at all (CheckType.Empty()).
        if isinstance(args.get("check"), dict) and args["check"]:
            definitions.append(_lower_keys(args["check"]))
        for item in args.get("checks") or []:
            if isinstance(item, dict) and item:
                definitions.append(_lower_keys(item))
        checks: list[CheckRecord] = []
        for n, chk in enumerate(definitions, start=1):
            try:
                ttl = _duration(chk.get("ttl"))
                interval = _duration(chk.get("interval"))
                timeout = _duration(chk.get("timeout"))
                deregister = _duration(chk.get("deregistercriticalserviceafter"))
            except ValueError as exc:
                return self._bad(f"Request decode failed: {exc}")
            status = chk.get("status") or ""
            if status and status not in (PASSING, WARNING, CRITICAL):
                return self._bad("Status for checks must 'passing', 'warning', 'critical'")
            http = chk.get("http") or None
            if ttl and ttl > 0:
                kind = "ttl"
            elif http and interval and interval > 0:
                kind = "http"
            else:
                return self._bad(INVALID_CHECK)
            check_id = (
                chk.get("checkid")
                or chk.get("id")
                or (
                    f"service:{service_id}"
                    if len(definitions) == 1
                    else f"service:{service_id}:{n}"
                )
            )
            record = CheckRecord(
                check_id=check_id,
                name=chk.get("name") or f"Service '{name}' check",
                service_id=service_id,
                service_name=name,
                kind=kind,
                status=status or CRITICAL,
                notes=chk.get("notes") or "",
                ttl=ttl if kind == "ttl" else None,
                http=http if kind == "http" else None,
                interval=max(interval, CHECK_MIN_INTERVAL) if kind == "http" and interval else None,
                timeout=(timeout or DEFAULT_HTTP_TIMEOUT) if kind == "http" else None,
                deregister_after=(
                    max(deregister, self.deregister_min) if deregister and deregister > 0 else None
                ),
            )
            checks.append(record)
        self._require_write(request)

        service = ServiceRecord(
            id=service_id,
            name=name,
            tags=list(tags),
            address=address,
            port=port,
            meta=dict(meta),
            weights=weights,
            enable_tag_override=bool(args.get("enabletagoverride", False)),
        )
        changed = False
        existing = self.services.get(service_id)
        if existing is None or not existing.same_as(service):
            changed = True
        for check in checks:
            old = self.checks.get(check.check_id)
            if old is not None:
                # The agent snapshots check state: a re-registered check keeps its status.
                check.status, check.output = old.status, old.output
                check.critical_since = old.critical_since
                check.create_index, check.modify_index = old.create_index, old.modify_index
                if old.definition() != check.definition() or old.service_id != service_id:
                    changed = True
                self._stop_check(old)
            else:
                changed = True
                if check.status == CRITICAL:
                    check.critical_since = time.monotonic()
        index = self._bump() if changed else self.index
        base = existing if existing is not None else service
        service.create_index = base.create_index or index
        service.modify_index = index if changed else base.modify_index
        self.services[service_id] = service
        for check in checks:
            if not check.create_index:
                check.create_index = check.modify_index = index
            self.checks[check.check_id] = check
            if check.kind == "ttl":
                self._arm_ttl(check)
            else:
                check.task = asyncio.create_task(self._run_http_check(check.check_id))
        return web.Response(status=200)

    async def _deregister(self, request: web.Request) -> web.Response:
        if (wrong := self._method(request, "PUT")) is not None:
            return wrong
        service_id = request.match_info["id"]
        allowed = self._acl(request)
        if service_id not in self.services:
            return web.Response(
                status=404,
                text=f'Unknown service ID "{service_id}". Ensure that the service ID is passed, '
                "not the service name.",
            )
        if not allowed:
            raise _Forbidden("Permission denied")
        self._remove_service(service_id)
        return web.Response(status=200)

    async def _agent_service(self, request: web.Request) -> web.Response:
        if (wrong := self._method(request, "GET")) is not None:
            return wrong
        service_id = request.match_info["id"]
        if not self._acl(request):
            raise _Forbidden("Permission denied")
        service = self.services.get(service_id)
        if service is None:
            return web.Response(status=404, text=f"unknown service ID: {service_id}")
        body = service.to_json()
        for key in ("Proxy", "Connect", "PeerName", "CreateIndex", "ModifyIndex"):
            body.pop(key, None)
        content_hash = f"{hash(json.dumps(body, sort_keys=True)) & 0xFFFFFFFFFFFFFFFF:016x}"
        body.update(ContentHash=content_hash, Datacenter=self.datacenter)
        return web.json_response(body, headers={"X-Consul-ContentHash": content_hash})

    async def _check_pass(self, request: web.Request) -> web.Response:
        if (wrong := self._method(request, "PUT")) is not None:
            return wrong
        check_id = request.match_info["id"]
        allowed = self._acl(request)
        check = self.checks.get(check_id)
        if check is None:
            return web.Response(
                status=404,
                text=f'Unknown check ID "{check_id}". Ensure that the check ID is passed, '
                "not the check name.",
            )
        if not allowed:
            raise _Forbidden("Permission denied")
        if check.kind != "ttl":
            return web.Response(
                status=500, text=f'CheckID "{check_id}" does not have associated TTL'
            )
        self._set_status(check, PASSING, request.query.get("note", ""))
        self._arm_ttl(check)
        return web.Response(status=200)

    async def _health_service(self, request: web.Request) -> web.Response:
        if (wrong := self._method(request, "GET")) is not None:
            return wrong
        name = request.match_info["name"]
        query = request.query
        passing = False
        if "passing" in query:
            value = query["passing"]
            if value == "" or value in _TRUE:
                passing = True
            elif value not in _FALSE:
                return self._bad("Invalid value for ?passing")
        min_index = 0
        if "index" in query:
            try:
                min_index = int(query["index"])
                if min_index < 0:
                    raise ValueError
            except ValueError:
                return self._bad("Invalid index")
        wait = DEFAULT_WAIT
        if "wait" in query:
            try:
                wait = parse_go_duration(query["wait"])
            except ValueError:
                return self._bad("Invalid wait time")
        wait = min(wait, MAX_WAIT)
        if query.get("dc") and query["dc"] != self.datacenter:
            return web.Response(status=500, text="No path to datacenter")
        allowed = self._acl(request)
        if min_index > 0:
            if self.wait_jitter:
                wait += random.uniform(0, wait / 16)
            deadline = time.monotonic() + wait
            while self.index <= min_index:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await self._changed.wait()
        entries = self._entries(name, passing) if allowed else []
        return web.json_response(
            entries,
            headers={
                "X-Consul-Index": str(self.index),
                "X-Consul-KnownLeader": "true",
                "X-Consul-LastContact": "0",
            },
        )

    def _entries(self, name: str, passing: bool) -> list[dict[str, Any]]:
        node = {
            "ID": self.node_id,
            "Node": self.node,
            "Address": self.node_address,
            "Datacenter": self.datacenter,
            "TaggedAddresses": {"lan": self.node_address, "wan": self.node_address},
            "Meta": {"consul-network-segment": ""},
            "CreateIndex": 1,
            "ModifyIndex": 1,
        }
        serf = {
            "Node": self.node,
            "CheckID": "serfHealth",
            "Name": "Serf Health Status",
            "Status": PASSING,
            "Notes": "",
            "Output": "Agent alive and reachable",
            "ServiceID": "",
            "ServiceName": "",
            "ServiceTags": [],
            "Type": "",
            "CreateIndex": 1,
            "ModifyIndex": 1,
        }
        entries = []
        for service in sorted(self.services.values(), key=lambda s: s.id):
            if service.name != name:
                continue
            checks = [c for c in self.checks.values() if c.service_id == service.id]
            if passing and any(c.status != PASSING for c in checks):
                continue
            entries.append(
                {
                    "Node": node,
                    "Service": service.to_json(),
                    "Checks": [serf, *(c.to_json(self.node) for c in checks)],
                }
            )
        return entries


def _meta_problem(meta: dict[str, str]) -> str | None:
    if len(meta) > 64:
        return "Node metadata cannot contain more than 64 key/value pairs"
    for key, value in meta.items():
        problem = None
        if key == "":
            problem = "Key cannot be blank"
        elif not _META_KEY.match(key):
            problem = "Key contains invalid characters"
        elif len(key.encode()) > 128:
            problem = "Key is too long (limit: 128 characters)"
        elif key.startswith("consul-"):
            problem = "Key prefix 'consul-' is reserved for internal use"
        elif len(value.encode()) > 512:
            problem = "Value is too long (limit: 512 characters)"
        if problem is not None:
            return f"Couldn't load metadata pair ('{key}', '{value}'): {problem}"
    return None


def _weights_problem(weights: dict[str, Any]) -> str | None:
    passing, warning = weights["Passing"], weights["Warning"]
    if not isinstance(passing, int) or not isinstance(warning, int):
        return "Passing and Warning must be integers"
    if passing < 1:
        return "Passing must be greater than 0"
    if warning < 0:
        return "Warning must be greater or equal than 0"
    if passing > 65535 or warning > 65535:
        return "DNS Weight must be between 0 and 65535"
    return None
