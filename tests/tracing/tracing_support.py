"""Helpers shared by the tracing tests."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from meshkit.tracing.collector import Collector


async def get_json(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, await resp.json(content_type=None)


async def flushed(collector: Collector) -> None:
    """Wait until everything the collector accepted is queryable."""
    ok = await asyncio.get_running_loop().run_in_executor(None, collector.store.flush, 10.0)
    assert ok, "the span store did not write its queue within 10 s"
