"""The tracing stage: calls a tracer hook around each call.

``meshkit.rpc`` knows nothing of any tracing library; ``meshkit.tracing``
provides the OpenTelemetry hook. A hook opens a span (or anything) at the start
of a call and closes it at the end; on the client it injects the propagation
headers into ``ctx.headers``, on the server it extracts them.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, Protocol

from .context import CallContext
from .pipeline import Next


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


class Tracing:
    """Run a :class:`TracerHook` around the rest of the chain."""

    name = "tracing"

    def __init__(self, hook: TracerHook, side: str) -> None:
        self.hook = hook
        self._start = hook.start_client if side == "client" else hook.start_server

    def __call__(self, ctx: CallContext, call_next: Next) -> Awaitable[Any]:
        handle = self._start(ctx)
        if handle is None:
            # Nothing opened (no SDK, nothing to carry on): hand back the rest of the
            # chain rather than await it in a coroutine frame of our own.
            return call_next(ctx)
        return self._around(handle, ctx, call_next)

    async def _around(self, handle: Any, ctx: CallContext, call_next: Next) -> Any:
        try:
            result = await call_next(ctx)
        except BaseException as exc:
            self.hook.end(handle, ctx, exc)
            raise
        self.hook.end(handle, ctx, None)
        return result


class AttemptTracing:
    """Run the hook's optional ``start_attempt`` around retries and hedges (attempt ≥ 1).

    Placed just before the pick stage (each attempt picks anew). Attempt 0 passes straight
    through (it travels on the span opened by :class:`Tracing`): the common call pays one
    await.
    """

    name = "attempt-tracing"

    def __init__(self, hook: TracerHook) -> None:
        self.hook = hook
        self._start = getattr(hook, "start_attempt", None)

    def __call__(self, ctx: CallContext, call_next: Next) -> Awaitable[Any]:
        if ctx.attempt == 0 or self._start is None:
            return call_next(ctx)  # no coroutine frame of its own for attempt 0
        return self._attempt(ctx, call_next)

    async def _attempt(self, ctx: CallContext, call_next: Next) -> Any:
        # Started inside the coroutine: a hedge runs it in its own task, whose context
        # (not the caller's) must receive the attempt's span.
        assert self._start is not None
        handle = self._start(ctx)
        try:
            result = await call_next(ctx)
        except BaseException as exc:
            self.hook.end(handle, ctx, exc)
            raise
        self.hook.end(handle, ctx, None)
        return result
