"""Zone-aware routing: keep calls in the caller's zone while that zone can take them.

:class:`ZonePreference` is an endpoint selector for the pick stage (see
:mod:`meshkit.rpc.pick`), in the spirit of Envoy's zone-aware routing: it narrows
the candidates to the endpoints tagged with the local zone, and spills over to
every endpoint when the local zone is too small a part of the pool, when it is
overloaded, or when this call has already tried all of it.

Place it after the selectors that remove unhealthy endpoints (outlier ejection,
open breakers), so that the sizes it compares are those of the *healthy* pool.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from ..errors import InvalidArgument
from .context import CallContext
from .endpoint import Endpoint

__all__ = ["ZONE_ENV", "ZonePreference"]

#: Environment variable naming the zone this process runs in.
ZONE_ENV = "MESHKIT_ZONE"

#: At most this many local endpoints have their load read per call.
LOAD_SAMPLE = 16

LOCAL = "local"
SPILL = "spill"


class ZonePreference:
    """Prefer endpoints in the local zone; spill to all zones when that is unwise.

    ``local_zone`` defaults to the ``MESHKIT_ZONE`` environment variable (read when
    the object is made). Without a local zone the selector passes every endpoint
    through and records nothing. An endpoint's zone is ``endpoint.tags[tag]``
    (``"zone"``; ``MESHKIT_TAGS=zone=…`` on the instance); endpoints without the
    tag form a zone of their own.

    For each call the decision is recorded as ``ctx.extras["zone"]``:
    ``"local"`` (only local endpoints are candidates) or ``"spill"`` (all are). The
    call spills when any of these holds:

    * **too small** — the local zone is empty, or has fewer than
      ``min_healthy_fraction * total / zones`` endpoints, i.e. less than that
      fraction of an even share of the pool (zones counted among the endpoints
      given, so this is judged on the endpoints still eligible);
    * **overloaded** — ``load`` and ``max_load`` are given and the mean
      ``load(endpoint)`` over the local endpoints is ≥ ``max_load`` (for instance
      ``load=peak_ewma.load``, the calls this client has in flight per endpoint,
      with ``max_load=8``; with more than 16 local endpoints the mean is taken over
      a rotating window of 16 of them per call); or
      ``spill_when_overloaded(local_endpoints)`` returns true (any other signal);
    * **exhausted** — every local endpoint was already tried by this call, so a
      retry goes to another zone rather than back to the same instance.

    The local subset is computed once per snapshot (recognised by identity) and
    returned as the same tuple each time, so balancers' caches keep hitting. The
    per-call cost is a few attribute reads, plus ``len(local)`` calls of ``load``
    when a load signal is configured.
    """

    name = "zone"

    def __init__(
        self,
        local_zone: str | None = None,
        *,
        min_healthy_fraction: float = 0.5,
        load: Callable[[Endpoint], float] | None = None,
        max_load: float | None = None,
        spill_when_overloaded: Callable[[Sequence[Endpoint]], bool] | None = None,
        tag: str = "zone",
    ) -> None:
        if not 0.0 <= min_healthy_fraction <= 1.0:
            raise InvalidArgument(
                f"expected min_healthy_fraction between 0 and 1, found {min_healthy_fraction!r}"
            )
        if (load is None) != (max_load is None):
            raise InvalidArgument(
                "expected load and max_load together (a load signal and its threshold), "
                f"found load={'set' if load else 'None'}, max_load={max_load!r}"
            )
        if local_zone is None:
            local_zone = os.environ.get(ZONE_ENV) or None
        self.local_zone = local_zone
        self.min_healthy_fraction = min_healthy_fraction
        self.load = load
        self.max_load = max_load
        self.spill_when_overloaded = spill_when_overloaded
        self.tag = tag
        self._source: Sequence[Endpoint] | None = None
        # The local candidates of the current snapshot, or None when the local zone is
        # too small a part of it.
        self._local: Sequence[Endpoint] | None = None
        self._cursor = 0

    def select(self, endpoints: Sequence[Endpoint], ctx: CallContext) -> Sequence[Endpoint]:
        """The local-zone endpoints, or all of ``endpoints`` when spilling over."""
        if self.local_zone is None:
            return endpoints
        if endpoints is not self._source:
            self._classify(endpoints)
        local = self._local
        if (
            local is None
            or (ctx.tried and self._exhausted(local, ctx.tried))
            or self._overloaded(local)
        ):
            ctx.extras["zone"] = SPILL
            return endpoints
        ctx.extras["zone"] = LOCAL
        return local

    def local_endpoints(self, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        """The endpoints of ``endpoints`` in the local zone (empty without a local zone)."""
        zone, tag = self.local_zone, self.tag
        if zone is None:
            return []
        return [e for e in endpoints if e.tags.get(tag) == zone]

    # -- internals

    def _classify(self, endpoints: Sequence[Endpoint]) -> None:
        self._source = endpoints
        tag = self.tag
        local = self.local_endpoints(endpoints)
        if len(local) == len(endpoints):
            self._local = endpoints  # one zone: keep the caller's object
            return
        zones = len({e.tags.get(tag) for e in endpoints})
        fair_share = len(endpoints) / zones
        if local and len(local) >= self.min_healthy_fraction * fair_share:
            self._local = tuple(local)
        else:
            self._local = None

    def _overloaded(self, local: Sequence[Endpoint]) -> bool:
        load, max_load = self.load, self.max_load
        if load is not None and max_load is not None:
            sample = local
            if len(local) > LOAD_SAMPLE:  # bound the per-call cost: a rotating window
                start = self._cursor = (self._cursor + LOAD_SAMPLE) % len(local)
                sample = local[start : start + LOAD_SAMPLE]
            if sum(map(load, sample)) >= max_load * len(sample):
                return True
        spill = self.spill_when_overloaded
        return spill is not None and bool(spill(local))

    @staticmethod
    def _exhausted(local: Sequence[Endpoint], tried: Sequence[Endpoint]) -> bool:
        return all(endpoint in tried for endpoint in local)
