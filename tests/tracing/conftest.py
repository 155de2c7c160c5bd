"""Fixtures for the tracing tests: a real bundled collector on a free loopback port."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from meshkit.tracing.collector import Collector, SpanStore


@pytest.fixture
async def collector(tmp_path: Path) -> AsyncIterator[Collector]:
    """A started collector (SQLite in the test's temp dir) at ``collector.url``."""
    store = SpanStore(tmp_path / "traces.db", retention_every=3600)
    server = Collector(store, port=0)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
        await asyncio.get_running_loop().run_in_executor(None, store.close)


@pytest.fixture
def chromium_path() -> Iterator[str]:
    """Debian's Chromium (installed by scripts/install-sysdeps.sh); fails when missing."""
    path = Path("/usr/bin/chromium")
    if not path.exists():
        pytest.fail(
            "/usr/bin/chromium is missing: run scripts/install-sysdeps.sh (Debian chromium)"
        )
    yield str(path)
