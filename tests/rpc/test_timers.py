"""DeadlineTimers: many deadlines behind one loop timer."""

from __future__ import annotations

import asyncio
import time

from meshkit.rpc.timers import DeadlineTimers


async def test_fires_each_expired_key_once_in_deadline_order() -> None:
    fired: list[str] = []
    timers: DeadlineTimers[str] = DeadlineTimers(fired.append, asyncio.get_running_loop())
    now = time.monotonic()
    timers.add("late", now + 0.15)
    timers.add("early", now + 0.05)  # earlier than the armed timer: re-armed
    timers.add("gone", now + 0.02)
    timers.discard("gone")
    await asyncio.sleep(0.1)
    assert fired == ["early"]
    await asyncio.sleep(0.1)
    assert fired == ["early", "late"]
    assert len(timers) == 0


async def test_past_deadline_fires_on_next_iteration_and_close_stops_everything() -> None:
    fired: list[int] = []
    timers: DeadlineTimers[int] = DeadlineTimers(fired.append, asyncio.get_running_loop())
    timers.add(1, time.monotonic() - 1)
    await asyncio.sleep(0.01)
    assert fired == [1]
    timers.add(2, time.monotonic() + 0.02)
    timers.close()
    await asyncio.sleep(0.05)
    assert fired == [1]
