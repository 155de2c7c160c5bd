"""Middleware chains: one signature for every concern, composed by a builder.

A middleware is any async callable ``mw(ctx, call_next)`` that returns the
call's result (or raises). ``call_next(ctx)`` runs the rest of the chain. Give
it a ``name`` attribute to make :meth:`Pipeline.describe` read well.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

from .context import CallContext

Next = Callable[[CallContext], Awaitable[Any]]


class Middleware(Protocol):
    """``async def __call__(ctx, call_next) -> result``."""

    def __call__(self, ctx: CallContext, call_next: Next, /) -> Awaitable[Any]: ...


def middleware_name(mw: object) -> str:
    name = getattr(mw, "name", None)
    if isinstance(name, str):
        return name
    return getattr(mw, "__name__", type(mw).__name__)


class Pipeline:
    """An ordered chain of middlewares ending in a terminal handler.

    The chain is composed once; calling the pipeline costs one await per stage.
    """

    def __init__(self, middlewares: Iterable[Middleware], terminal: Next, *, terminal_name: str):
        self.middlewares: tuple[Middleware, ...] = tuple(middlewares)
        self.terminal = terminal
        self.terminal_name = terminal_name
        handler = terminal
        for mw in reversed(self.middlewares):
            handler = _bind(mw, handler)
        self._entry = handler

    def __call__(self, ctx: CallContext) -> Awaitable[Any]:
        return self._entry(ctx)

    def names(self) -> list[str]:
        return [middleware_name(mw) for mw in self.middlewares] + [self.terminal_name]

    def describe(self) -> str:
        """The chain as text, e.g. ``deadline → tracing → metrics → transport``."""
        return " → ".join(self.names())

    def __repr__(self) -> str:
        return f"Pipeline({self.describe()})"


def _bind(mw: Middleware, call_next: Next) -> Next:
    def stage(ctx: CallContext) -> Awaitable[Any]:
        return mw(ctx, call_next)

    stage.__name__ = middleware_name(mw)
    return stage
