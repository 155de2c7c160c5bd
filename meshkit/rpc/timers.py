"""Deadlines of many calls behind one event-loop timer.

A ``loop.call_later`` per call (and its cancel) costs a few µs and fills the loop's
timer heap with cancelled handles. Calls usually finish long before their deadline,
so :class:`DeadlineTimers` keeps deadlines in a dict and arms a single timer for the
earliest one; the timer is moved only when a call arrives with an earlier deadline
than any pending (rare: budgets tend to be alike). When it fires, every expired key
is handed to ``fire`` and the timer is re-armed for the next deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class DeadlineTimers(Generic[K]):
    """Call ``fire(key)`` once for each key still present when its deadline passes.

    Deadlines are absolute on the ``time.monotonic()`` clock. Use from one event loop.
    """

    __slots__ = ("_at", "_deadlines", "_fire", "_handle", "_loop")

    def __init__(self, fire: Callable[[K], None], loop: asyncio.AbstractEventLoop) -> None:
        self._fire = fire
        self._loop = loop
        self._deadlines: dict[K, float] = {}
        self._handle: asyncio.TimerHandle | None = None
        self._at = 0.0

    def __len__(self) -> int:
        return len(self._deadlines)

    def add(self, key: K, deadline: float) -> None:
        self._deadlines[key] = deadline
        if self._handle is None or deadline < self._at:
            self._arm(deadline)

    def discard(self, key: K) -> None:
        self._deadlines.pop(key, None)

    def close(self) -> None:
        self._deadlines.clear()
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self, deadline: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._at = deadline
        self._handle = self._loop.call_later(max(0.0, deadline - time.monotonic()), self._run)

    def _run(self) -> None:
        self._handle = None
        now = time.monotonic()
        expired = [key for key, deadline in self._deadlines.items() if deadline <= now]
        for key in expired:
            if self._deadlines.pop(key, None) is not None:
                self._fire(key)
        if self._deadlines:
            self._arm(min(self._deadlines.values()))
