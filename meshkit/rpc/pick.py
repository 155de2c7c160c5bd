"""The endpoint-pick stage: narrow the snapshot, let the balancer choose, report outcomes.

For each attempt:

1. the resolver gives the current endpoints;
2. each *selector* narrows them in turn (gray-release routing, outlier ejection, open
   circuit breakers, zone preference, …): ``select(endpoints, ctx) -> endpoints``;
3. endpoints already tried by this call are avoided when others remain;
4. the balancer picks one;
5. every *observer* (the balancer itself when it has the hooks, outlier detectors,
   breakers, …) hears ``on_start`` and ``on_finish`` around the attempt.

Each policy keeps its own state; this stage only composes them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from ..errors import NoInstances
from .balancer import Balancer
from .context import CallContext
from .endpoint import Endpoint, Resolver
from .pipeline import HookStage


@runtime_checkable
class EndpointSelector(Protocol):
    """Narrows the candidate endpoints of one attempt (may raise a MeshkitError).

    A selector (or observer) with often nothing to do may keep a boolean attribute
    ``idle``: while it is true, ``select`` would return its input unchanged,
    ``on_start`` would do nothing and ``on_finish`` would do nothing for a success,
    so the pick stage reads the attribute instead of making those calls.
    """

    def select(self, endpoints: Sequence[Endpoint], ctx: CallContext) -> Sequence[Endpoint]: ...


@runtime_checkable
class EndpointObserver(Protocol):
    """Hears about every attempt on an endpoint.

    An observer whose ``on_start`` does nothing may set ``observes_start = False``
    so the pick stage does not call it.
    """

    def on_start(self, endpoint: Endpoint, ctx: CallContext) -> None: ...

    def on_finish(
        self, endpoint: Endpoint, ctx: CallContext, latency: float, error: BaseException | None
    ) -> None: ...


def _may_idle(policy: object) -> bool:
    # Only a plain boolean attribute counts: a method or an Event named ``idle`` is not
    # this protocol.
    return isinstance(getattr(policy, "idle", None), bool)


class Pick(HookStage):
    """Choose the endpoint of this attempt and report how it went."""

    name = "pick"

    def __init__(
        self,
        resolver: Resolver,
        balancer: Balancer,
        *,
        selectors: Sequence[EndpointSelector] = (),
        observers: Sequence[EndpointObserver] = (),
    ) -> None:
        self.resolver = resolver
        self.balancer = balancer
        self.selectors = tuple(selectors)
        watchers: list[Any] = list(observers)
        if isinstance(balancer, EndpointObserver) and balancer not in watchers:
            watchers.insert(0, balancer)
        self.observers = tuple(watchers)
        # Each policy with a pair saying whether it may be idle (see EndpointSelector):
        # an attribute read instead of a Python call per attempt while it is.
        self._selecting: tuple[tuple[Any, bool], ...] = tuple(
            (s, _may_idle(s)) for s in self.selectors
        )
        self._finishing = tuple((o, _may_idle(o)) for o in watchers)
        # Observers whose on_start does nothing say so (``observes_start = False``).
        self._starting = tuple(
            (o, _may_idle(o)) for o in watchers if getattr(o, "observes_start", True)
        )

    def enter(self, ctx: CallContext) -> tuple[Endpoint, float] | None:
        endpoints: Sequence[Endpoint] = self.resolver.endpoints()
        if not endpoints:
            raise NoInstances(
                f"expected at least one instance of {ctx.service!r} in discovery, found none"
            )
        for selector, may_idle in self._selecting:
            if may_idle and selector.idle:
                continue
            endpoints = selector.select(endpoints, ctx)
            if not endpoints:
                raise NoInstances(
                    f"no instance of {ctx.service!r} is eligible for {ctx.method}: "
                    f"{type(selector).__name__} left none"
                )
        if ctx.tried:
            fresh = [e for e in endpoints if e not in ctx.tried]
            if fresh:
                endpoints = fresh
        endpoint = self.balancer.pick(endpoints, ctx)
        ctx.endpoint = endpoint
        ctx.peer = endpoint.address
        if not self.observers:
            return None
        for observer, may_idle in self._starting:
            if may_idle and observer.idle:
                continue
            observer.on_start(endpoint, ctx)
        return endpoint, time.perf_counter()

    def exit(
        self, ctx: CallContext, token: tuple[Endpoint, float], error: BaseException | None
    ) -> None:
        endpoint, start = token
        latency = time.perf_counter() - start
        for observer, may_idle in self._finishing:
            if may_idle and error is None and observer.idle:
                continue
            observer.on_finish(endpoint, ctx, latency, error)
