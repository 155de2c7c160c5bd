"""Lifecycle phase and readiness of a meshkit process.

The :class:`HealthState` is owned by the ``Service`` object, which moves it through the
phases and marks it registered; the health endpoint only reads it.
"""

from __future__ import annotations

import inspect
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
        as failing, with the exception as the detail. An ``async def`` check is refused
        (:class:`TypeError`): a readiness probe cannot wait for it, and its coroutine would
        count as true; keep the state it needs up to date in a task and read it here.
        """
        if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004 - a callable object's async __call__
        ):
            raise TypeError(
                f"readiness check {name!r} is an async function: checks run synchronously on "
                "every probe; update a flag from a task and return it from a plain function"
            )
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
        if len(result) != 2:
            return False, f"expected True/False or (ok, detail) from the check, found {result!r}"
        ok, detail = result
        return bool(ok), str(detail)
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()  # never awaited: no "was never awaited" warning
        return False, "the check returned an awaitable; checks must answer synchronously"
    return bool(result), ""
