"""Waiting helpers for tests: poll for a condition, or guard a blocking call against a
hang, with generous limits (never a measure of speed)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

T = TypeVar("T")


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]],
    what: str,
    limit: float = 10.0,
    interval: float = 0.02,
) -> float:
    """Poll ``condition`` until true; return the seconds it took; fail after ``limit``."""
    start = time.monotonic()
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return time.monotonic() - start
        if time.monotonic() - start > limit:
            pytest.fail(f"timed out after {limit}s waiting for: {what}")
        await asyncio.sleep(interval)


def finishes_within(limit: float, fn: Callable[..., T], *args: Any) -> T:
    """Run blocking ``fn(*args)`` in a thread; fail the test if it has not returned (or
    raised) within ``limit`` seconds — a guard against hangs and runaway loops."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        future = pool.submit(fn, *args)
        try:
            return future.result(timeout=limit)
        except concurrent.futures.TimeoutError:
            pytest.fail(f"{getattr(fn, '__name__', fn)} did not finish within {limit}s")
    finally:
        pool.shutdown(wait=False)
