"""Middleware chains: one signature for every concern, composed by a builder.

A middleware is any async callable ``mw(ctx, call_next)`` that returns the
call's result (or raises). ``call_next(ctx)`` runs the rest of the chain. Give
it a ``name`` attribute to make :meth:`Pipeline.describe` read well.

A stage that only needs to act before the rest of the chain and after it (count,
time, label, pick) can take the *hook form* instead: subclass :class:`HookStage`
and write ``enter(ctx) -> token`` and ``exit(ctx, token, error)``. The pipeline
runs consecutive hook stages in one coroutine frame, so each costs two plain
calls per call instead of a coroutine of its own; calling a hook stage directly
as a middleware still works.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Protocol

from .context import CallContext

Next = Callable[[CallContext], Awaitable[Any]]


class Middleware(Protocol):
    """``async def __call__(ctx, call_next) -> result``."""

    def __call__(self, ctx: CallContext, call_next: Next, /) -> Awaitable[Any]: ...


class HookStage:
    """A middleware in hook form: ``enter`` before the rest of the chain, ``exit`` after.

    ``enter(ctx)`` returns a token, or ``None`` when there is nothing to do afterwards
    (``exit`` is then not called). It may raise to fail the call; stages entered before
    it then exit with that error. ``exit(ctx, token, error)`` runs once the rest of the
    chain returned (``error`` ``None``) or raised; it must not raise, except to replace
    the call's outcome with a new error. Stages exit in reverse order of entry, as
    nested middlewares would. Both run in the caller's task and context.
    """

    name = "hook"

    def enter(self, ctx: CallContext) -> Any:
        """Act before the rest of the chain; a token for :meth:`exit`, or ``None``."""
        return None

    def exit(self, ctx: CallContext, token: Any, error: BaseException | None) -> None:
        """Act after the rest of the chain (``error`` is what it raised, if anything)."""
        return None

    async def __call__(self, ctx: CallContext, call_next: Next) -> Any:
        # Used on its own (outside a Pipeline): the same semantics as the fused form.
        token = self.enter(ctx)
        try:
            result = await call_next(ctx)
        except BaseException as exc:
            if token is not None:
                self.exit(ctx, token, exc)
            raise
        if token is not None:
            self.exit(ctx, token, None)
        return result


def middleware_name(mw: object) -> str:
    name = getattr(mw, "name", None)
    if isinstance(name, str):
        return name
    return getattr(mw, "__name__", type(mw).__name__)


class Pipeline:
    """An ordered chain of middlewares ending in a terminal handler.

    The chain is composed once: each middleware costs one await per call, and a run
    of consecutive :class:`HookStage` middlewares costs one await in all.
    """

    def __init__(self, middlewares: Iterable[Middleware], terminal: Next, *, terminal_name: str):
        self.middlewares: tuple[Middleware, ...] = tuple(middlewares)
        self.terminal = terminal
        self.terminal_name = terminal_name
        handler = terminal
        hooks: list[HookStage] = []  # a run of hook stages, innermost first
        for mw in reversed(self.middlewares):
            if isinstance(mw, HookStage):
                hooks.append(mw)
                continue
            if hooks:
                handler = _fuse(hooks[::-1], handler)
                hooks = []
            handler = _bind(mw, handler)
        if hooks:
            handler = _fuse(hooks[::-1], handler)
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


def _fuse(hooks: Sequence[HookStage], call_next: Next) -> Next:
    """One coroutine running ``hooks`` (outermost first) around ``call_next``.

    The coroutine is generated for the number of hooks, with each token in a local
    variable: a loop over the stages with a list of tokens measured slower than the
    separate coroutines it replaces. Tokens start as ``None``, so a stage that never
    entered (an earlier ``enter`` raised) is skipped like one with nothing to do.
    """
    n = len(hooks)
    code = _FUSED_CODE.get(n)
    if code is None:
        code = _FUSED_CODE[n] = compile(_fused_source(n), f"<meshkit fused {n} stages>", "exec")
    namespace: dict[str, Any] = {}
    exec(code, {"_unwind": _unwind}, namespace)
    hooks_args = [f for h in hooks for f in (h.enter, h.exit)]
    stages: Next = namespace["make"](call_next, *hooks_args)
    stages.__name__ = "+".join(middleware_name(h) for h in hooks)
    return stages


_FUSED_CODE: dict[int, Any] = {}


def _fused_source(n: int) -> str:
    """The source of ``make(call_next, e0, x0, …)`` returning the fused coroutine."""
    idx = range(n)

    def pairs(k: int) -> str:  # the first k (exit, token) pairs, as a tuple literal
        return "(" + "".join(f"(x{i}, t{i}), " for i in range(k)) + ")"

    lines = [
        f"def make(call_next, {', '.join(f'e{i}, x{i}' for i in idx)}):",
        "    async def stages(ctx):",
        f"        {' = '.join(f't{i}' for i in idx)} = None",
        "        try:",
        *(f"            t{i} = e{i}(ctx)" for i in idx),
        "            result = await call_next(ctx)",
        "        except BaseException as exc:",
        f"            error = _unwind({pairs(n)}, ctx, exc)",
        "            if error is exc:",
        "                raise",
        "            raise error from exc",
    ]
    for i in reversed(idx):
        lines += [
            f"        if t{i} is not None:",
            "            try:",
            f"                x{i}(ctx, t{i}, None)",
            "            except BaseException as exc:",
            f"                error = _unwind({pairs(i)}, ctx, exc)",
            "                if error is exc:",
            "                    raise",
            "                raise error from exc",
        ]
    lines += ["        return result", "    return stages", ""]
    return "\n".join(lines)


def _unwind(
    entered: tuple[tuple[Callable[[CallContext, Any, BaseException | None], None], Any], ...],
    ctx: CallContext,
    error: BaseException,
) -> BaseException:
    """Exit the ``(exit, token)`` pairs (innermost last in the tuple, exited first) with
    ``error``; the error to raise (an exit may replace it)."""
    for exit_, token in reversed(entered):
        if token is not None:
            try:
                exit_(ctx, token, error)
            except BaseException as exc:  # an exit replaced the outcome
                exc.__context__ = error
                error = exc
    return error
