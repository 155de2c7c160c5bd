"""Shared fixtures: the echo IDL, an implementation, and running services."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import thriftpy2
from prometheus_client import CollectorRegistry

ROOT = Path(__file__).resolve().parent.parent
ECHO_IDL = ROOT / "examples" / "echo" / "echo.thrift"
echo_thrift = thriftpy2.load(str(ECHO_IDL), module_name="echo_thrift")


class EchoImpl:
    """Echo with hooks the tests use to observe calls."""

    def __init__(self) -> None:
        self.cancelled = 0
        self.started = 0
        self.finished = 0
        self.threads: set[str] = set()
        self.slow_started = asyncio.Event()

    async def echo(self, message: str) -> str:
        return message

    def reverse(self, message: str) -> str:
        self.threads.add(threading.current_thread().name)
        if not message:
            raise echo_thrift.EchoError(reason="empty message")
        return message[::-1]

    async def slow(self, delay_ms: int) -> int:
        self.started += 1
        self.slow_started.set()
        try:
            await asyncio.sleep(delay_ms / 1000)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.finished += 1
        return delay_ms

    async def ping(self) -> None:
        return None


@pytest.fixture
def echo_module() -> Any:
    return echo_thrift


@pytest.fixture
def metrics_registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def registry_url(tmp_path: Path) -> str:
    """A private local:// registry directory for one test."""
    return f"local://{tmp_path / 'registry'}"


@pytest.fixture
async def echo_service(metrics_registry: CollectorRegistry) -> AsyncIterator[Any]:
    """A started echo Service (no registry) with its implementation at ``.implementation``."""
    from meshkit import Service

    svc = Service("echo", echo_thrift.Echo, registry=None, metrics_registry=metrics_registry)
    svc.implement(EchoImpl())
    await svc.start(port=0, health_port=0)
    try:
        yield svc
    finally:
        await svc.stop(drain_timeout=1.0)
