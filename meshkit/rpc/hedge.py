"""Hedged (backup) requests: cut tail latency by asking a second instance.

"The Tail at Scale" (Dean & Barroso): when a call has not answered after the
latency that most calls of its method beat (the ``quantile``, p95 by default),
send the same request to another instance and take whichever answers first.
The extra load is about ``1 - quantile`` of the calls, and it is capped by the
:class:`~meshkit.rpc.retry.RetryBudget` that retries use too (as in Finagle's
``BackupRequestFilter`` and gRPC's hedging policy with retry throttling).

Only idempotent methods may be hedged: the request may run on two servers.
:class:`Hedge` refuses, at construction, a policy naming any other method.

Rules of one hedged call:

* attempt 0 is the call itself, run in the caller's task (a call answered before
  the delay costs one timer); each later attempt (at most ``max_extra``) starts as
  a task when no attempt has answered ``delay`` seconds after the previous one started,
  on a copy of the context (own headers and response headers, shared deadline,
  ``tried`` holding the endpoints already used, so the pick stage goes elsewhere;
  ``attempt`` counted on; ``extras["hedge"] = True``);
* the first *answer* wins (a result, or an exception declared in the IDL); the
  other attempts are cancelled, which makes the transport forget their pending
  replies (``ClientConnection.forget``). The servers are not told: their handlers
  run to the end (or to the deadline) and the late replies are dropped;
* a failure (a :class:`~meshkit.errors.MeshkitError`) while another attempt is
  still running waits for that attempt; when every attempt failed, the error of
  the earliest attempt is raised and the endpoints of the others are added to
  ``ctx.tried`` (a retry stage in front then avoids all of them). Attempt 0
  failing *before* any hedge was sent raises at once: fast failures are the
  retry stage's business, hedging is about slowness. Once attempt 0 has failed
  no further hedge is started;
* no hedge is sent when the budget is empty or the deadline has passed.

``ctx.extras["hedged"]`` says whether a hedge was sent and, if so,
``ctx.extras["hedge_winner"]`` which attempt answered (0 = the original).

``delay`` is the ``quantile`` of the method's recent attempt latencies (a ring of
the last ``window`` samples, re-sorted every ``window // 20`` samples), clamped
to ``[min_delay, max_delay]``; until ``min_samples`` latencies are known it is
``max_delay``. Answers and deadline expiries are sampled; fast failures are not
(they would drag the quantile down), and an attempt cancelled after at least
``delay`` is sampled with the time it had run (a lower bound, and above the
current delay: it keeps its rank, which is all a quantile needs).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from .._metrics import PerRegistry
from ..errors import Cancelled, DeadlineExceeded, InvalidArgument, MeshkitError
from .context import CallContext
from .pipeline import Next
from .retry import RetryBudget


@dataclass(slots=True)
class HedgePolicy:
    """Which methods to hedge and when.

    ``methods``: the methods to hedge (``None`` or empty: none). ``quantile``: send
    a hedge when an attempt is slower than this quantile of recent attempts.
    ``min_delay``/``max_delay`` (seconds) clamp that delay. ``max_extra``: hedges
    per call at most. ``min_samples``: latencies needed before the quantile is
    used (``max_delay`` until then). ``window``: latencies remembered per method.
    """

    methods: Iterable[str] | None = None
    quantile: float = 0.95
    min_delay: float = 0.005
    max_delay: float = 1.0
    max_extra: int = 1
    min_samples: int = 20
    window: int = 1000

    def __post_init__(self) -> None:
        self.methods = frozenset(self.methods or ())
        if not 0.0 < self.quantile < 1.0:
            raise InvalidArgument(f"expected a hedge quantile in (0, 1), found {self.quantile}")
        if not 0.0 <= self.min_delay <= self.max_delay:
            raise InvalidArgument(
                "expected 0 <= min_delay <= max_delay for hedging, found "
                f"min_delay={self.min_delay}, max_delay={self.max_delay}"
            )
        if self.max_extra < 0:
            raise InvalidArgument(f"expected max_extra >= 0 hedges, found {self.max_extra}")
        if self.min_samples < 1 or self.window < self.min_samples:
            raise InvalidArgument(
                "expected 1 <= min_samples <= window for hedging, found "
                f"min_samples={self.min_samples}, window={self.window}"
            )

    @property
    def hedged_methods(self) -> frozenset[str]:
        """``methods`` as a frozenset."""
        methods = self.methods
        return methods if isinstance(methods, frozenset) else frozenset(methods or ())


class LatencyWindow:
    """The last ``size`` latencies of one method, with their quantile on demand.

    ``add`` is O(1); ``quantile`` sorts the window (callers refresh it every
    so many samples, not per call).
    """

    __slots__ = ("_next", "count", "samples", "since_refresh", "size")

    def __init__(self, size: int = 1000) -> None:
        if size < 1:
            raise InvalidArgument(f"expected a latency window of at least 1, found {size}")
        self.size = size
        self.samples = [0.0] * size
        self._next = 0
        self.count = 0
        self.since_refresh = 0

    def add(self, latency: float) -> None:
        """Remember one latency (seconds), forgetting the oldest when full."""
        self.samples[self._next] = latency
        self._next = (self._next + 1) % self.size
        if self.count < self.size:
            self.count += 1
        self.since_refresh += 1

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile (nearest rank) of the remembered latencies, or ``None``."""
        n = self.count
        if n == 0:
            return None
        data = sorted(self.samples if n == self.size else self.samples[:n])
        return data[min(n - 1, max(0, math.ceil(q * n) - 1))]


class HedgeMetrics(PerRegistry):
    """``meshkit_rpc_client_hedges_total{service,method,outcome}`` in one registry.

    ``outcome``: ``sent`` (a hedge left), ``won`` (a hedge gave the answer),
    ``budget_exhausted`` (a hedge was due but the retry budget had none).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.hedges = Counter(
            "meshkit_rpc_client_hedges",
            "RPC client hedged (backup) requests by called service, method and outcome "
            "(sent, won, budget_exhausted)",
            ["service", "method", "outcome"],
            registry=registry,
        )


class Hedge:
    """Send backup requests for slow calls of idempotent methods (see the module doc).

    Place it where the retry stage hands over to the pick stage
    (``… → retry → hedge → pick → …``): each retry may then be hedged, and the
    hedge's pick avoids the endpoints already tried.

    ``idempotent_methods`` must contain every hedged method (``InvalidArgument``
    otherwise). ``budget`` is the retry budget hedges draw from, normally the
    client's ``RetryPolicy.budget``; ``None`` gives the stage a budget of its own.
    ``deposit`` says whether this stage credits the budget once per hedged call:
    by default only when the budget is its own (with a shared budget the retry
    stage already deposits once per call).
    """

    name = "hedge"

    def __init__(
        self,
        policy: HedgePolicy,
        *,
        idempotent_methods: Iterable[str],
        budget: RetryBudget | None = None,
        deposit: bool | None = None,
        metrics_registry: CollectorRegistry | None = None,
    ) -> None:
        methods = policy.hedged_methods
        idempotent = frozenset(idempotent_methods)
        unsafe = sorted(methods - idempotent)
        if unsafe:
            raise InvalidArgument(
                f"hedging sends a call to two instances, so only idempotent methods may be "
                f"hedged; expected {unsafe} among the idempotent methods "
                f"({', '.join(sorted(idempotent)) or 'none declared'})"
            )
        self.policy = policy
        self.methods = methods
        self.budget = budget if budget is not None else RetryBudget()
        self.deposits = (budget is None) if deposit is None else deposit
        self.metrics = HedgeMetrics.get(metrics_registry)
        self._windows = {m: LatencyWindow(policy.window) for m in methods}
        self._delays = dict.fromkeys(methods, policy.max_delay)
        self._refresh_every = max(1, policy.window // 20)
        self._counters: dict[tuple[str, str, str], Any] = {}

    def delay(self, method: str) -> float:
        """How long attempts of ``method`` run before the next hedge is sent (seconds)."""
        return self._delays.get(method, self.policy.max_delay)

    def observe(self, method: str, latency: float) -> None:
        """Record the latency of one attempt of ``method`` (a hedged method)."""
        window = self._windows.get(method)
        if window is None:
            return
        window.add(latency)
        if window.count >= self.policy.min_samples and (
            window.since_refresh >= self._refresh_every or window.count == self.policy.min_samples
        ):
            window.since_refresh = 0
            policy = self.policy
            value = window.quantile(policy.quantile)
            if value is not None:
                self._delays[method] = min(policy.max_delay, max(policy.min_delay, value))

    def _count(self, ctx: CallContext, outcome: str) -> None:
        key = (ctx.service, ctx.method, outcome)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = self.metrics.hedges.labels(*key)
        counter.inc()

    async def __call__(self, ctx: CallContext, call_next: Next) -> Any:
        if ctx.method not in self.methods or ctx.oneway:
            return await call_next(ctx)
        if self.deposits:
            self.budget.deposit()
        return await self._hedged(ctx, call_next)

    @staticmethod
    def _copy(ctx: CallContext, ctxs: list[CallContext]) -> CallContext:
        tried = list(ctx.tried)
        for other in ctxs:
            if other.endpoint is not None and other.endpoint not in tried:
                tried.append(other.endpoint)
        headers = dict(ctx.headers)  # its own: the transport writes the budget left into it
        extras = {k: v for k, v in ctx.extras.items() if k != "hedged" and k != "hedge_lost"}
        extras["hedge"] = True
        return dataclasses.replace(
            ctx,
            headers=headers,
            response_headers={},
            attempt=ctx.attempt + len(ctxs),
            endpoint=None,
            peer="",
            tried=tried,
            extras=extras,
        )

    async def _hedged(self, ctx: CallContext, call_next: Next) -> Any:
        # Attempt 0 runs inline in the caller's task: a call answered before the
        # delay costs one timer, no task. A hedge that answers first cancels the
        # inline attempt (the transport then forgets its reply) and hands over.
        # One running-loop look-up per call: CPython 3.11 makes it a getpid() system
        # call, and current_task() without the loop would make a second one.
        loop = asyncio.get_running_loop()
        run = _Run(ctx, call_next, self._delays[ctx.method], asyncio.current_task(loop))
        if self.policy.max_extra > 0:
            run.timer = loop.call_later(run.delay, self._fire, run)
        try:
            try:
                result = await call_next(ctx)
            except asyncio.CancelledError:
                task = run.task
                if not run.interrupted or task is None:
                    raise  # the caller cancelled the call
                run.interrupted = False
                if task.uncancel() > 0:
                    raise  # ... and so did the caller
                return self._conclude(run)
            except MeshkitError as exc:
                if isinstance(exc, DeadlineExceeded):
                    self.observe(ctx.method, time.perf_counter() - run.starts[0])
                run.failures[0] = exc
                return await self._wait_for_hedges(run)
            except Exception:
                # An exception declared in the IDL: an answer, not a failure.
                self._attempt0_answered(run)
                raise
            self._attempt0_answered(run)
            return result
        finally:
            run.phase = _DONE
            ctx.extras.pop("hedge_lost", None)  # the inline attempt's: not the call's
            if run.interrupted and run.task is not None:
                # Something below swallowed our cancellation: do not leave it counted.
                run.task.uncancel()
            if run.timer is not None:
                run.timer.cancel()
            # another attempt answered: the ones still running lost the race (tracing
            # records them as such, not as errors)
            lost = ctx.extras.get("hedge_winner") is not None
            for index, hedge in enumerate(run.tasks, 1):
                if not hedge.done():
                    if lost:
                        run.ctxs[index].extras["hedge_lost"] = True
                    hedge.cancel()

    def _attempt0_answered(self, run: _Run) -> None:
        now = time.perf_counter()
        self.observe(run.ctx.method, now - run.starts[0])
        self._observe_losers(run, now, 0)
        self._finish(run, 0)

    def _fire(self, run: _Run) -> None:
        """Timer: no answer after ``delay``: send the next hedge if deadline and budget allow."""
        run.timer = None
        if run.phase != _INLINE:
            return
        ctx = run.ctx
        now = time.monotonic()
        if ctx.deadline is not None and now >= ctx.deadline:
            return
        if not self.budget.try_withdraw():
            self._count(ctx, "budget_exhausted")
            return
        index = len(run.ctxs)
        copy = self._copy(ctx, run.ctxs)
        run.ctxs.append(copy)
        run.starts.append(time.perf_counter())
        hedge = asyncio.ensure_future(run.call_next(copy))
        run.tasks.append(hedge)
        hedge.add_done_callback(functools.partial(self._hedge_done, run, index))
        self._count(ctx, "sent")
        if index < self.policy.max_extra:
            run.timer = asyncio.get_running_loop().call_later(run.delay, self._fire, run)

    def _hedge_done(self, run: _Run, index: int, hedge: asyncio.Future[Any]) -> None:
        """A hedge finished: note its outcome; if it is the first answer, take it."""
        exc: BaseException | None
        if hedge.cancelled():
            exc = Cancelled(f"hedge {index} of {run.ctx.service}.{run.ctx.method} was cancelled")
        else:
            exc = hedge.exception()  # also marks it retrieved
        if run.phase == _DONE:
            return
        run.settled += 1
        elapsed = time.perf_counter() - run.starts[index]
        if exc is None or not isinstance(exc, MeshkitError):
            self.observe(run.ctx.method, elapsed)
            if run.winner is None:
                run.winner = index
                if run.phase == _INLINE and run.task is not None:
                    run.interrupted = True
                    run.ctx.extras["hedge_lost"] = True  # (for its attempt span; popped)
                    run.task.cancel()
        else:
            run.failures[index] = exc
            if isinstance(exc, DeadlineExceeded):
                self.observe(run.ctx.method, elapsed)
        waiter = run.waiter
        if (
            waiter is not None
            and not waiter.done()
            and (run.winner is not None or run.settled == len(run.tasks))
        ):
            waiter.set_result(None)

    async def _wait_for_hedges(self, run: _Run) -> Any:
        """Attempt 0 failed: wait for a hedge in flight to answer, or raise its error."""
        run.phase = _WAITING
        if run.timer is not None:
            run.timer.cancel()
            run.timer = None
        if run.winner is None and run.settled < len(run.tasks):
            run.waiter = asyncio.get_running_loop().create_future()
            await run.waiter
        if run.winner is not None:
            return self._conclude(run)
        self._finish(run, None)
        raise run.failures[0]

    def _conclude(self, run: _Run) -> Any:
        """A hedge answered first: make ``ctx`` describe it and return (or raise) its answer."""
        winner = run.winner
        assert winner is not None and winner > 0
        self._observe_losers(run, time.perf_counter(), winner)
        self._finish(run, winner)
        return run.tasks[winner - 1].result()

    def _observe_losers(self, run: _Run, now: float, winner: int) -> None:
        # Attempts cut off after running at least the delay: their time so far is a
        # lower bound above the delay, which keeps their rank in the quantile.
        for i, start in enumerate(run.starts):
            if i != winner and i not in run.failures and now - start >= run.delay:
                if i > 0 and run.tasks[i - 1].done():
                    continue
                self.observe(run.ctx.method, now - start)

    def _finish(self, run: _Run, winner: int | None) -> None:
        """Record the outcome in ``ctx``; make it describe the winning attempt."""
        ctx, ctxs = run.ctx, run.ctxs
        hedged = len(ctxs) > 1
        ctx.extras["hedged"] = hedged
        if not hedged:
            return
        if winner is None:
            # Every attempt failed: the retry stage should avoid all their endpoints
            # (it adds ctx.endpoint, attempt 0's, itself).
            for other in ctxs[1:]:
                if other.endpoint is not None and other.endpoint not in ctx.tried:
                    ctx.tried.append(other.endpoint)
            return
        ctx.extras["hedge_winner"] = winner
        if winner == 0:
            return
        self._count(ctx, "won")
        won = ctxs[winner]
        ctx.endpoint = won.endpoint
        ctx.peer = won.peer
        ctx.response_headers = won.response_headers
        for key, value in won.extras.items():
            if key != "hedge":
                ctx.extras[key] = value


_INLINE, _WAITING, _DONE = 0, 1, 2


class _Run:
    """The state of one hedged call. Attempt ``i > 0`` is ``tasks[i - 1]``."""

    __slots__ = (
        "call_next",
        "ctx",
        "ctxs",
        "delay",
        "failures",
        "interrupted",
        "phase",
        "settled",
        "starts",
        "task",
        "tasks",
        "timer",
        "waiter",
        "winner",
    )

    def __init__(
        self, ctx: CallContext, call_next: Next, delay: float, task: asyncio.Task[Any] | None
    ) -> None:
        self.ctx = ctx
        self.call_next = call_next
        self.delay = delay
        self.task = task
        self.ctxs = [ctx]
        self.starts = [time.perf_counter()]
        self.tasks: list[asyncio.Future[Any]] = []
        self.failures: dict[int, BaseException] = {}
        self.winner: int | None = None
        self.settled = 0
        self.phase = _INLINE
        self.interrupted = False
        self.timer: asyncio.TimerHandle | None = None
        self.waiter: asyncio.Future[None] | None = None
