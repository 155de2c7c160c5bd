"""Lifecycle phase and readiness of a meshkit process.

The :class:`HealthState` is owned by the ``Service`` object, which moves it through the
phases and marks it registered; the health endpoint only reads it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from enum import StrEnum

CheckResult = bool | tuple[bool, str]
"""What a readiness check returns: a bool, or ``(ok, detail)``."""

ReadinessCheck = Callable[[], CheckResult]


class Phase(StrEnum):
    """Where a process is in its life."""

    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPED = "stopped"


class HealthState:
    """Phase, registration status and named readiness checks of one process.

    ``requires_registration`` says whether a registry is in use: when it is, the process is
    ready only once :meth:`set_registered` has been called with ``True``.
    """

    def __init__(self, *, requires_registration: bool = False) -> None:
        self._lock = threading.Lock()
        self._phase = Phase.STARTING
        self._registered = False
        self._checks: dict[str, ReadinessCheck] = {}
        self.requires_registration = requires_registration

    @property
    def phase(self) -> Phase:
        """The current lifecycle phase."""
        return self._phase

    @property
    def registered(self) -> bool:
        """Whether the instance is currently registered with the registry."""
        return self._registered

    def set_phase(self, phase: Phase) -> None:
        """Move to ``phase`` (any transition is allowed; the Service decides the order)."""
        self._phase = Phase(phase)

    def set_registered(self, registered: bool) -> None:
        """Record whether the instance is registered (or its lease was lost)."""
        self._registered = bool(registered)

    def add_check(self, name: str, fn: ReadinessCheck) -> None:
        """Add (or replace) the readiness check ``name``.

        ``fn`` is called on every readiness probe, in the event loop, so it must be quick and
        must not block. It returns ``True``/``False`` or ``(ok, detail)``; an exception counts
        as failing, with the exception as the detail.
        """
        with self._lock:
            self._checks[name] = fn

    def remove_check(self, name: str) -> None:
        """Remove the readiness check ``name``; unknown names are ignored."""
        with self._lock:
            self._checks.pop(name, None)

    @property
    def check_names(self) -> list[str]:
        """Names of the registered readiness checks, in the order they were added."""
        with self._lock:
            return list(self._checks)

    def ready(self) -> tuple[bool, str]:
        """Whether the process should receive traffic, and if not, why.

        Ready means: phase is SERVING, registered (when registration is required) and every
        check passes. The reason is ``"ready"`` when ready, otherwise e.g. ``"starting"``,
        ``"draining"``, ``"not registered"`` or ``"check 'kafka' failing: lag too high"``.
        """
        phase = self._phase
        if phase is not Phase.SERVING:
            return False, phase.value
        if self.requires_registration and not self._registered:
            return False, "not registered"
        with self._lock:
            checks = list(self._checks.items())
        for name, fn in checks:
            ok, detail = _run_check(fn)
            if not ok:
                suffix = f": {detail}" if detail else ""
                return False, f"check {name!r} failing{suffix}"
        return True, "ready"


def _run_check(fn: ReadinessCheck) -> tuple[bool, str]:
    try:
        result = fn()
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"
    if isinstance(result, tuple):
        ok, detail = result
        return bool(ok), str(detail)
    return bool(result), ""
