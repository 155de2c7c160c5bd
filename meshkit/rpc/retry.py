"""The retry stage, its policy and the retry budget.

By default only calls that provably never reached a server (the connection could
not be opened or was closing before the request left) are retried: that is safe
for every method. Methods marked idempotent may also be retried on UNAVAILABLE
(other codes opt in through ``RetryPolicy.retry_on``). A method that is not
idempotent is never retried once its request may have been sent. Each retry goes
to another endpoint when one exists (the pick stage avoids ``ctx.tried``).
Backoff is exponential with full jitter and never outlives the call's deadline.

Retries are budgeted (:class:`RetryBudget`, after Finagle's ``RetryBudget``): a
client may retry at most ``ratio`` times the calls it made in the last ``ttl``
seconds, plus a small floor for clients that make few calls. When every instance
fails at once, retries then add at most ``ratio`` extra load instead of
multiplying it by ``max_attempts`` (the retry storm that turns a brown-out into an
outage). Hedged requests (:mod:`meshkit.rpc.hedge`) draw from the same budget.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from .._metrics import PerRegistry
from ..errors import InvalidArgument, MeshkitError, StatusCode
from .connection import ConnectionUnavailable
from .context import CallContext
from .pipeline import LoopStage

# Budget arithmetic is done in integer micro-tokens, so deposits and withdrawals
# that expire from the window cancel out exactly (no float drift over days).
_SCALE = 1_000_000


class RetryBudget:
    """How many retries a client may make: ``ratio`` * recent calls, plus a floor.

    Every call deposits ``ratio`` of a token; every retry (or hedged request)
    withdraws one whole token. Deposits and withdrawals count for ``ttl`` seconds
    and then expire. On top of the deposits there is a fixed reserve of
    ``min_per_second * ttl`` tokens, so a client that makes few calls can still
    retry a few. Whenever a retry is granted, therefore, over the last ``ttl`` seconds
    (windows as coarse as one slice)::

        retries <= ratio * calls + min_per_second * ttl

    (Finagle's semantics; its defaults are ``ratio=0.2, min_per_second=10, ttl=10``.)

    The window is a ring of ``buckets`` time slices with a running total: each
    operation costs O(1) (amortised; at most ``buckets`` slices are cleared when
    the clock has jumped). Expiry is as fine as one slice (``ttl / buckets``).
    ``clock`` is injectable for tests. Not thread-safe: use it from one event loop.

    ``exhausted`` counts withdrawals refused; ``withdrawn`` counts those granted.
    """

    __slots__ = (
        "_bucket_end",
        "_buckets",
        "_clock",
        "_deposit",
        "_index",
        "_reserve",
        "_sum",
        "_width",
        "_withdrawal",
        "exhausted",
        "min_per_second",
        "ratio",
        "ttl",
        "withdrawn",
    )

    def __init__(
        self,
        ratio: float = 0.1,
        min_per_second: float = 10.0,
        ttl: float = 10.0,
        *,
        buckets: int = 10,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0.0 <= ratio <= 1000.0:
            raise InvalidArgument(f"expected a retry ratio between 0 and 1000, found {ratio}")
        if min_per_second < 0:
            raise InvalidArgument(f"expected min_per_second >= 0, found {min_per_second}")
        if ttl <= 0:
            raise InvalidArgument(f"expected a budget ttl > 0 seconds, found {ttl}")
        if buckets < 1:
            raise InvalidArgument(f"expected at least 1 budget bucket, found {buckets}")
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.ttl = ttl
        self._deposit = round(ratio * _SCALE)
        self._withdrawal = _SCALE
        self._reserve = round(min_per_second * ttl * _SCALE)
        self._buckets = [0] * buckets
        self._width = ttl / buckets
        self._index = 0
        self._sum = 0
        self._clock = clock
        self._bucket_end = clock() + self._width
        self.exhausted = 0
        self.withdrawn = 0

    def _advance(self, now: float) -> None:
        """Expire the slices that ended before ``now`` and make a fresh one current."""
        steps = int((now - self._bucket_end) / self._width) + 1
        buckets = self._buckets
        n = len(buckets)
        if steps >= n:
            for i in range(n):
                buckets[i] = 0
            self._sum = 0
            self._index = (self._index + steps) % n
        else:
            index = self._index
            for _ in range(steps):
                index = (index + 1) % n
                self._sum -= buckets[index]
                buckets[index] = 0
            self._index = index
        self._bucket_end += steps * self._width

    def deposit(self) -> None:
        """Credit one call (``ratio`` of a retry)."""
        now = self._clock()
        if now >= self._bucket_end:
            self._advance(now)
        amount = self._deposit
        self._buckets[self._index] += amount
        self._sum += amount

    def try_withdraw(self) -> bool:
        """Take one retry if the budget has one; count a refusal in ``exhausted``."""
        now = self._clock()
        if now >= self._bucket_end:
            self._advance(now)
        amount = self._withdrawal
        if self._reserve + self._sum < amount:
            self.exhausted += 1
            return False
        self._buckets[self._index] -= amount
        self._sum -= amount
        self.withdrawn += 1
        return True

    @property
    def balance(self) -> int:
        """Whole retries available right now."""
        now = self._clock()
        if now >= self._bucket_end:
            self._advance(now)
        return max(0, (self._reserve + self._sum) // self._withdrawal)

    def __repr__(self) -> str:
        return (
            f"RetryBudget(ratio={self.ratio}, min_per_second={self.min_per_second}, "
            f"ttl={self.ttl}, balance={self.balance}, exhausted={self.exhausted})"
        )


class RetryMetrics(PerRegistry):
    """``meshkit_rpc_client_retries_total{service,method,outcome}`` in one registry.

    ``outcome`` is ``retried`` (a retry was sent) or ``budget_exhausted`` (the
    policy allowed a retry but the budget had none; the error went to the caller).
    Created once per registry (keyed weakly, like :class:`~meshkit.rpc.metrics.RpcMetrics`).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.retries = Counter(
            "meshkit_rpc_client_retries",
            "RPC client retries by called service, method and outcome (retried, budget_exhausted)",
            ["service", "method", "outcome"],
            registry=registry,
        )


@dataclass(slots=True)
class RetryPolicy:
    """When to try a call again.

    ``max_attempts`` counts the first try. ``retry_on`` lists status codes that
    are retried for idempotent methods (``idempotent_methods`` or
    ``ctx.idempotent``); connection failures before the request left are retried
    for every method. ``budget`` caps retries (and hedged requests) at a fraction
    of the calls made; ``None`` means unbudgeted. Each policy gets its own budget,
    so clients that share a policy object share its budget.
    """

    max_attempts: int = 3
    retry_on: frozenset[StatusCode] = frozenset({StatusCode.UNAVAILABLE})
    idempotent_methods: frozenset[str] = field(default_factory=frozenset)
    backoff_base: float = 0.005
    backoff_max: float = 0.2
    budget: RetryBudget | None = field(default_factory=RetryBudget)

    @classmethod
    def disabled(cls) -> RetryPolicy:
        """A policy that never retries."""
        return cls(max_attempts=1, budget=None)

    def with_idempotent(self, methods: Iterable[str]) -> RetryPolicy:
        """A copy that also treats ``methods`` as idempotent (the budget is shared)."""
        return dataclasses.replace(
            self, idempotent_methods=self.idempotent_methods | frozenset(methods)
        )

    def is_idempotent(self, ctx: CallContext) -> bool:
        """Whether this call may safely run twice."""
        return ctx.idempotent or ctx.method in self.idempotent_methods

    def should_retry(self, ctx: CallContext, error: MeshkitError, attempt: int) -> bool:
        """Whether ``error`` on attempt ``attempt`` (0-based) may be retried (budget aside)."""
        if attempt + 1 >= self.max_attempts:
            return False
        if isinstance(error, ConnectionUnavailable) and not error.sent:
            return True
        return error.code in self.retry_on and self.is_idempotent(ctx)

    def backoff(self, attempt: int) -> float:
        """Full-jitter exponential backoff before retry number ``attempt + 1``."""
        return random.uniform(0, min(self.backoff_max, self.backoff_base * (2**attempt)))


class Retry(LoopStage):
    """Run the rest of the chain again when the policy and the budget allow it.

    Every call deposits into the policy's budget once (retries do not); every
    retry withdraws. When the budget is empty the error goes to the caller and
    ``budget_exhausted`` is counted (and ``ctx.extras["retry_budget_exhausted"]``
    is set). ``metrics_registry`` receives ``meshkit_rpc_client_retries_total``.

    A :class:`~meshkit.rpc.pipeline.LoopStage`: the pipeline runs the stages after
    it again (after the backoff) each time :meth:`again` returns a delay.
    """

    name = "retry"

    def __init__(
        self, policy: RetryPolicy, *, metrics_registry: CollectorRegistry | None = None
    ) -> None:
        self.policy = policy
        self.metrics = RetryMetrics.get(metrics_registry)
        self._counters: dict[tuple[str, str, str], Any] = {}

    def _count(self, ctx: CallContext, outcome: str) -> None:
        key = (ctx.service, ctx.method, outcome)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = self.metrics.retries.labels(*key)
        counter.inc()

    def enter(self, ctx: CallContext) -> RetryPolicy:
        budget = self.policy.budget
        if type(budget) is not RetryBudget:
            if budget is not None:
                budget.deposit()
        else:  # budget.deposit(), inlined (this runs on every call; same module)
            now = budget._clock()
            if now >= budget._bucket_end:
                budget._advance(now)
            budget._buckets[budget._index] += budget._deposit
            budget._sum += budget._deposit
        return self.policy

    def again(self, ctx: CallContext, token: RetryPolicy, error: Exception) -> float | None:
        """The backoff before the next attempt, or ``None`` to give ``error`` to the caller."""
        if not isinstance(error, MeshkitError):
            return None
        policy = self.policy
        attempt = ctx.attempt
        if not policy.should_retry(ctx, error, attempt):
            return None
        delay = policy.backoff(attempt)
        now = time.monotonic()
        deadline = ctx.deadline
        if deadline is not None and now + delay >= deadline:
            return None
        budget = policy.budget
        if budget is not None and not budget.try_withdraw():
            ctx.extras["retry_budget_exhausted"] = True
            self._count(ctx, "budget_exhausted")
            return None
        self._count(ctx, "retried")
        if ctx.endpoint is not None:
            ctx.tried.append(ctx.endpoint)
        ctx.attempt = attempt + 1
        return delay
