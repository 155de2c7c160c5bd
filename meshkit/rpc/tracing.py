"""The tracing stage: calls a tracer hook around each call.

``meshkit.rpc`` knows nothing of any tracing library; ``meshkit.tracing``
provides the OpenTelemetry hook. A hook opens a span (or anything) at the start
of a call and closes it at the end; on the client it injects the propagation
headers into ``ctx.headers``, on the server it extracts them.
"""

from __future__ import annotations

from typing import Any, Protocol

from .context import CallContext
from .pipeline import HookStage


class TracerHook(Protocol):
    def start_client(self, ctx: CallContext) -> Any:
        """Open the client span and inject propagation headers; return a handle.

        ``None`` means nothing was opened: ``end`` is then not called.
        """
        ...

    def start_server(self, ctx: CallContext) -> Any:
        """Extract the caller's context, open the server span and make it current.

        ``None`` means nothing was opened: ``end`` is then not called.
        """
        ...

    def end(self, handle: Any, ctx: CallContext, error: BaseException | None) -> None:
        """Close what ``start_*`` opened (in the same task)."""
        ...


class Tracing(HookStage):
    """Run a :class:`TracerHook` around the rest of the chain."""

    name = "tracing"

    def __init__(self, hook: TracerHook, side: str) -> None:
        self.hook = hook
        self.side = side
        if type(self).enter is Tracing.enter:  # not overridden by a subclass
            # The hook's own start is the enter: one Python call fewer on every call.
            self.enter = hook.start_client if side == "client" else hook.start_server  # type: ignore[method-assign]

    def enter(self, ctx: CallContext) -> Any:
        """Replaced per instance by the hook's ``start_client`` or ``start_server``."""
        return self.hook.start_client(ctx) if self.side == "client" else self.hook.start_server(ctx)

    def exit(self, ctx: CallContext, token: Any, error: BaseException | None) -> None:
        self.hook.end(token, ctx, error)


class AttemptTracing(HookStage):
    """Run the hook's optional ``start_attempt`` around retries and hedges (attempt ≥ 1).

    Placed just before the pick stage (each attempt picks anew). Attempt 0 opens
    nothing: it travels on the span opened by :class:`Tracing`. It enters inside the
    attempt's coroutine, so a hedge's own task (not the caller's) holds its span.
    """

    name = "attempt-tracing"
    retries_only = True  # the first attempt travels on the call's span

    def __init__(self, hook: TracerHook) -> None:
        self.hook = hook
        self._start = getattr(hook, "start_attempt", None)

    def enter(self, ctx: CallContext) -> Any:
        if ctx.attempt == 0 or self._start is None:
            return None
        return self._start(ctx)

    def exit(self, ctx: CallContext, token: Any, error: BaseException | None) -> None:
        self.hook.end(token, ctx, error)
