"""Circuit breakers per instance (optionally per instance and method) for the pick stage.

:class:`CircuitBreakers` is both an endpoint *selector* and an attempt *observer*
(see :mod:`meshkit.rpc.pick`): ``select`` drops the endpoints whose breaker is open,
``on_start``/``on_finish`` feed it the outcome of every attempt. Pass the same object
as both::

    breakers = CircuitBreakers(fail_max=5, reset_timeout=10.0)
    Pick(resolver, RoundRobin(), selectors=[breakers], observers=[breakers])

(With :class:`~meshkit.rpc.outlier.OutlierEjection` and
:class:`~meshkit.rpc.zone.ZonePreference`: ``selectors=[outliers, breakers, zone]``.)

**States** (Nygard's *Release It!*, as in pybreaker and Kitex ``pkg/circuitbreak``):

* *closed* — calls flow; ``fail_max`` consecutive failures open the breaker;
* *open* — the endpoint gets no attempts for ``reset_timeout`` seconds;
* *half-open* — after that, probe attempts go through **one at a time** (the
  next probe waits until the one in flight has answered); ``success_threshold``
  successful probes close the breaker, a failed probe opens it again.

When every candidate's breaker is open, ``select`` raises
:class:`~meshkit.errors.CircuitOpen` naming the service and how long until the
first probe is allowed (the retry stage does not retry ``CIRCUIT_OPEN``).

**What counts.** A *failure* is an error whose status code is in
``failure_codes`` (default UNAVAILABLE — connection refused or broken, or the
server said so —, DEADLINE_EXCEEDED, INTERNAL and RESOURCE_EXHAUSTED); an
unexpected non-meshkit exception counts as INTERNAL. Every answer the endpoint
gave in good health is a *success*: a result, an exception declared in the IDL,
INVALID_ARGUMENT, UNIMPLEMENTED. Cancellations (the caller or a hedge gave up)
count as neither (:func:`classify`).

**How pybreaker is used, and why this way.** pybreaker (1.4) guards *synchronous*
calls: ``CircuitBreaker.call(func)`` runs ``func`` under a ``threading.RLock`` and
updates the state from how it returned; its only async path (``call_async``) is
Tornado's. An RPC attempt here is not a function call that a breaker could wrap:
it is split across ``on_start`` and ``on_finish`` around awaits, and the pick stage
must know *before* the attempt which endpoints are allowed. So each breaker is one
``pybreaker.CircuitBreaker`` used as the **state machine** and fed only through its
public API, never holding its lock across an await:

* an outcome is recorded, after the attempt has finished, as
  ``breaker.call(_succeed)`` or ``breaker.call(_fail)`` — functions that return or
  raise at once (``_fail`` raises a private sentinel, never the caller's exception,
  whose traceback must stay untouched). pybreaker's own states then count
  consecutive failures, open at ``fail_max`` (``throw_new_error_on_trip=False`` so
  the sentinel, not ``CircuitBreakerError``, comes back), re-open on a failed
  half-open call and close after ``success_threshold`` half-open successes;
* ``breaker.half_open()`` is called by ``select`` once ``reset_timeout`` has
  elapsed — pybreaker would only do it inside the next ``call``, too late to admit
  exactly one probe;
* a ``CircuitBreakerListener`` hears every ``state_change`` and updates meshkit's
  side: the cached state read on the hot path, the time the breaker opened (on
  the injectable monotonic ``clock``, not pybreaker's wall-clock ``datetime``), a
  *generation* number, metrics and logs.

What pybreaker does not do, meshkit adds: the one-probe-at-a-time gate, and
generations (as in sony/gobreaker): an outcome counts only if its attempt began in
the breaker's current state, so a slow call sent before the breaker opened cannot
close or re-open it later.

**Cost.** Endpoints that never failed have no breaker at all: ``select`` returns
its input unchanged and the observer hooks cost a dict lookup or two. A breaker
is created at an endpoint's first failure and dropped once it is closed with no
failure counted, or once it has not been open nor used for ``FORGET_AFTER`` (60 s,
at least 6 reset timeouts: its endpoint left discovery). While some exist,
``select`` returns the same filtered list object for the same input until a
breaker changes state.

**Metrics** (created once per ``CollectorRegistry``):
``meshkit_rpc_client_breaker_state{service,endpoint}`` — 0 closed, 1 half-open, 2
open (per-method breakers: the worst state of the endpoint's methods); series
appear at an endpoint's first failure and are removed ``SERIES_TTL`` seconds after
its breaker closed for good. ``meshkit_rpc_client_breaker_transitions_total{service,state}``
counts the state changes by the state entered. Transitions are logged on
``meshkit.rpc.breaker``.

Not thread-safe beyond what pybreaker locks: use one object from one event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import time
from collections.abc import Callable, Iterable, Sequence

import pybreaker
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge
from thriftpy2.thrift import TException

from .._metrics import PerRegistry
from ..errors import CircuitOpen, InvalidArgument, MeshkitError, StatusCode
from .context import CallContext
from .endpoint import Endpoint

__all__ = [
    "CLOSED",
    "DEFAULT_FAILURE_CODES",
    "HALF_OPEN",
    "OPEN",
    "BreakerMetrics",
    "CircuitBreakers",
    "Outcome",
    "classify",
    "status_codes",
]

log = structlog.get_logger("meshkit.rpc.breaker")

CLOSED = pybreaker.STATE_CLOSED
OPEN = pybreaker.STATE_OPEN
HALF_OPEN = pybreaker.STATE_HALF_OPEN

#: The value of ``meshkit_rpc_client_breaker_state`` for each state.
STATE_VALUES = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}

DEFAULT_FAILURE_CODES = frozenset(
    {
        StatusCode.UNAVAILABLE,
        StatusCode.DEADLINE_EXCEEDED,
        StatusCode.INTERNAL,
        StatusCode.RESOURCE_EXHAUSTED,
    }
)

#: Seconds a breaker-state series stays (at 0) after its endpoint's breakers closed.
SERIES_TTL = 300.0

#: A probe not answered within this long is presumed lost and its slot freed.
PROBE_LEASE = 60.0

#: A breaker not open and not used for ``max(FORGET_AFTER, 6 * reset_timeout)``
#: seconds is forgotten (its endpoint left discovery, or gets no calls).
FORGET_AFTER = 60.0

# Codes that say nothing about the endpoint: the caller gave up, or the error was
# made locally by another policy.
_NEUTRAL_CODES = frozenset({StatusCode.CANCELLED, StatusCode.CIRCUIT_OPEN, StatusCode.NO_INSTANCES})


class Outcome(enum.Enum):
    """What one attempt says about the health of its endpoint."""

    SUCCESS = "success"
    FAILURE = "failure"
    IGNORED = "ignored"


_SUCCESS = Outcome.SUCCESS
_FAILURE = Outcome.FAILURE
_IGNORED = Outcome.IGNORED


def classify(error: BaseException | None, failure_codes: frozenset[StatusCode]) -> Outcome:
    """Whether an attempt that ended with ``error`` was a health success or failure.

    ``None``, exceptions declared in the IDL and meshkit errors whose code is not
    in ``failure_codes`` are successes (the endpoint answered); codes in
    ``failure_codes`` are failures; other exceptions count as INTERNAL.
    Cancellations (and CIRCUIT_OPEN/NO_INSTANCES, which no endpoint sends) are
    ignored.
    """
    if error is None:
        return _SUCCESS
    if isinstance(error, MeshkitError):
        code = error.code
        if code in failure_codes:
            return _FAILURE
        return _IGNORED if code in _NEUTRAL_CODES else _SUCCESS
    if isinstance(error, asyncio.CancelledError):
        return _IGNORED
    if isinstance(error, TException):  # declared in the IDL: the endpoint answered
        return _SUCCESS
    return _FAILURE if StatusCode.INTERNAL in failure_codes else _SUCCESS


def status_codes(codes: Iterable[StatusCode | str]) -> frozenset[StatusCode]:
    """``codes`` as a set of :class:`~meshkit.errors.StatusCode` (names are accepted)."""
    out = []
    for code in codes:
        try:
            out.append(StatusCode(code))
        except ValueError:
            raise InvalidArgument(
                f"expected status codes among {', '.join(c.value for c in StatusCode)}, "
                f"found {code!r}"
            ) from None
    return frozenset(out)


class BreakerMetrics(PerRegistry):
    """The breaker metric family in one registry (created once, keyed weakly)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.state = Gauge(
            "meshkit_rpc_client_breaker_state",
            "Circuit breaker state by called service and endpoint (0 closed, 1 half-open, 2 open)",
            ["service", "endpoint"],
            registry=registry,
        )
        self.transitions = Counter(
            "meshkit_rpc_client_breaker_transitions",
            "Circuit breaker state changes by called service and state entered",
            ["service", "state"],
            registry=registry,
        )


class _AttemptFailed(Exception):
    """Raised inside ``pybreaker.CircuitBreaker.call`` to record a failed attempt."""


def _succeed() -> None:
    return None


def _fail() -> None:
    raise _AttemptFailed


_Key = str  # "host:port" (Endpoint.address: its hash is cached, a tuple's is not)


class _Table:
    """The breakers of one method (or of all methods), with the select cache."""

    __slots__ = (
        "blocked",
        "computed",
        "entries",
        "method",
        "seen",
        "seen_out",
        "seen_version",
        "version",
        "wake",
    )

    def __init__(self, method: str) -> None:
        self.method = method
        self.entries: dict[_Key, _Breaker] = {}
        self.version = 0
        self.computed = -1  # the version ``blocked`` and ``wake`` were computed for
        self.blocked: frozenset[_Key] = frozenset()
        self.wake = math.inf  # when an open breaker may probe or a probe lease ends
        self.seen: Sequence[Endpoint] | None = None
        self.seen_version = -1
        self.seen_out: Sequence[Endpoint] = ()


class _Breaker:
    """One endpoint's (or endpoint and method's) breaker and meshkit's view of it."""

    __slots__ = (
        "address",
        "breaker",
        "generation",
        "key",
        "opened_at",
        "probe_since",
        "probing",
        "service",
        "state",
        "table",
        "touched",
    )

    def __init__(self, table: _Table, key: _Key, address: str, service: str) -> None:
        self.table = table
        self.key = key
        self.address = address
        self.service = service
        self.state = CLOSED
        self.generation = 0
        self.opened_at = 0.0
        self.probing = False
        self.probe_since = 0.0
        self.touched = 0.0  # last attempt started or outcome recorded
        self.breaker: pybreaker.CircuitBreaker


class _Listener(pybreaker.CircuitBreakerListener):
    def __init__(self, owner: CircuitBreakers, entry: _Breaker) -> None:
        self._owner = owner
        self._entry = entry

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        self._owner._changed(self._entry, new_state.name)


class CircuitBreakers:
    """Circuit breakers per endpoint (or per endpoint and method), for :class:`Pick`.

    ``fail_max`` consecutive failures open an endpoint's breaker for
    ``reset_timeout`` seconds; then probes go through one at a time and
    ``success_threshold`` successes close it. ``per_method`` keeps a breaker per
    endpoint *and method* (a method that fails does not block the others).
    ``failure_codes`` are the status codes that count as failures (see
    :func:`classify`). ``metrics_registry`` receives the breaker metrics;
    ``clock`` (monotonic seconds) is injectable for tests. See the module docstring
    for how it uses pybreaker.
    """

    name = "circuit_breaker"

    def __init__(
        self,
        fail_max: int = 5,
        reset_timeout: float = 10.0,
        per_method: bool = False,
        failure_codes: Iterable[StatusCode | str] = DEFAULT_FAILURE_CODES,
        *,
        success_threshold: int = 1,
        metrics_registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if fail_max < 1:
            raise InvalidArgument(f"expected fail_max of at least 1, found {fail_max!r}")
        if not reset_timeout > 0:
            raise InvalidArgument(f"expected a reset_timeout > 0 seconds, found {reset_timeout!r}")
        if success_threshold < 1:
            raise InvalidArgument(
                f"expected success_threshold of at least 1, found {success_threshold!r}"
            )
        self.fail_max = fail_max
        self.reset_timeout = float(reset_timeout)
        self.per_method = per_method
        self.success_threshold = success_threshold
        self.failure_codes = status_codes(failure_codes)
        self.metrics = BreakerMetrics.get(metrics_registry)
        self._clock = clock
        self._tables: dict[str, _Table] = {}
        #: breakers in all tables; 0 (every endpoint clean) is the common case, checked first
        self._entries = 0
        #: no breaker anywhere: the pick stage skips select, on_start and a success's on_finish
        self.idle = True
        self._slot = f"meshkit.breaker.{id(self):x}"  # this object's key in ctx.extras
        self._retired: dict[tuple[str, str], float] = {}
        self._forget_after = max(FORGET_AFTER, 6 * self.reset_timeout)
        self._next_sweep = clock() + self._forget_after

    # -- the selector

    def select(self, endpoints: Sequence[Endpoint], ctx: CallContext) -> Sequence[Endpoint]:
        """The endpoints whose breaker admits an attempt now.

        Raises :class:`~meshkit.errors.CircuitOpen` when no endpoint does.
        """
        if not self._entries:
            return endpoints
        table = self._tables.get(ctx.method if self.per_method else "")
        if table is None or not table.entries:
            return endpoints
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
            if not table.entries:
                return endpoints
        if table.computed != table.version:
            self._compute(table)
        if now >= table.wake:
            self._wake(table, now)
        if endpoints is table.seen and table.seen_version == table.version:
            return table.seen_out
        blocked = table.blocked
        if not blocked:
            out: Sequence[Endpoint] = endpoints
        else:
            out = [e for e in endpoints if e.address not in blocked]
            if not out:
                raise self._all_open(table, endpoints, ctx, now)
        table.seen = endpoints
        table.seen_version = table.version
        table.seen_out = out
        return out

    # -- the observer

    def on_start(self, endpoint: Endpoint, ctx: CallContext) -> None:
        """Note the attempt's breaker generation; take the probe slot when half-open."""
        if not self._entries:
            return
        table = self._tables.get(ctx.method if self.per_method else "")
        if table is None or not table.entries:
            return
        key = endpoint.address
        entry = table.entries.get(key)
        if entry is None:
            return
        probe = False
        now = entry.touched = self._clock()
        if entry.state == HALF_OPEN and not entry.probing:
            entry.probing = True
            entry.probe_since = now
            table.version += 1
            probe = True
        ctx.extras[self._slot] = (key, entry, entry.generation, probe)

    def on_finish(
        self, endpoint: Endpoint, ctx: CallContext, latency: float, error: BaseException | None
    ) -> None:
        """Record the attempt's outcome in its endpoint's breaker."""
        if error is None and not self._entries:
            if ctx.extras:  # a token of an entry removed since: nothing left to settle
                ctx.extras.pop(self._slot, None)
            return
        token = ctx.extras.pop(self._slot, None)
        outcome = _SUCCESS if error is None else classify(error, self.failure_codes)
        key = endpoint.address
        if token is not None and token[0] == key:
            started: _Breaker = token[1]
            generation: int = token[2]
            if token[3]:  # this attempt held the probe slot
                started.probing = False
                started.table.version += 1
            if (
                outcome is not _IGNORED
                and generation == started.generation
                and started.table.entries.get(key) is started
            ):
                self._record(started, outcome)
            return
        if outcome is _IGNORED:
            return
        # The attempt began while the endpoint had no breaker.
        method = ctx.method if self.per_method else ""
        table = self._tables.get(method)
        entry = table.entries.get(key) if table is not None else None
        if entry is None:
            if outcome is _SUCCESS:
                return
            if table is None:
                table = self._tables[method] = _Table(method)
            entry = self._create(table, key, endpoint, ctx)
        elif entry.generation != 0:
            return  # the breaker changed state since this attempt began
        self._record(entry, outcome)

    # -- introspection

    def state(self, endpoint: Endpoint | str, method: str | None = None) -> str:
        """``"closed"``, ``"open"`` or ``"half-open"`` for ``endpoint`` (and ``method``).

        An open breaker whose timeout has elapsed reads ``"open"`` until the next
        ``select`` half-opens it.
        """
        if isinstance(endpoint, str):
            endpoint = Endpoint.parse(endpoint)
        table = self._tables.get((method or "") if self.per_method else "")
        if table is None:
            return CLOSED
        entry = table.entries.get(endpoint.address)
        if entry is None:
            return CLOSED
        return entry.state

    def states(self) -> dict[str, str]:
        """Every breaker that is not clean: ``{"host:port": state}`` (``"host:port method"``
        per method). Endpoints missing from it are closed with no failure counted."""
        out: dict[str, str] = {}
        for method, table in self._tables.items():
            for entry in table.entries.values():
                name = f"{entry.address} {method}" if method else entry.address
                out[name] = entry.state
        return out

    # -- internals

    def _create(self, table: _Table, key: _Key, endpoint: Endpoint, ctx: CallContext) -> _Breaker:
        entry = _Breaker(table, key, endpoint.address, ctx.service)
        name = f"{ctx.service}@{endpoint.address}"
        if table.method:
            name = f"{name}/{table.method}"
        entry.breaker = pybreaker.CircuitBreaker(
            fail_max=self.fail_max,
            reset_timeout=self.reset_timeout,
            success_threshold=self.success_threshold,
            listeners=[_Listener(self, entry)],
            name=name,
            throw_new_error_on_trip=False,
        )
        table.entries[key] = entry
        self._entries += 1
        self.idle = False
        table.version += 1
        self._publish(entry)
        return entry

    def _record(self, entry: _Breaker, outcome: Outcome) -> None:
        entry.touched = self._clock()
        try:
            entry.breaker.call(_fail if outcome is _FAILURE else _succeed)
        except _AttemptFailed:
            return  # recorded (a failure never leaves the breaker clean)
        except pybreaker.CircuitBreakerError:
            return  # the breaker was open: pybreaker refused the outcome
        if entry.state == CLOSED and entry.breaker.fail_counter == 0:
            self._remove(entry)

    def _remove(self, entry: _Breaker) -> None:
        table = entry.table
        if table.entries.get(entry.key) is entry:
            del table.entries[entry.key]
            self._entries -= 1
            self.idle = self._entries == 0
            table.version += 1
            self._publish(entry)

    def _changed(self, entry: _Breaker, state: str) -> None:
        """pybreaker's listener: the breaker of ``entry`` entered ``state``."""
        previous = entry.state
        entry.state = state
        entry.generation += 1
        entry.table.version += 1
        now = entry.touched = self._clock()
        if state == OPEN:
            entry.opened_at = now
            entry.probing = False
        self.metrics.transitions.labels(entry.service, state).inc()
        self._publish(entry)
        method = entry.table.method or None
        if state == OPEN:
            log.warning(
                "circuit breaker opened",
                service=entry.service,
                endpoint=entry.address,
                method=method,
                previous=previous,
                failures=entry.breaker.fail_counter,
                reset_timeout=self.reset_timeout,
            )
        else:
            log.info(
                f"circuit breaker {state}",
                service=entry.service,
                endpoint=entry.address,
                method=method,
                previous=previous,
            )

    def _sweep(self, now: float) -> None:
        """Forget breakers that are not open and were not used for a long while."""
        self._next_sweep = now + self._forget_after
        horizon = now - self._forget_after
        for table in self._tables.values():
            idle = [
                e
                for e in table.entries.values()
                if e.state != OPEN and not e.probing and e.touched <= horizon
            ]
            for entry in idle:
                self._remove(entry)

    def _wake(self, table: _Table, now: float) -> None:
        """Half-open the breakers whose timeout elapsed; free lost probe slots."""
        for entry in list(table.entries.values()):
            if entry.state == OPEN:
                if now - entry.opened_at >= self.reset_timeout:
                    entry.breaker.half_open()
            elif entry.probing and now - entry.probe_since >= PROBE_LEASE:
                entry.probing = False
                table.version += 1
        self._compute(table)

    def _compute(self, table: _Table) -> None:
        blocked: list[_Key] = []
        wake = math.inf
        for key, entry in table.entries.items():
            if entry.state == OPEN:
                blocked.append(key)
                wake = min(wake, entry.opened_at + self.reset_timeout)
            elif entry.probing:
                blocked.append(key)
                wake = min(wake, entry.probe_since + PROBE_LEASE)
        table.blocked = frozenset(blocked)
        table.computed = table.version
        table.wake = wake

    def _all_open(
        self, table: _Table, endpoints: Sequence[Endpoint], ctx: CallContext, now: float
    ) -> CircuitOpen:
        waits: list[float] = []
        probing: list[str] = []
        for e in endpoints:
            entry = table.entries.get(e.address)
            if entry is None:
                continue
            if entry.state == OPEN:
                waits.append(entry.opened_at + self.reset_timeout - now)
            else:
                probing.append(e.address)
        what = repr(ctx.service) + (f" for {ctx.method}" if table.method else "")
        found = f"all {len(endpoints)} open" if not probing else f"all {len(endpoints)} blocked"
        parts = []
        if probing:
            parts.append(f"a probe is in flight to {', '.join(probing[:3])}")
        if waits:
            parts.append(f"the first probe is allowed in {max(0.0, min(waits)):.2f} s")
        return CircuitOpen(
            f"expected an instance of {what} with a closed circuit breaker, found {found}; "
            + "; ".join(parts)
        )

    def _publish(self, entry: _Breaker) -> None:
        """Set the state series of ``entry``'s endpoint (its worst breaker)."""
        worst = -1
        for table in self._tables.values():
            other = table.entries.get(entry.key)
            if other is not None:
                worst = max(worst, STATE_VALUES[other.state])
        label = (entry.service, entry.address)
        gauge = self.metrics.state
        now = self._clock()
        if worst < 0:
            gauge.labels(*label).set(0)
            self._retired[label] = now
        else:
            gauge.labels(*label).set(worst)
            self._retired.pop(label, None)
        if self._retired:
            horizon = now - SERIES_TTL
            for old in [k for k, t in self._retired.items() if t <= horizon]:
                del self._retired[old]
                with contextlib.suppress(KeyError):
                    gauge.remove(*old)
