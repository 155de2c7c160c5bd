"""Server concurrency limit: shed with RESOURCE_EXHAUSTED instead of queueing."""

from __future__ import annotations

from ..errors import InvalidArgument, ResourceExhausted
from .context import CallContext
from .pipeline import HookStage


class ConcurrencyLimit(HookStage):
    """Admit at most ``limit`` calls at once; refuse the rest at once.

    A fixed limit; an adaptive limiter can replace this stage without touching others.
    """

    name = "concurrency"

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise InvalidArgument(f"expected a concurrency limit of at least 1, found {limit}")
        self.limit = limit
        self.in_flight = 0

    def enter(self, ctx: CallContext) -> bool:
        if self.in_flight >= self.limit:
            raise ResourceExhausted(
                f"{ctx.service} is at its concurrency limit of {self.limit} calls; "
                f"{ctx.method} shed, retry later or elsewhere"
            )
        self.in_flight += 1
        return True

    def exit(self, ctx: CallContext, token: bool, error: BaseException | None) -> None:
        self.in_flight -= 1
