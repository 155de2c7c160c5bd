"""The endpoint-pick stage: ask the resolver for endpoints and the balancer for one."""

from __future__ import annotations

from typing import Any

from ..errors import NoInstances
from .balancer import Balancer
from .context import CallContext
from .endpoint import Resolver
from .pipeline import Next


class Pick:
    """Choose the endpoint of this attempt, avoiding ones already tried when possible."""

    name = "pick"

    def __init__(self, resolver: Resolver, balancer: Balancer) -> None:
        self.resolver = resolver
        self.balancer = balancer

    async def __call__(self, ctx: CallContext, call_next: Next) -> Any:
        endpoints = self.resolver.endpoints()
        if not endpoints:
            raise NoInstances(
                f"expected at least one instance of {ctx.service!r} in discovery, found none"
            )
        if ctx.tried:
            fresh = [e for e in endpoints if e not in ctx.tried]
            if fresh:
                endpoints = fresh
        endpoint = self.balancer.pick(endpoints, ctx)
        ctx.endpoint = endpoint
        ctx.peer = endpoint.address
        return await call_next(ctx)
