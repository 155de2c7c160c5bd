"""The gateway example service: ``greet(name)`` calls the echo service through discovery.

Run echo and gateway, then call the gateway (from the repository root)::

    meshkit run examples/echo/service.py:svc &
    meshkit run examples/gateway/service.py:svc &
    meshkit call gateway greet --idl examples/gateway/gateway.thrift --arg name=you

``meshkit demo`` runs the same two services (shipped inside the package).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import thriftpy2

from meshkit import Service

HERE = Path(__file__).resolve().parent
gateway = thriftpy2.load(str(HERE / "gateway.thrift"), module_name="gateway_thrift")
echo = thriftpy2.load(str(HERE.parent / "echo" / "echo.thrift"), module_name="echo_thrift")

svc = Service("gateway", gateway.Gateway, version="1.0.0")


@svc.implement
class Gateway:
    def __init__(self) -> None:
        self.echo: Any = None

    async def greet(self, name: str) -> str:
        if self.echo is None:
            # Created on first use, once the service has started: it discovers "echo" in
            # the registry this service registered in, and sends meshkit-caller: gateway.
            self.echo = svc.client(echo.Echo, "echo", timeout=1.0)
        return await self.echo.echo(f"hello, {name}")


if __name__ == "__main__":
    svc.run()
