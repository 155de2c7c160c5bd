"""One structured log line per call (debug level): method, peer, duration, status."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from typing import Any

import structlog

from .context import CallContext
from .metrics import status_label
from .pipeline import Next


class AccessLog:
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

    def __call__(self, ctx: CallContext, call_next: Next) -> Awaitable[Any]:
        if not self._enabled():
            return call_next(ctx)  # no coroutine frame of its own when logging is off
        return self._logged(ctx, call_next)

    async def _logged(self, ctx: CallContext, call_next: Next) -> Any:
        start = time.perf_counter()
        error: BaseException | None = None
        try:
            return await call_next(ctx)
        except BaseException as exc:
            error = exc
            raise
        finally:
            self.log.debug(
                "rpc",
                side=self.side,
                service=ctx.service,
                method=ctx.method,
                peer=ctx.peer,
                caller=ctx.caller or None,
                attempt=ctx.attempt,
                duration_ms=round((time.perf_counter() - start) * 1000, 3),
                status=status_label(error, ctx),
                error=str(error) if error is not None else None,
            )
