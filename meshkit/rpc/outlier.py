"""Outlier ejection: take misbehaving instances out of the pool for a while.

:class:`OutlierEjection` follows Envoy's outlier detection, passively (from the
outcomes of real calls, no health checks), as an endpoint *selector* and an
attempt *observer* for the pick stage (:mod:`meshkit.rpc.pick`); pass the same
object as both::

    outliers = OutlierEjection()
    Pick(resolver, RoundRobin(), selectors=[outliers], observers=[outliers])

Two detectors eject an endpoint:

* **consecutive failures** (Envoy's ``consecutive_5xx``): ``consecutive_failures``
  failed attempts in a row, failures being judged as for the circuit breakers
  (:func:`meshkit.rpc.breaker.classify`: UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL,
  RESOURCE_EXHAUSTED by default). It acts at once, on the failure that reaches the
  count;
* **latency**: every ``interval`` seconds, an endpoint whose latency EWMA is above
  ``latency_factor`` times the *median of its peers'* EWMAs is ejected — when it has
  at least ``min_samples`` samples, at least ``min_peers`` other endpoints have as
  many (recent ones), and its EWMA is at least ``latency_floor`` (so microsecond
  noise on a fast service never ejects anyone). The EWMA folds in the latency of
  answered attempts and of attempts that hit their deadline (a lower bound); fast
  failures are not latency samples. The worst endpoint is judged first.

An ejection lasts ``base_ejection * 2 ** (n - 1)`` seconds, ``n`` being how many
times the endpoint was ejected, capped at ``max_ejection``; ``n`` starts again from
zero once the endpoint has stayed in the pool for ``healthy_period`` seconds after
its last return (default: ``max_ejection``). A returning endpoint starts with no
failure and no latency sample, so it is judged on fresh evidence.

**Never too many.** No endpoint is ejected while ``max_ejected_fraction`` of the
pool (the number of candidates ``select`` last saw) is already out, and ``select``
itself never removes more than that fraction of the list it is given: if more of
them are ejected (the list was narrowed by an earlier selector), the least bad
ones — fewest ejections, then soonest to return — are let back in.

**Cost.** While nothing is ejected ``select`` returns its input unchanged; the
observer does a dict lookup and an EWMA update per attempt, and the latency sweep
runs at most once per ``interval``. While endpoints are ejected, ``select``
returns the same filtered list object for the same input until something changes.

**Metrics and logs.** ``meshkit_rpc_client_outlier_ejected{service}`` (endpoints
ejected now) and ``meshkit_rpc_client_outlier_ejections_total{service,reason}``
(``reason`` = ``consecutive_failures`` or ``latency``), created once per
``CollectorRegistry``. Ejections and returns are logged on ``meshkit.rpc.outlier``.

Not thread-safe: use one object from one event loop.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from .._metrics import PerRegistry
from ..errors import DeadlineExceeded, InvalidArgument, StatusCode
from .breaker import DEFAULT_FAILURE_CODES, Outcome, classify, status_codes
from .context import CallContext
from .endpoint import Endpoint

__all__ = ["OutlierEjection", "OutlierMetrics"]

log = structlog.get_logger("meshkit.rpc.outlier")

CONSECUTIVE_FAILURES = "consecutive_failures"
LATENCY = "latency"

_SUCCESS = Outcome.SUCCESS
_IGNORED = Outcome.IGNORED


class OutlierMetrics(PerRegistry):
    """The outlier-ejection metric family in one registry (created once, keyed weakly)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.ejected = Gauge(
            "meshkit_rpc_client_outlier_ejected",
            "Endpoints of the called service ejected by outlier detection now",
            ["service"],
            registry=registry,
        )
        self.ejections = Counter(
            "meshkit_rpc_client_outlier_ejections",
            "Outlier ejections by called service and reason (consecutive_failures, latency)",
            ["service", "reason"],
            registry=registry,
        )


_Key = str  # "host:port" (Endpoint.address: its hash is cached, a tuple's is not)


class _Host:
    """What outlier detection knows of one endpoint."""

    __slots__ = (
        "address",
        "ejected_until",
        "ewma",
        "failures",
        "key",
        "last_seen",
        "reason",
        "returned_at",
        "samples",
        "service",
        "times",
    )

    def __init__(self, key: _Key, address: str, service: str, now: float) -> None:
        self.key = key
        self.address = address
        self.service = service
        self.failures = 0
        self.ewma = 0.0
        self.samples = 0
        self.last_seen = now
        self.ejected_until = 0.0  # 0: in the pool
        self.times = 0
        self.returned_at = 0.0
        self.reason = ""


def _median_without(values: list[float], i: int) -> float:
    """The median of sorted ``values`` without the element at index ``i``."""
    m = len(values) - 1

    def at(k: int) -> float:
        return values[k if k < i else k + 1]

    if m % 2:
        return at(m // 2)
    return (at(m // 2 - 1) + at(m // 2)) / 2


class OutlierEjection:
    """Eject endpoints on consecutive failures or outlying latency (Envoy-style).

    ``consecutive_failures`` (``None`` disables) failures in a row eject an
    endpoint; so does a latency EWMA above ``latency_factor`` (``None`` disables)
    times the median of its peers'. Ejections last ``base_ejection * 2**(n-1)``
    seconds up to ``max_ejection``; at most ``max_ejected_fraction`` of the pool is
    ever out. See the module docstring for the details of each knob:
    ``min_samples``, ``min_peers``, ``ewma_alpha`` (weight of a new latency
    sample), ``latency_floor``, ``interval`` (seconds between latency sweeps),
    ``healthy_period``, ``failure_codes``. ``clock`` (monotonic seconds) is
    injectable for tests.
    """

    name = "outlier"

    def __init__(
        self,
        consecutive_failures: int | None = 5,
        latency_factor: float | None = 3.0,
        base_ejection: float = 1.0,
        max_ejection: float = 60.0,
        max_ejected_fraction: float = 0.5,
        *,
        min_samples: int = 10,
        min_peers: int = 3,
        ewma_alpha: float = 0.2,
        latency_floor: float = 0.005,
        interval: float = 1.0,
        healthy_period: float | None = None,
        failure_codes: Iterable[StatusCode | str] = DEFAULT_FAILURE_CODES,
        metrics_registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if consecutive_failures is not None and consecutive_failures < 1:
            raise InvalidArgument(
                f"expected consecutive_failures of at least 1 (or None), "
                f"found {consecutive_failures!r}"
            )
        if latency_factor is not None and not latency_factor > 1.0:
            raise InvalidArgument(
                f"expected a latency_factor > 1 (or None), found {latency_factor!r}"
            )
        if not 0 < base_ejection <= max_ejection:
            raise InvalidArgument(
                f"expected 0 < base_ejection <= max_ejection seconds, "
                f"found {base_ejection!r} and {max_ejection!r}"
            )
        if not 0.0 <= max_ejected_fraction <= 1.0:
            raise InvalidArgument(
                f"expected max_ejected_fraction between 0 and 1, found {max_ejected_fraction!r}"
            )
        if not 0.0 < ewma_alpha <= 1.0:
            raise InvalidArgument(f"expected 0 < ewma_alpha <= 1, found {ewma_alpha!r}")
        if min_samples < 1 or min_peers < 1:
            raise InvalidArgument(
                f"expected min_samples and min_peers of at least 1, "
                f"found {min_samples!r} and {min_peers!r}"
            )
        if not interval > 0:
            raise InvalidArgument(f"expected an interval > 0 seconds, found {interval!r}")
        self.consecutive_failures = consecutive_failures
        self.latency_factor = latency_factor
        self.base_ejection = float(base_ejection)
        self.max_ejection = float(max_ejection)
        self.max_ejected_fraction = float(max_ejected_fraction)
        self.min_samples = min_samples
        self.min_peers = min_peers
        self.ewma_alpha = float(ewma_alpha)
        self.latency_floor = float(latency_floor)
        self.interval = float(interval)
        self.healthy_period = float(max_ejection if healthy_period is None else healthy_period)
        self.failure_codes = status_codes(failure_codes)
        self.metrics = OutlierMetrics.get(metrics_registry)
        self._clock = clock
        self._hosts: dict[_Key, _Host] = {}
        self._ejected: dict[_Key, _Host] = {}
        self._pool = 0  # candidates the last select saw
        self._next_return = math.inf
        self._next_sweep = clock() + self.interval
        # peers must have answered within this long to count
        self._fresh = 10 * self.interval
        self._version = 0
        self._seen: Sequence[Endpoint] | None = None
        self._seen_version = -1
        self._seen_out: Sequence[Endpoint] = ()

    # -- the selector

    def select(self, endpoints: Sequence[Endpoint], ctx: CallContext) -> Sequence[Endpoint]:
        """``endpoints`` without the ejected ones (but never more than the fraction)."""
        n = len(endpoints)
        self._pool = n
        ejected = self._ejected
        if not ejected:
            return endpoints
        now = self._clock()
        if now >= self._next_return:
            self._return_due(now)
            if not ejected:
                return endpoints
        if endpoints is self._seen and self._seen_version == self._version:
            return self._seen_out
        out = [e for e in endpoints if e.address not in ejected]
        removed = n - len(out)
        allowed = self._allowed(n)
        if removed > allowed:
            out_here = sorted(
                (ejected[e.address] for e in endpoints if e.address in ejected),
                key=lambda h: (h.times, h.ejected_until),
            )
            readmit = {h.key for h in out_here[: removed - allowed]}
            out = [e for e in endpoints if e.address not in ejected or e.address in readmit]
        result: Sequence[Endpoint] = out if removed else endpoints
        self._seen = endpoints
        self._seen_version = self._version
        self._seen_out = result
        return result

    # -- the observer

    observes_start = False  # on_start does nothing: the pick stage skips it

    def on_start(self, endpoint: Endpoint, ctx: CallContext) -> None:
        """Nothing to do before an attempt (part of the observer protocol)."""
        return None

    def on_finish(
        self, endpoint: Endpoint, ctx: CallContext, latency: float, error: BaseException | None
    ) -> None:
        """Count failures in a row, fold the latency into the EWMA, eject when due."""
        outcome = _SUCCESS if error is None else classify(error, self.failure_codes)
        if outcome is _IGNORED:
            return
        now = self._clock()
        key = endpoint.address
        host = self._hosts.get(key)
        if host is None:
            host = self._hosts[key] = _Host(key, endpoint.address, ctx.service, now)
        host.last_seen = now
        if not host.ejected_until:  # answers that arrive while ejected are not judged
            if outcome is _SUCCESS:
                host.failures = 0
                # _sample, inlined: this runs after every attempt
                if host.samples:
                    host.ewma += self.ewma_alpha * (latency - host.ewma)
                else:
                    host.ewma = latency
                host.samples += 1
            else:
                host.failures += 1
                if isinstance(error, DeadlineExceeded):
                    self._sample(host, latency)
                limit = self.consecutive_failures
                if limit is not None and host.failures >= limit:
                    self._eject(host, now, CONSECUTIVE_FAILURES)
        if now >= self._next_sweep:
            self._sweep(now)

    # -- introspection

    def ejected(self) -> dict[str, float]:
        """``{"host:port": seconds left}`` for every ejected endpoint."""
        now = self._clock()
        return {h.address: max(0.0, h.ejected_until - now) for h in self._ejected.values()}

    def stats(self) -> dict[str, dict[str, float]]:
        """Per endpoint: latency ``ewma`` (s), ``samples``, ``failures`` in a row,
        ``times`` ejected and ``ejected_for`` (seconds left, 0 when in the pool)."""
        now = self._clock()
        return {
            h.address: {
                "ewma": h.ewma,
                "samples": float(h.samples),
                "failures": float(h.failures),
                "times": float(h.times),
                "ejected_for": max(0.0, h.ejected_until - now) if h.ejected_until else 0.0,
            }
            for h in self._hosts.values()
        }

    # -- internals

    def _allowed(self, n: int) -> int:
        return int(self.max_ejected_fraction * n + 1e-9)

    def _sample(self, host: _Host, latency: float) -> None:
        if host.samples:
            host.ewma += self.ewma_alpha * (latency - host.ewma)
        else:
            host.ewma = latency
        host.samples += 1

    def _eject(self, host: _Host, now: float, reason: str) -> bool:
        pool = self._pool or len(self._hosts)
        if len(self._ejected) >= self._allowed(pool):
            return False
        if host.times and now - host.returned_at >= self.healthy_period:
            host.times = 0
        host.times += 1
        duration = min(self.max_ejection, self.base_ejection * 2.0 ** (host.times - 1))
        host.ejected_until = now + duration
        host.reason = reason
        self._ejected[host.key] = host
        self._next_return = min(self._next_return, host.ejected_until)
        self._version += 1
        self.metrics.ejected.labels(host.service).inc()
        self.metrics.ejections.labels(host.service, reason).inc()
        log.warning(
            "endpoint ejected",
            service=host.service,
            endpoint=host.address,
            reason=reason,
            seconds=duration,
            times=host.times,
            failures=host.failures,
            latency_ewma=round(host.ewma, 6),
        )
        return True

    def _return_due(self, now: float) -> None:
        due = [h for h in self._ejected.values() if h.ejected_until <= now]
        for host in due:
            del self._ejected[host.key]
            host.ejected_until = 0.0
            host.returned_at = now
            host.failures = 0
            host.samples = 0
            host.ewma = 0.0
            self.metrics.ejected.labels(host.service).dec()
            log.info(
                "endpoint returned",
                service=host.service,
                endpoint=host.address,
                reason=host.reason,
                times=host.times,
            )
        if due:
            self._version += 1
        self._next_return = min((h.ejected_until for h in self._ejected.values()), default=math.inf)

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + self.interval
        if now >= self._next_return:
            self._return_due(now)
        if self.latency_factor is not None:
            self._latency_outliers(now)
        horizon = now - max(self.healthy_period, self._fresh)
        stale = [k for k, h in self._hosts.items() if not h.ejected_until and h.last_seen < horizon]
        for key in stale:
            del self._hosts[key]

    def _latency_outliers(self, now: float) -> None:
        factor = self.latency_factor
        assert factor is not None
        fresh = now - self._fresh
        peers = [
            h
            for h in self._hosts.values()
            if not h.ejected_until and h.samples >= self.min_samples and h.last_seen >= fresh
        ]
        if len(peers) < self.min_peers + 1:
            return
        values = sorted(h.ewma for h in peers)
        peers.sort(key=lambda h: h.ewma, reverse=True)
        for host in peers:
            if host.ewma < self.latency_floor:
                return
            median = _median_without(values, bisect_left(values, host.ewma))
            # Lower EWMAs have a higher (or equal) median of the others: none qualifies.
            if host.ewma <= factor * median:
                return
            if not self._eject(host, now, LATENCY):
                return
