"""Event-loop lag monitor: the evidence behind ``/health/live``.

A task wakes every ``interval`` seconds and records how late it woke. A loop that is blocked
(a sync call in a coroutine, a CPU-bound handler) wakes it late, or not at all; the health
endpoint reports the process stalled once the last beat is older than ``stall_after``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from weakref import WeakKeyDictionary

from prometheus_client import REGISTRY, CollectorRegistry, Gauge

LAG_METRIC = "meshkit_event_loop_lag_seconds"


class LoopMonitor:
    """Measures event-loop lag from inside the loop.

    Call :meth:`start` from the loop to watch and :meth:`stop` when done; the owner (the
    ``Service``) does both, the health server only reads. While running, the gauge
    ``meshkit_event_loop_lag_seconds{service=...}`` in ``registry`` reports
    :attr:`max_lag_recent`; pass ``registry=None`` for no metric.

    A monitor that was never started has its last beat at construction time, so it reports
    stalled once ``stall_after`` has passed.
    """

    def __init__(
        self,
        *,
        interval: float = 0.25,
        stall_after: float = 5.0,
        window: float = 10.0,
        service: str = "unknown",
        registry: CollectorRegistry | None = REGISTRY,
    ) -> None:
        """Create a monitor (not yet running).

        ``interval``: seconds between beats. ``stall_after``: age of the last beat after which
        the loop counts as stalled. ``window``: how far back :attr:`max_lag_recent` looks.
        """
        if interval <= 0:
            raise ValueError(f"interval must be > 0, got {interval!r}")
        if stall_after <= interval:
            raise ValueError(
                f"stall_after must be greater than interval ({interval!r}), got {stall_after!r}"
            )
        self.interval = interval
        self.stall_after = stall_after
        self.window = window
        self.service = service
        self._registry = registry
        self._lag = 0.0
        self._max_recent = 0.0
        self._recent: deque[tuple[float, float]] = deque()
        self._last_beat = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    @property
    def lag_seconds(self) -> float:
        """Lag measured at the last beat: how late the monitor woke, in seconds."""
        return self._lag

    @property
    def max_lag_recent(self) -> float:
        """The largest lag measured within the last ``window`` seconds."""
        return self._max_recent

    @property
    def last_beat(self) -> float:
        """``time.monotonic()`` of the last beat (of :meth:`start`, or construction)."""
        return self._last_beat

    @property
    def since_last_beat(self) -> float:
        """Seconds since the last beat."""
        return max(0.0, time.monotonic() - self._last_beat)

    @property
    def running(self) -> bool:
        """Whether the monitor task is running."""
        return self._task is not None and not self._task.done()

    def is_live(self) -> bool:
        """True when the last beat is not older than ``stall_after``."""
        return self.since_last_beat <= self.stall_after

    def start(self) -> None:
        """Start watching the running loop. Idempotent; must be called from the loop."""
        if self.running:
            return
        self._last_beat = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"meshkit-loopmon-{self.service}"
        )
        _bind_gauge(self)

    async def stop(self) -> None:
        """Stop the monitor task and withdraw its gauge. Idempotent."""
        task, self._task = self._task, None
        _unbind_gauge(self)
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            now = loop.time()
            self._beat(now, max(0.0, now - expected))

    def _beat(self, now: float, lag: float) -> None:
        self._lag = lag
        self._last_beat = time.monotonic()
        recent = self._recent
        recent.append((now, lag))
        horizon = now - self.window
        while recent and recent[0][0] < horizon:
            recent.popleft()
        self._max_recent = max(sample for _, sample in recent)


# One gauge per registry, shared by every monitor that reports into it (a metric name can be
# registered only once per registry); each monitor owns its ``service`` label.
_gauge_lock = threading.Lock()
_gauges: WeakKeyDictionary[CollectorRegistry, tuple[Gauge, dict[str, LoopMonitor]]] = (
    WeakKeyDictionary()
)


def _bind_gauge(monitor: LoopMonitor) -> None:
    registry = monitor._registry
    if registry is None:
        return
    with _gauge_lock:
        entry = _gauges.get(registry)
        if entry is None:
            gauge = Gauge(
                LAG_METRIC,
                "Largest event-loop lag seen recently (seconds a timer woke late).",
                ["service"],
                registry=registry,
            )
            entry = _gauges[registry] = (gauge, {})
        gauge, owners = entry
        owners[monitor.service] = monitor
        gauge.labels(service=monitor.service).set_function(lambda: monitor.max_lag_recent)


def _unbind_gauge(monitor: LoopMonitor) -> None:
    registry = monitor._registry
    if registry is None:
        return
    with _gauge_lock:
        entry = _gauges.get(registry)
        if entry is None:
            return
        gauge, owners = entry
        if owners.get(monitor.service) is monitor:
            del owners[monitor.service]
            with contextlib.suppress(KeyError):
                gauge.remove(monitor.service)
