"""Load balancers: choose one endpoint from the current snapshot.

A balancer is any object with ``pick(endpoints, ctx) -> Endpoint``. The
endpoint list is never empty when ``pick`` is called. A balancer that also has
``on_start``/``on_finish`` (see :class:`~meshkit.rpc.pick.EndpointObserver`) hears
about every attempt it chose, which is how :class:`PeakEwma` learns latencies.

* :class:`RoundRobin`: each endpoint in turn.
* :class:`WeightedRandom`: probability proportional to ``Endpoint.weight``
  (Kitex ``WeightedRandom``).
* :class:`PeakEwma`: power of two choices on peak-EWMA latency * (in-flight + 1)
  (Finagle ``p2cPeakEwma``); the recommended default.
* :class:`ConsistentHash`: a ketama ring (md5 points, as libketama and most
  memcached clients), so a key keeps going to the same instance.

Every balancer is meant to be owned by one client and used from its event loop
thread; none of them locks. Each caches what it derives from a snapshot (tables,
rings) and recognises the snapshot by identity first, so a pick on an unchanged
snapshot does no work proportional to its size.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import math
import random
import struct
import time
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from math import exp
from typing import Protocol

from ..errors import Cancelled, InvalidArgument, ResourceExhausted, Unavailable
from .context import CallContext
from .endpoint import Endpoint

__all__ = [
    "Balancer",
    "ConsistentHash",
    "PeakEwma",
    "RoundRobin",
    "WeightedRandom",
    "ketama_hash",
]


class Balancer(Protocol):
    """Chooses the endpoint of one attempt from a non-empty candidate list."""

    def pick(self, endpoints: Sequence[Endpoint], ctx: CallContext) -> Endpoint: ...


class RoundRobin:
    """Each endpoint in turn."""

    name = "round_robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick(self, endpoints: Sequence[Endpoint], ctx: CallContext) -> Endpoint:
        return endpoints[next(self._counter) % len(endpoints)]


# ------------------------------------------------------------------ weighted random


class WeightedRandom:
    """Pick with probability proportional to ``endpoint.weight``.

    Endpoints whose weight is ≤ 0 are never picked, unless every endpoint's is,
    and then the pick is uniform. The cumulative weight table is rebuilt only
    when the snapshot changes (same object, or an equal tuple, reuses it); a pick
    is one random number and one ``bisect`` (O(log n)).

    ``rng`` makes the picks reproducible (tests); the default is a private
    :class:`random.Random`.
    """

    name = "weighted_random"

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self._random = (rng or random.Random()).random
        self._source: Sequence[Endpoint] | None = None
        self._key: tuple[Endpoint, ...] = ()
        # picked: the endpoints with a share; bounds[i]: cumulative weight of picked[:i+1],
        # without the last (the total): bisect_right(bounds, x) for x in [0, total) is
        # then always a valid index.
        self._picked: tuple[Endpoint, ...] = ()
        self._bounds: list[float] = []
        self._total = 0.0

    def pick(self, endpoints: Sequence[Endpoint], ctx: CallContext) -> Endpoint:
        if endpoints is not self._source:
            self._load(endpoints)
        return self._picked[bisect_right(self._bounds, self._random() * self._total)]

    def _load(self, endpoints: Sequence[Endpoint]) -> None:
        key = tuple(endpoints)
        self._source = endpoints
        if key == self._key and self._picked:
            return
        self._key = key
        picked = tuple(e for e in key if e.weight > 0)
        weights: list[float]
        if picked:
            weights = [float(e.weight) for e in picked]
        else:
            picked = key
            weights = [1.0] * len(key)
        running = list(itertools.accumulate(weights))
        self._picked = picked
        self._total = running[-1]
        self._bounds = running[:-1]


# ------------------------------------------------------------------ peak EWMA (P2C)


class _Peer:
    """What :class:`PeakEwma` knows of one endpoint."""

    __slots__ = ("ewma", "pending", "stamp")

    def __init__(self, ewma: float, stamp: float) -> None:
        self.ewma = ewma
        self.stamp = stamp
        self.pending = 0


# Errors that say the endpoint did not serve the call: they count as a latency of
# ``failure_penalty`` so that a fast failure never makes an endpoint look cheap.
_FAILURES = (Unavailable, ResourceExhausted)
# The caller gave up: the attempt's latency says nothing about the endpoint.
_NO_SAMPLE = (asyncio.CancelledError, Cancelled)


class PeakEwma:
    """Power of two choices on peak-EWMA latency, Finagle's ``p2cPeakEwma``.

    Each pick draws two distinct endpoints at random and takes the cheaper, where
    ``cost = ewma * (in-flight + 1)``. ``ewma`` is a *peak* EWMA of the latencies
    this balancer observed on the endpoint: a latency above it replaces it at
    once; otherwise it moves towards the sample with weight ``1 - exp(-Δt/decay)``,
    Δt being the time since the endpoint's last update (so unevenly spaced samples
    are weighted by time, not count). Reading a cost also decays ``ewma`` towards 0
    over time, so an endpoint that was avoided is tried again eventually.

    ``default_latency`` is the EWMA an endpoint starts from. With the default 0 (as
    Finagle) a new instance is attractive at once, but while it has calls in flight
    and no sample yet its cost is ``failure_penalty + in_flight``: it gets one probe
    at a time until its first reply. Set it (in seconds) to make new instances start
    out as if that were their latency.

    Attempts that fail without being served — :class:`~meshkit.Unavailable`
    (connection refused or broken, circuit open) and
    :class:`~meshkit.ResourceExhausted` (the server shed the call) — count as a
    latency of ``failure_penalty`` seconds (keep it well above the service's normal
    latency), so a dead or shedding instance is avoided until the penalty has
    decayed (≈ ``decay * ln(penalty / healthy latency)``, about a minute with the
    defaults and a 1 ms service). Cancelled attempts are not sampled.

    State is kept per ``host:port`` and dropped lazily: at most once per
    ``decay`` seconds, a pick forgets the endpoints that are not among its
    candidates, have nothing in flight and were not touched for ``decay`` seconds
    (an endpoint that comes back starts afresh).

    ``load(endpoint)`` (calls in flight) and ``cost(endpoint)`` expose the state to
    other policies, such as :class:`~meshkit.rpc.zone.ZonePreference`.
    """

    name = "peak_ewma"

    def __init__(
        self,
        decay: float = 10.0,
        default_latency: float = 0.0,
        *,
        failure_penalty: float = 1.0,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not decay > 0:
            raise InvalidArgument(f"expected a decay time > 0 seconds, found {decay!r}")
        if default_latency < 0:
            raise InvalidArgument(
                f"expected a default latency >= 0 seconds, found {default_latency!r}"
            )
        if not failure_penalty > 0:
            raise InvalidArgument(
                f"expected a failure penalty > 0 seconds, found {failure_penalty!r}"
            )
        self.decay = float(decay)
        self.default_latency = float(default_latency)
        self.failure_penalty = float(failure_penalty)
        self._random = (rng or random.Random()).random
        self._clock = clock
        self._peers: dict[str, _Peer] = {}  # by Endpoint.address
        self._next_sweep = -math.inf

    # -- the balancer

    def pick(self, endpoints: Sequence[Endpoint], ctx: CallContext) -> Endpoint:
        n = len(endpoints)
        if n == 1:
            return endpoints[0]
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(endpoints, now)
        rand = self._random
        i = int(rand() * n)
        j = int(rand() * (n - 1))
        if j >= i:
            j += 1
        a = endpoints[i]
        b = endpoints[j]
        # _cost for both, inlined: this runs on every call.
        peers = self._peers
        decay = self.decay
        costs = []
        for endpoint in (a, b):
            peer = peers.get(endpoint.address)
            if peer is None:
                peer = peers[endpoint.address] = _Peer(self.default_latency, now)
            elapsed = now - peer.stamp
            if elapsed > 0:  # decay on read: observe(0)
                peer.ewma *= exp(-elapsed / decay)
                peer.stamp = now
            if peer.ewma == 0.0 and peer.pending:
                costs.append(self.failure_penalty + peer.pending)
            else:
                costs.append(peer.ewma * (peer.pending + 1))
        return a if costs[0] <= costs[1] else b

    # -- the observer

    def on_start(self, endpoint: Endpoint, ctx: CallContext) -> None:
        """Count the attempt as in flight on ``endpoint``."""
        key = endpoint.address
        peer = self._peers.get(key)
        if peer is None:
            peer = self._peers[key] = _Peer(self.default_latency, self._clock())
        peer.pending += 1

    def on_finish(
        self, endpoint: Endpoint, ctx: CallContext, latency: float, error: BaseException | None
    ) -> None:
        """End the attempt and fold its latency (or the failure penalty) into the EWMA."""
        peer = self._peers.get(endpoint.address)
        if peer is None:
            return
        if peer.pending > 0:
            peer.pending -= 1
        if error is not None:
            if isinstance(error, _NO_SAMPLE):
                return
            if isinstance(error, _FAILURES):
                latency = max(latency, self.failure_penalty)
        # _observe, inlined: this runs after every attempt
        now = self._clock()
        elapsed = now - peer.stamp
        if latency > peer.ewma:
            peer.ewma = latency
        elif elapsed > 0:
            w = exp(-elapsed / self.decay)
            peer.ewma = peer.ewma * w + latency * (1.0 - w)
        if elapsed > 0:
            peer.stamp = now

    # -- state for other policies

    def load(self, endpoint: Endpoint) -> float:
        """Calls this balancer's client has in flight on ``endpoint``."""
        peer = self._peers.get(endpoint.address)
        return float(peer.pending) if peer is not None else 0.0

    def cost(self, endpoint: Endpoint) -> float:
        """The cost the next pick would see for ``endpoint`` (seconds * load)."""
        return self._cost(endpoint, self._clock())

    def stats(self) -> dict[str, dict[str, float]]:
        """``{"host:port": {"ewma": seconds, "in_flight": n}}`` for every tracked endpoint."""
        return {
            address: {"ewma": peer.ewma, "in_flight": float(peer.pending)}
            for address, peer in self._peers.items()
        }

    # -- internals

    def _cost(self, endpoint: Endpoint, now: float) -> float:
        key = endpoint.address
        peer = self._peers.get(key)
        if peer is None:
            peer = self._peers[key] = _Peer(self.default_latency, now)
        elapsed = now - peer.stamp
        if elapsed > 0:  # decay on read: observe(0)
            peer.ewma *= exp(-elapsed / self.decay)
            peer.stamp = now
        if peer.ewma == 0.0 and peer.pending:
            return self.failure_penalty + peer.pending
        return peer.ewma * (peer.pending + 1)

    def _sweep(self, endpoints: Sequence[Endpoint], now: float) -> None:
        self._next_sweep = now + self.decay
        peers = self._peers
        if not peers:
            return
        live = {e.address for e in endpoints}
        horizon = now - self.decay
        stale = [
            key
            for key, peer in peers.items()
            if key not in live and not peer.pending and peer.stamp <= horizon
        ]
        for key in stale:
            del peers[key]


# ------------------------------------------------------------------ consistent hash


def ketama_hash(data: bytes) -> int:
    """The ketama hash of a call key: the first 4 bytes of its md5, little-endian."""
    return int.from_bytes(hashlib.md5(data, usedforsecurity=False).digest()[:4], "little")


_FOUR_WORDS = struct.Struct("<4I")  # an md5 digest as ketama's four ring points


class _Ring:
    __slots__ = ("members", "owners", "points")

    def __init__(
        self, members: frozenset[Endpoint], points: list[int], owners: list[Endpoint]
    ) -> None:
        self.members = members
        self.points = points
        self.owners = owners


KeyFunction = Callable[[CallContext], str | bytes | None]


class ConsistentHash:
    """Send calls with the same key to the same instance: a ketama ring.

    ``key`` says where a call's key comes from: the name of a request header
    (``ctx.headers[name]``) or a callable ``(ctx) -> str | bytes | None``. A call
    without a key (``None`` or empty) goes to a random endpoint.

    The ring is libketama's: for each endpoint, ``replicas / 4`` md5 digests of
    ``"host:port-i"`` give 4 points each (little-endian 32-bit words), and a key is
    served by the first point at or after the first 4 bytes of its md5. Points
    depend only on the endpoint's own address, so when an instance joins only the
    keys it takes over move (≈ 1/(n+1) of them), and when one leaves only its keys
    move. With ``weighted=True`` an endpoint gets points in proportion to
    ``weight / 100`` (weight ≤ 0: none, unless every weight is ≤ 0).

    If the owner of a key was already tried by this call (``ctx.tried``), or is
    not among the candidates, the pick walks the ring to the next distinct
    eligible endpoint: retries go where the key would go if that endpoint left.

    Rings are cached by endpoint set (the last ``max_rings``); building one costs
    ``n * replicas / 4`` md5 digests, a pick costs one md5 and one ``bisect``.
    """

    name = "consistent_hash"

    def __init__(
        self,
        key: str | KeyFunction,
        replicas: int = 160,
        *,
        weighted: bool = False,
        max_rings: int = 8,
        rng: random.Random | None = None,
    ) -> None:
        if replicas < 1:
            raise InvalidArgument(f"expected replicas >= 1, found {replicas!r}")
        if max_rings < 1:
            raise InvalidArgument(f"expected max_rings >= 1, found {max_rings!r}")
        if isinstance(key, str):
            header = key

            def from_header(ctx: CallContext) -> str | None:
                return ctx.headers.get(header)

            self._key: KeyFunction = from_header
        elif callable(key):
            self._key = key
        else:
            raise InvalidArgument(
                f"expected key to be a header name or a callable (ctx) -> str | bytes | None, "
                f"found {type(key).__name__}"
            )
        self.replicas = replicas
        self.weighted = weighted
        self.max_rings = max_rings
        self._random = (rng or random.Random()).random
        self._source: Sequence[Endpoint] | None = None
        self._ring: _Ring | None = None
        self._rings: dict[frozenset[Endpoint], _Ring] = {}

    def pick(self, endpoints: Sequence[Endpoint], ctx: CallContext) -> Endpoint:
        raw = self._key(ctx)
        if not raw:
            return endpoints[int(self._random() * len(endpoints))]
        h = ketama_hash(raw.encode() if isinstance(raw, str) else raw)
        ring = self._ring
        if endpoints is not self._source or ring is None:
            return self._pick_slow(endpoints, ctx, h)
        i = bisect_left(ring.points, h)
        owner = ring.owners[i if i < len(ring.points) else 0]
        if ctx.tried and owner in ctx.tried:
            return self._walk(ring, i, ring.members, ctx.tried)
        return owner

    def owner(self, endpoints: Sequence[Endpoint], key: str | bytes) -> Endpoint:
        """The endpoint that ``key`` maps to among ``endpoints`` (no call needed)."""
        ring = self._ring_for(frozenset(endpoints))
        h = ketama_hash(key.encode() if isinstance(key, str) else key)
        i = bisect_left(ring.points, h)
        return ring.owners[i if i < len(ring.points) else 0]

    # -- internals

    def _pick_slow(self, endpoints: Sequence[Endpoint], ctx: CallContext, h: int) -> Endpoint:
        members = frozenset(endpoints)
        ring = self._rings.get(members)
        if ring is None and ctx.tried and self._ring is not None and members <= self._ring.members:
            # A retry: the pick stage dropped the endpoints already tried. Walking the
            # ring of the full set, skipping those, gives the same answer as the ring
            # of the subset, without building it.
            ring = self._ring
        else:
            ring = self._ring_for(members)
            self._source = endpoints
            self._ring = ring
        i = bisect_left(ring.points, h)
        owner = ring.owners[i if i < len(ring.points) else 0]
        if owner in members and not (ctx.tried and owner in ctx.tried):
            return owner
        return self._walk(ring, i, members, ctx.tried)

    def _walk(
        self, ring: _Ring, start: int, members: frozenset[Endpoint], tried: Sequence[Endpoint]
    ) -> Endpoint:
        allowed = members.difference(tried) or members
        owners = ring.owners
        size = len(owners)
        for step in range(size):
            owner = owners[(start + step) % size]
            if owner in allowed:
                return owner
        # only endpoints without points (weight <= 0 with weighted=True) are left
        return min(allowed, key=lambda e: e.address)

    def _ring_for(self, members: frozenset[Endpoint]) -> _Ring:
        rings = self._rings
        ring = rings.pop(members, None)
        if ring is None:
            ring = self._build(members)
            while len(rings) >= self.max_rings:
                del rings[next(iter(rings))]
        rings[members] = ring  # most recently used last
        return ring

    def _build(self, members: frozenset[Endpoint]) -> _Ring:
        groups_per = self._groups(members)
        # ties (vanishingly rare) are broken by address, so every client agrees
        ordered = sorted(members, key=lambda e: (e.address, e.instance_id))
        entries: list[tuple[int, int]] = []
        md5 = hashlib.md5
        unpack = _FOUR_WORDS.unpack
        for index, endpoint in enumerate(ordered):
            address = endpoint.address
            for group in range(groups_per[endpoint]):
                digest = md5(f"{address}-{group}".encode(), usedforsecurity=False).digest()
                for point in unpack(digest):
                    entries.append((point, index))
        entries.sort()
        return _Ring(members, [p for p, _ in entries], [ordered[i] for _, i in entries])

    def _groups(self, members: frozenset[Endpoint]) -> dict[Endpoint, int]:
        base = max(1, math.ceil(self.replicas / 4))
        if not self.weighted or all(e.weight <= 0 for e in members):
            return dict.fromkeys(members, base)
        return {e: (max(1, round(base * e.weight / 100)) if e.weight > 0 else 0) for e in members}
