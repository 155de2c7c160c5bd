"""Load balancers: choose one endpoint from the current snapshot.

A balancer is any object with ``pick(endpoints, ctx) -> Endpoint``. The
endpoint list is never empty when ``pick`` is called.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Protocol

from .context import CallContext
from .endpoint import Endpoint


class Balancer(Protocol):
    def pick(self, endpoints: Sequence[Endpoint], ctx: CallContext) -> Endpoint: ...


class RoundRobin:
    """Each endpoint in turn."""

    name = "round_robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick(self, endpoints: Sequence[Endpoint], ctx: CallContext) -> Endpoint:
        return endpoints[next(self._counter) % len(endpoints)]
