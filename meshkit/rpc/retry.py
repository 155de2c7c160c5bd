"""The retry stage and its policy.

By default only calls that provably never reached a server (the connection could
not be opened or was closing before the request left) are retried: that is safe
for every method. Methods marked idempotent may also be retried on UNAVAILABLE.
Each retry goes to another endpoint when one exists (the pick stage avoids
``ctx.tried``). Backoff is exponential with full jitter and never outlives the
call's deadline.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..errors import MeshkitError, StatusCode
from .connection import ConnectionUnavailable
from .context import CallContext
from .pipeline import Next


@dataclass(slots=True)
class RetryPolicy:
    """When to try a call again.

    ``max_attempts`` counts the first try. ``retry_on`` lists status codes that
    are retried for idempotent methods (``idempotent_methods`` or
    ``ctx.idempotent``).
    """

    max_attempts: int = 3
    retry_on: frozenset[StatusCode] = frozenset({StatusCode.UNAVAILABLE})
    idempotent_methods: frozenset[str] = field(default_factory=frozenset)
    backoff_base: float = 0.005
    backoff_max: float = 0.2

    @classmethod
    def disabled(cls) -> RetryPolicy:
        return cls(max_attempts=1)

    def with_idempotent(self, methods: Iterable[str]) -> RetryPolicy:
        return RetryPolicy(
            self.max_attempts,
            self.retry_on,
            self.idempotent_methods | frozenset(methods),
            self.backoff_base,
            self.backoff_max,
        )

    def should_retry(self, ctx: CallContext, error: MeshkitError, attempt: int) -> bool:
        if attempt + 1 >= self.max_attempts:
            return False
        if isinstance(error, ConnectionUnavailable) and not error.sent:
            return True
        idempotent = ctx.idempotent or ctx.method in self.idempotent_methods
        return idempotent and error.code in self.retry_on

    def backoff(self, attempt: int) -> float:
        return random.uniform(0, min(self.backoff_max, self.backoff_base * (2**attempt)))


class Retry:
    """Run the rest of the chain again when the policy allows it."""

    name = "retry"

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy

    async def __call__(self, ctx: CallContext, call_next: Next) -> Any:
        attempt = 0
        while True:
            try:
                return await call_next(ctx)
            except MeshkitError as exc:
                if not self.policy.should_retry(ctx, exc, attempt):
                    raise
                delay = self.policy.backoff(attempt)
                if ctx.deadline is not None and time.monotonic() + delay >= ctx.deadline:
                    raise
                if ctx.endpoint is not None:
                    ctx.tried.append(ctx.endpoint)
                attempt += 1
                ctx.attempt = attempt
                if delay > 0:
                    await asyncio.sleep(delay)
