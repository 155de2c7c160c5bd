"""Adaptive server concurrency limit: shed with RESOURCE_EXHAUSTED before queues grow.

:class:`AdaptiveLimit` is a drop-in replacement for the fixed
:class:`~meshkit.rpc.concurrency.ConcurrencyLimit` stage (same signature, same
name ``"concurrency"``): it admits a call while fewer than ``limit`` calls are in
flight and refuses the rest at once, but ``limit`` follows the service's latency
instead of being configured. A server that is slowing down because work is
queueing somewhere (the event loop, the handler thread pool, a database) sees its
latency rise *before* its queues are long, and the limit falls with it.

**Gradient2** (``algorithm="gradient"``, the default) is Netflix
concurrency-limits' ``Gradient2Limit``
(https://github.com/Netflix/concurrency-limits, ``limit/Gradient2Limit.java``)
fed, as its documentation describes ("re-calculates the limit every sampling
window"), through ``WindowedLimit``: calls are gathered into *sample windows*
lasting twice the window's smallest latency, clamped to ``[min_window,
max_window]`` seconds (0.1 s to 1 s); a window with at least ``window_samples``
(10) calls gives one sample — its mean latency ``rtt`` and the most calls that
were in flight ``in_flight`` — and the limit is updated (:meth:`AdaptiveLimit.update`)::

    long_rtt  = long-term average of rtt                         # the no-load baseline
    if long_rtt / rtt > 2: long_rtt *= 0.95                   # recover after overload
    if in_flight < limit / 2: stop                             # app-limited: no evidence
    gradient  = clamp(rtt_tolerance * long_rtt / rtt, 0.5, 1)  # < 1 once latency inflates
    new       = limit * gradient + queue_size(limit)           # queue allowance: sqrt(limit)
    limit     = clamp(limit * (1 - smoothing) + new * smoothing, min_limit, max_limit)

While latency stays within ``rtt_tolerance`` (1.5 times) of the long-term average
the gradient is 1 and the limit grows by ``smoothing * sqrt(limit)`` per window;
when it inflates the gradient drops (never below 0.5, so one outlier cannot halve
the limit) and the limit shrinks until latency is back within about twice the
baseline (where ``gradient * limit + sqrt(limit) = limit``): a short queue, not a
long one. The queue allowance is ``sqrt(limit)`` (Netflix's ``GradientLimit``
default; ``Gradient2Limit`` defaults to a constant 4): pass ``queue_size`` to
change it.

The long-term average is Netflix's ``ExpAvgMeasurement`` (a plain mean of the
first ``warmup`` = 10 windows, then an exponential average over 600 one-second
windows) with one deviation: each window weighs as many seconds as it lasted, so
the average spans ``long_window`` = 600 *seconds* whatever the window length.
(With shorter windows and Netflix's per-window weight the baseline would follow a
queue within a minute; fed every call, within a second — measured with 16
workers and 200 callers: the limit then climbed to 400 with 180 calls queued.)
Even so, an overload lasting many minutes slowly becomes the baseline and the
limit creeps back up (Gradient2's known trade-off: a lasting change of latency
must be learned too): sustained overload is the autoscaler's job.

**AIMD** (``algorithm="aimd"``) is ``AIMDLimit``, fed the same windows: a window
slower than ``latency_threshold`` (default: ``rtt_tolerance`` times the same
long-term RTT average), or one with a call that ran out of its deadline,
multiplies the limit by ``backoff_ratio``; otherwise, when at least half the
limit was in use, the limit grows by one.

**Samples.** Answered calls (results and IDL exceptions) are samples; a call
cancelled by the server's deadline is a *dropped* sample with the time it ran.
Other errors (fast failures would drag the RTT down) and calls the client gave
up on are not samples. Calls are admitted while ``in_flight < limit``, so at
admission ``in_flight`` never exceeds the limit of that moment; the limit can
fall below the calls already running, which then finish normally.

**Metrics.** ``meshkit_rpc_server_concurrency_limit{service}`` (read at scrape
time) and ``meshkit_rpc_server_concurrency_shed_total{service}``, created once per
``CollectorRegistry``. ``service`` is the ``service`` argument or the name of the
server the first call reaches.

**Cost.** Two clock reads and a few additions per call; the limit arithmetic runs
once per window. Not thread-safe: use one object from one event loop.
"""

from __future__ import annotations

import asyncio
import math
import time
import weakref
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from .._metrics import PerRegistry
from ..errors import DeadlineExceeded, InvalidArgument, ResourceExhausted
from .context import CallContext
from .pipeline import Next

__all__ = ["AdaptiveLimit", "AdaptiveLimitMetrics", "ExpAvg"]

GRADIENT = "gradient"
AIMD = "aimd"


class AdaptiveLimitMetrics(PerRegistry):
    """The adaptive-limit metric family in one registry (created once, keyed weakly)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.limit = Gauge(
            "meshkit_rpc_server_concurrency_limit",
            "Current adaptive concurrency limit by service (calls admitted at once)",
            ["service"],
            registry=registry,
        )
        self.shed = Counter(
            "meshkit_rpc_server_concurrency_shed",
            "Calls refused with RESOURCE_EXHAUSTED by the concurrency limit, by service",
            ["service"],
            registry=registry,
        )


class ExpAvg:
    """Netflix's ``ExpAvgMeasurement``: a plain mean over the first ``warmup``
    samples, then an exponential average with factor ``2 / (window + 1)`` per
    sample of ``weight`` 1 (a sample of weight ``w`` counts as ``w`` samples)."""

    __slots__ = ("count", "factor", "sum", "value", "warmup")

    def __init__(self, window: float, warmup: int) -> None:
        self.factor = 2.0 / (window + 1)
        self.warmup = warmup
        self.count = 0
        self.sum = 0.0
        self.value = 0.0

    def add(self, sample: float, weight: float = 1.0) -> float:
        """Fold in ``sample``; return the new average."""
        if self.count < self.warmup:
            self.count += 1
            self.sum += sample
            self.value = self.sum / self.count
        else:
            factor = self.factor if weight == 1.0 else 1.0 - (1.0 - self.factor) ** weight
            self.value += factor * (sample - self.value)
        return self.value


class AdaptiveLimit:
    """Server middleware: admit calls up to a limit that adapts to latency.

    ``initial``, ``min_limit`` and ``max_limit`` bound the limit; ``algorithm`` is
    ``"gradient"`` (Gradient2, default) or ``"aimd"``. Sample windows:
    ``min_window``/``max_window`` (seconds) and ``window_samples``. Gradient2 knobs:
    ``smoothing`` (0.2), ``rtt_tolerance`` (1.5), ``long_window`` (600 s, the
    span of the long-term RTT average, after a plain mean over ``warmup`` = 10
    windows), ``queue_size`` (a function of the
    limit; default ``sqrt``). AIMD knobs: ``backoff_ratio`` (0.9),
    ``latency_threshold`` (seconds; default ``rtt_tolerance`` times the long-term
    RTT). ``service`` names the metric series (default: the server's name, seen on
    the first call). ``clock`` (seconds) is injectable for tests. See the module
    docstring.
    """

    name = "concurrency"

    def __init__(
        self,
        initial: int = 64,
        min_limit: int = 4,
        max_limit: int = 1024,
        algorithm: str = GRADIENT,
        *,
        min_window: float = 0.1,
        max_window: float = 1.0,
        window_samples: int = 10,
        smoothing: float = 0.2,
        rtt_tolerance: float = 1.5,
        long_window: float = 600.0,
        warmup: int = 10,
        queue_size: Callable[[float], float] | None = None,
        backoff_ratio: float = 0.9,
        latency_threshold: float | None = None,
        service: str | None = None,
        metrics_registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if algorithm not in (GRADIENT, AIMD):
            raise InvalidArgument(f"expected algorithm 'gradient' or 'aimd', found {algorithm!r}")
        if not 1 <= min_limit <= initial <= max_limit:
            raise InvalidArgument(
                "expected 1 <= min_limit <= initial <= max_limit, found "
                f"min_limit={min_limit!r}, initial={initial!r}, max_limit={max_limit!r}"
            )
        if not 0 < min_window <= max_window:
            raise InvalidArgument(
                f"expected 0 < min_window <= max_window seconds, "
                f"found {min_window!r} and {max_window!r}"
            )
        if window_samples < 1:
            raise InvalidArgument(f"expected window_samples >= 1, found {window_samples!r}")
        if not 0.0 < smoothing <= 1.0:
            raise InvalidArgument(f"expected 0 < smoothing <= 1, found {smoothing!r}")
        if not rtt_tolerance >= 1.0:
            raise InvalidArgument(f"expected rtt_tolerance >= 1, found {rtt_tolerance!r}")
        if not long_window >= 1 or warmup < 0:
            raise InvalidArgument(
                f"expected long_window >= 1 and warmup >= 0, found {long_window!r}, {warmup!r}"
            )
        if not 0.0 < backoff_ratio < 1.0:
            raise InvalidArgument(f"expected 0 < backoff_ratio < 1, found {backoff_ratio!r}")
        if latency_threshold is not None and not latency_threshold > 0:
            raise InvalidArgument(
                f"expected a latency_threshold > 0 seconds, found {latency_threshold!r}"
            )
        self.algorithm = algorithm
        self.min_limit = min_limit
        self.max_limit = max_limit
        self.min_window = float(min_window)
        self.max_window = float(max_window)
        self.window_samples = window_samples
        self.smoothing = float(smoothing)
        self.rtt_tolerance = float(rtt_tolerance)
        self.queue_size: Callable[[float], float] = queue_size or math.sqrt
        self.backoff_ratio = float(backoff_ratio)
        self.latency_threshold = latency_threshold
        self.long_rtt = ExpAvg(long_window, warmup)
        self.estimate = float(initial)
        self.in_flight = 0
        self.shed = 0
        self.updates = 0  # windows that updated the limit
        self._admit = int(initial)
        self._clock = clock
        # the current sample window
        self._window_start = clock()
        self._window_end = self._window_start + self.min_window
        self._count = 0
        self._sum = 0.0
        self._min = math.inf
        self._peak = 0
        self._dropped = False
        self._metrics = AdaptiveLimitMetrics.get(metrics_registry)
        self._shed_counter: Any = None
        self.service: str | None = None
        if service is not None:
            self._bind(service)

    @property
    def limit(self) -> int:
        """Calls admitted at once right now."""
        return self._admit

    async def __call__(self, ctx: CallContext, call_next: Next) -> Any:
        if self._shed_counter is None:
            self._bind(ctx.service)
        in_flight = self.in_flight
        if in_flight >= self._admit:
            raise self._refuse(ctx)
        in_flight += 1
        self.in_flight = in_flight
        clock = self._clock
        start = clock()
        try:
            result = await call_next(ctx)
        except asyncio.CancelledError:
            self.in_flight -= 1
            # The server's deadline cancels the handler: a dropped sample. A client
            # that went away says nothing about our latency.
            deadline = ctx.deadline
            if deadline is not None and time.monotonic() >= deadline:
                now = clock()
                self.sample(now - start, in_flight, True, now)
            raise
        except DeadlineExceeded:
            self.in_flight -= 1
            now = clock()
            self.sample(now - start, in_flight, True, now)
            raise
        except BaseException:
            self.in_flight -= 1
            raise
        self.in_flight -= 1
        now = clock()
        # sample() inlined: this is the per-call cost
        rtt = now - start
        self._count += 1
        self._sum += rtt
        if rtt < self._min:
            self._min = rtt
        if in_flight > self._peak:
            self._peak = in_flight
        if now >= self._window_end:
            self._close_window(now)
        return result

    def sample(
        self, rtt: float, in_flight: int, dropped: bool = False, now: float | None = None
    ) -> None:
        """Add one call (``rtt`` seconds, ``in_flight`` at admission) to the sample window.

        ``now`` (on ``clock``) defaults to the clock's time; the window closes, and
        may update the limit, once ``now`` passes its end.
        """
        if now is None:
            now = self._clock()
        self._count += 1
        self._sum += rtt
        if rtt < self._min:
            self._min = rtt
        if in_flight > self._peak:
            self._peak = in_flight
        if dropped:
            self._dropped = True
        if now >= self._window_end:
            self._close_window(now)

    def _close_window(self, now: float) -> None:
        count = self._count
        if count >= self.window_samples:
            span = now - self._window_start
            self.update(self._sum / count, self._peak, self._dropped, span=span)
        self._window_start = now
        self._window_end = now + min(max(2.0 * self._min, self.min_window), self.max_window)
        self._count = 0
        self._sum = 0.0
        self._min = math.inf
        self._peak = 0
        self._dropped = False

    def update(
        self, rtt: float, in_flight: int, dropped: bool = False, *, span: float = 1.0
    ) -> int:
        """One step of the limit algorithm (Gradient2's or AIMD's ``_update``).

        ``rtt``: the window's mean latency (seconds); ``in_flight``: the most calls
        in flight in it; ``dropped``: whether a call in it ran out of its deadline;
        ``span``: how long the window lasted (seconds), its weight in the
        long-term average. Returns the new limit.
        """
        if rtt <= 0.0:
            rtt = 1e-9
        self.updates += 1
        estimate = self.estimate
        long_rtt = self.long_rtt
        long = long_rtt.add(rtt, span)
        if self.algorithm == GRADIENT:
            if long / rtt > 2.0:
                long_rtt.value = long * 0.95
            if in_flight < estimate / 2:
                return self._admit  # app-limited: this sample says nothing of capacity
            gradient = max(0.5, min(1.0, self.rtt_tolerance * long / rtt))
            target = estimate * gradient + self.queue_size(estimate)
            estimate = estimate * (1.0 - self.smoothing) + target * self.smoothing
        else:
            threshold = self.latency_threshold
            if threshold is None:
                threshold = self.rtt_tolerance * long
            if dropped or rtt > threshold:
                estimate *= self.backoff_ratio
            elif in_flight * 2 >= estimate:
                estimate += 1.0
        if estimate < self.min_limit:
            estimate = float(self.min_limit)
        elif estimate > self.max_limit:
            estimate = float(self.max_limit)
        self.estimate = estimate
        self._admit = int(estimate)
        return self._admit

    def _refuse(self, ctx: CallContext) -> ResourceExhausted:
        self.shed += 1
        self._shed_counter.inc()
        return ResourceExhausted(
            f"{ctx.service} is at its adaptive concurrency limit of {self._admit} calls "
            f"({self.in_flight} in flight); {ctx.method} shed, retry later or elsewhere"
        )

    def _bind(self, service: str) -> None:
        """Name the metric series after ``service`` (done once)."""
        self.service = service
        ref = weakref.ref(self)

        def current() -> float:
            limiter = ref()
            return float(limiter._admit) if limiter is not None else 0.0

        self._metrics.limit.labels(service).set_function(current)
        self._shed_counter = self._metrics.shed.labels(service)

    def __repr__(self) -> str:
        return (
            f"AdaptiveLimit({self.algorithm}, limit={self._admit}, in_flight={self.in_flight}, "
            f"long_rtt={self.long_rtt.value * 1000:.2f} ms, shed={self.shed})"
        )
