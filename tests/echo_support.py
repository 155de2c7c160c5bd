"""The echo IDL and an instrumented implementation shared by the tests."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import thriftpy2

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
