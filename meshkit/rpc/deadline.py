"""Deadlines: per-call budgets that travel as ``meshkit-timeout-ms``.

The budget on the wire is *relative* (milliseconds left), so caller and callee
clocks need not agree. Inside a process the deadline is absolute on
``time.monotonic()`` and lives in a context variable: a server handler's nested
calls inherit what is left of its budget without passing anything by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from contextvars import ContextVar, Token
from typing import Any

from ..errors import DeadlineExceeded
from .context import TIMEOUT_KEY, CallContext
from .pipeline import HookStage
from .timers import DeadlineTimers

_deadline: ContextVar[float | None] = ContextVar("meshkit_deadline", default=None)
_monotonic = time.monotonic


def current_deadline() -> float | None:
    """The absolute deadline (``time.monotonic()`` clock) of the call in progress, if any."""
    return _deadline.get()


def remaining() -> float | None:
    """Seconds left in the current call's budget, or ``None`` when unbounded."""
    deadline = _deadline.get()
    return None if deadline is None else deadline - time.monotonic()


@contextlib.contextmanager
def deadline_scope(deadline: float | None) -> Iterator[None]:
    """Run a block under ``deadline`` (tightening, never loosening, the current one)."""
    current = _deadline.get()
    if current is not None and (deadline is None or current < deadline):
        deadline = current
    token = _deadline.set(deadline)
    try:
        yield
    finally:
        _deadline.reset(token)


class ClientDeadline(HookStage):
    """Client side: fix the call's deadline (``ctx.deadline``).

    The deadline is the earlier of the call's own ``timeout`` and the deadline
    inherited from the surrounding call (if this code runs inside a handler). The
    transport puts what is left of it on the wire when it sends each attempt.
    """

    name = "deadline"

    def __init__(self, default_timeout: float | None) -> None:
        self.default_timeout = default_timeout

    def enter(self, ctx: CallContext) -> None:
        now = _monotonic()
        timeout = ctx.timeout
        if timeout is None:
            timeout = self.default_timeout
        inherited = _deadline.get()
        if timeout is None:
            if inherited is None:
                return  # unbounded: nothing on the wire
            deadline = inherited
        else:
            deadline = now + timeout
            if inherited is not None and inherited < deadline:
                deadline = inherited
        ctx.deadline = deadline
        if deadline <= now:
            raise DeadlineExceeded(
                f"call {ctx.service}.{ctx.method} not sent: its budget was already spent "
                f"({(now - deadline) * 1000:.1f} ms past the deadline)"
            )


# The handler's task, the deadline context variable's token, the budget (seconds).
_ServerToken = tuple[asyncio.Task[Any], Token[float | None], float]


class ServerDeadline(HookStage):
    """Server side: refuse spent budgets, cancel the handler when the budget runs out.

    A call without a budget runs under ``default_timeout`` (``None``: unbounded).
    """

    name = "deadline"

    def __init__(self, default_timeout: float | None = None) -> None:
        self.default_timeout = default_timeout
        # One timer for all calls of this server (see timers.py); created on first use
        # because the event loop is not known before.
        self._timers: DeadlineTimers[asyncio.Task[Any]] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the server's, known on first use
        self._expired: set[asyncio.Task[Any]] = set()

    def enter(self, ctx: CallContext) -> _ServerToken | None:
        sent = ctx.headers.get(TIMEOUT_KEY)
        if sent:
            try:  # a bad value means "no budget sent"
                budget: float | None = int(sent) / 1000.0
            except (ValueError, OverflowError):  # OverflowError: too many digits for a float
                budget = self.default_timeout
        else:
            budget = self.default_timeout
        if budget is None:
            return None
        if budget <= 0:
            raise DeadlineExceeded(
                f"{ctx.service}.{ctx.method} refused: the caller's budget was already spent "
                f"({TIMEOUT_KEY}={sent})"
            )
        deadline = _monotonic() + budget
        ctx.deadline = deadline
        timers = self._timers
        if timers is None:
            self._loop = asyncio.get_running_loop()
            timers = self._timers = DeadlineTimers(self._expire, self._loop)
        # The task running this stage: a middleware before it may have moved the rest
        # of the chain into a task of its own (wait_for, shield). Given the loop,
        # current_task() skips get_running_loop(), which costs a getpid() system call
        # (CPython 3.11-3.13 check the loop belongs to this process): one per call.
        task = asyncio.current_task(self._loop)
        assert task is not None
        timers[task] = deadline  # timers.add(), inlined: this runs on every call
        if deadline < timers.next_fire:
            timers.arm(deadline)
        return task, _deadline.set(deadline), budget

    def exit(
        self,
        ctx: CallContext,
        token: _ServerToken,
        error: BaseException | None,
    ) -> None:
        task, context_token, budget = token
        self._timers.pop(task, None)  # type: ignore[union-attr]  # set by enter
        _deadline.reset(context_token)
        expired = self._expired
        if expired and task in expired:
            expired.discard(task)
            if isinstance(error, asyncio.CancelledError):
                task.uncancel()
                raise DeadlineExceeded(
                    f"{ctx.service}.{ctx.method} cancelled: its budget of "
                    f"{budget * 1000:.0f} ms ran out before the handler finished"
                ) from None

    def _expire(self, task: asyncio.Task[Any]) -> None:
        self._expired.add(task)
        task.cancel()
