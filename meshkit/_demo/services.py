"""The services ``meshkit demo`` runs, as zero-argument factories for ``meshkit run``::

    meshkit run meshkit._demo.services:echo_service
    meshkit run meshkit._demo.services:gateway_service

``echo`` implements the Echo IDL; ``gateway`` implements ``greet(name)`` by calling
``echo.echo`` through discovery, so every gateway call crosses two services.
``examples/echo`` and ``examples/gateway`` are the same services written as stand-alone
example files.

Two environment variables, set by the demo for its children, are read here:

* ``MESHKIT_DEMO_TAGS`` (``k=v,k=v``): tags of the instance record (the demo finds its
  children in the registry by their ``demo-slot`` tag; later a ``canary`` tag).
* ``MESHKIT_DEMO_PARENT_PID``: the demo's pid; when that process is gone (killed without
  cleaning up), the service sends itself SIGTERM, drains and exits instead of lingering.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from typing import Any

import thriftpy2
from pydantic import BaseModel

from .. import Service
from ..config.routing import RoutingRules, live_routing
from . import ECHO_IDL, GATEWAY_IDL

__all__ = ["echo_service", "echo_thrift", "gateway_service", "gateway_thrift"]

echo_thrift: Any = thriftpy2.load(str(ECHO_IDL), module_name="meshkit_demo_echo_thrift")
gateway_thrift: Any = thriftpy2.load(str(GATEWAY_IDL), module_name="meshkit_demo_gateway_thrift")

TAGS_ENV = "MESHKIT_DEMO_TAGS"

#: Gray release: a sticky 20 % of greeted names go to instances tagged canary=true; the
#: rest stay on the stable pool (the other echo instances), balanced by peak EWMA.
CANARY_RULES: dict[str, Any] = {
    "rules": [
        {
            "name": "canary-20pct",
            "target": {"canary": "true"},
            "percent": 20,
            "hash_key": "user",
        }
    ]
}
PARENT_ENV = "MESHKIT_DEMO_PARENT_PID"


def greeting(name: str) -> str:
    """What ``gateway.greet(name)`` returns (the demo checks every reply against it)."""
    return f"hello, {name}"


def _tags() -> dict[str, str]:
    tags: dict[str, str] = {}
    for item in os.environ.get(TAGS_ENV, "").split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            tags[key.strip()] = value.strip()
    return tags


def _exit_with_parent() -> None:
    raw = os.environ.get(PARENT_ENV, "")
    if not raw.isdigit():
        return
    parent = int(raw)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)  # the service drains and exits 0

    threading.Thread(target=watch, name="meshkit-demo-parent-watch", daemon=True).start()


class Echo:
    async def echo(self, message: str) -> str:
        return message

    def reverse(self, message: str) -> str:  # plain def: runs in the thread pool
        if not message:
            raise echo_thrift.EchoError(reason="empty message")
        return message[::-1]

    async def slow(self, delay_ms: int) -> int:
        await asyncio.sleep(delay_ms / 1000)
        return delay_ms

    async def ping(self) -> None:
        return None


def echo_service() -> Service:
    """The ``echo`` service."""
    _exit_with_parent()
    svc = Service("echo", echo_thrift.Echo, version="1.0.0", tags=_tags())
    svc.implement(Echo())
    return svc


class GatewaySettings(BaseModel):
    """The gateway's live settings: its routing rules (``meshkit config set gateway routing
    '{"rules": []}'`` sends everyone to the stable pool, at once, without a restart)."""

    routing: RoutingRules = CANARY_RULES


def gateway_service() -> Service:
    """The ``gateway`` service: ``greet(name)`` calls ``echo.echo`` through discovery."""
    _exit_with_parent()
    svc = Service(
        "gateway", gateway_thrift.Gateway, version="1.0.0", tags=_tags(), config=GatewaySettings
    )

    class Gateway:
        def __init__(self) -> None:
            self._echo: Any = None

        async def greet(self, name: str) -> str:
            if self._echo is None:  # created on first use: the service is started by then
                self._echo = svc.client(
                    echo_thrift.Echo,
                    "echo",
                    timeout=1.0,
                    routing=live_routing(svc.config, "routing"),
                )
            return str(await self._echo.call("echo", greeting(name), headers={"user": name}))

    svc.implement(Gateway())
    return svc
