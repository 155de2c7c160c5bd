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
import math
import time
from collections.abc import Callable, Hashable
from typing import TypeVar

K = TypeVar("K", bound=Hashable)


class DeadlineTimers(dict[K, float]):
    """Call ``fire(key)`` once for each key still present when its deadline passes.

    The timers are a dict of key → deadline (absolute, on the ``time.monotonic()``
    clock): :meth:`add` a key, and drop it with ``pop(key, None)`` (or :meth:`discard`)
    once its call finished; ``pop`` is the dict's own, a C call, on a path that runs
    for every call. Use from one event loop.
    """

    __slots__ = ("_fire", "_handle", "_loop", "next_fire")

    def __init__(self, fire: Callable[[K], None], loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._fire = fire
        self._loop = loop
        self._handle: asyncio.TimerHandle | None = None
        #: when the armed timer fires (inf: none armed)
        self.next_fire = math.inf

    def add(self, key: K, deadline: float) -> None:
        """Fire ``key`` at ``deadline`` unless it is dropped before.

        Hot paths may write ``timers[key] = deadline`` and then call :meth:`arm` only
        when ``deadline < timers.next_fire``: the same, without a Python call per key.
        """
        self[key] = deadline
        if deadline < self.next_fire:
            self.arm(deadline)

    def discard(self, key: K) -> None:
        self.pop(key, None)

    def close(self) -> None:
        self.clear()
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self.next_fire = math.inf

    def arm(self, deadline: float) -> None:
        """(Re)arm the timer for ``deadline`` (earlier than :attr:`next_fire`)."""
        if self._handle is not None:
            self._handle.cancel()
        self.next_fire = deadline
        self._handle = self._loop.call_later(max(0.0, deadline - time.monotonic()), self._run)

    def _run(self) -> None:
        self._handle = None
        self.next_fire = math.inf
        now = time.monotonic()
        expired = [key for key, deadline in self.items() if deadline <= now]
        for key in expired:
            if self.pop(key, None) is not None:
                self._fire(key)
        if self:
            self.arm(min(self.values()))
