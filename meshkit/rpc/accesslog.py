"""One structured log line per call (debug level): method, peer, duration, status."""

from __future__ import annotations

import logging
import time

import structlog

from .context import CallContext
from .metrics import status_label
from .pipeline import HookStage


class AccessLog(HookStage):
    """Log each call at debug level; costs one level check when debug is off."""

    name = "accesslog"

    # How long a decision about the log level is reused: asking structlog costs
    # microseconds per call, and levels change rarely.
    recheck_after = 1.0

    def __init__(self, side: str) -> None:
        self.side = side
        self.log = structlog.get_logger(f"meshkit.rpc.{side}")
        self._enabled_until = 0.0
        self._enabled_cached = False

    def _enabled(self) -> bool:
        now = time.monotonic()
        if now < self._enabled_until:
            return self._enabled_cached
        # Unconfigured structlog prints everything: stay quiet until logging is set up.
        enabled = False
        if structlog.is_configured():
            is_enabled = getattr(self.log, "is_enabled_for", None)
            enabled = bool(is_enabled(logging.DEBUG)) if is_enabled is not None else True
        self._enabled_cached = enabled
        self._enabled_until = now + self.recheck_after
        return enabled

    def enter(self, ctx: CallContext) -> float | None:
        # _enabled's fast path, inlined: this runs on every call.
        if time.monotonic() < self._enabled_until:
            return time.perf_counter() if self._enabled_cached else None
        return time.perf_counter() if self._enabled() else None

    def exit(self, ctx: CallContext, token: float, error: BaseException | None) -> None:
        self.log.debug(
            "rpc",
            side=self.side,
            service=ctx.service,
            method=ctx.method,
            peer=ctx.peer,
            caller=ctx.caller or None,
            attempt=ctx.attempt,
            duration_ms=round((time.perf_counter() - token) * 1000, 3),
            status=status_label(error, ctx),
            error=str(error) if error is not None else None,
        )
