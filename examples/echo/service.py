"""The echo example service.

Run it (from the repository root)::

    meshkit run examples/echo/service.py:svc              # or: python examples/echo/service.py
    meshkit run examples.echo.service:svc --port 9090     # module form

then call it::

    meshkit call echo echo --idl examples/echo/echo.thrift --arg message=hi
    python examples/echo/client.py hi
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import thriftpy2

from meshkit import Service

echo = thriftpy2.load(str(Path(__file__).with_name("echo.thrift")), module_name="echo_thrift")

svc = Service("echo", echo.Echo, version="1.0.0")


@svc.implement
class Echo:
    async def echo(self, message: str) -> str:
        return message

    def reverse(self, message: str) -> str:
        # A plain ``def`` runs in the service's thread pool, off the event loop.
        if not message:
            raise echo.EchoError(reason="empty message")  # declared in the IDL: reaches the caller
        return message[::-1]

    async def slow(self, delay_ms: int) -> int:
        await asyncio.sleep(delay_ms / 1000)
        return delay_ms

    async def ping(self) -> None:
        return None


if __name__ == "__main__":
    svc.run()
