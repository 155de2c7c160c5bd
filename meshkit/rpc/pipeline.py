"""Middleware chains: one signature for every concern, composed by a builder.

A middleware is any async callable ``mw(ctx, call_next)`` that returns the
call's result (or raises). ``call_next(ctx)`` runs the rest of the chain. Give
it a ``name`` attribute to make :meth:`Pipeline.describe` read well.

A stage that only needs to act before the rest of the chain and after it (count,
time, label, pick) can take the *hook form* instead: subclass :class:`HookStage`
and write ``enter(ctx) -> token`` and ``exit(ctx, token, error)``. The pipeline
runs consecutive hook stages in one coroutine frame, so each costs two plain
calls per call instead of a coroutine of its own; calling a hook stage directly
as a middleware still works. A stage that runs the rest of the chain again (retries)
is a :class:`LoopStage`: a hook stage with ``again(ctx, token, error) -> delay``.
"""

from __future__ import annotations

import asyncio
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
    #: A promise that ``enter`` returns ``None`` on a call's first attempt
    #: (``ctx.attempt == 0``): the fused chain then skips the call to it.
    retries_only = False

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
            result = await self._run_rest(ctx, token, call_next)
        except BaseException as exc:
            if token is not None:
                self.exit(ctx, token, exc)
            raise
        if token is not None:
            self.exit(ctx, token, None)
        return result

    async def _run_rest(self, ctx: CallContext, token: Any, call_next: Next) -> Any:
        return await call_next(ctx)


class LoopStage(HookStage):
    """A hook stage that may run the rest of the chain again: retries.

    When the rest of the chain raised an :class:`Exception` (cancellation goes straight
    through), ``again(ctx, token, error)`` decides: the seconds to wait before running
    the rest again (``0``: at once), or ``None`` to let ``error`` through. ``again``
    may raise to fail the call with another error. ``exit`` runs once, with the final
    outcome; a ``None`` token from ``enter`` means neither ``again`` nor ``exit`` runs.
    The stages after this one enter and exit once per run.
    """

    name = "loop"

    def again(self, ctx: CallContext, token: Any, error: Exception) -> float | None:
        """Seconds to wait before running the rest of the chain again, or ``None``."""
        return None

    async def _run_rest(self, ctx: CallContext, token: Any, call_next: Next) -> Any:
        while True:
            try:
                return await call_next(ctx)
            except Exception as exc:
                delay = self.again(ctx, token, exc) if token is not None else None
                if delay is None:
                    raise
                if delay > 0:
                    await asyncio.sleep(delay)


def middleware_name(mw: object) -> str:
    name = getattr(mw, "name", None)
    if isinstance(name, str):
        return name
    return getattr(mw, "__name__", type(mw).__name__)


class Pipeline:
    """An ordered chain of middlewares ending in a terminal handler.

    The chain is composed once: each middleware costs one await per call, and a run
    of consecutive :class:`HookStage` middlewares (with at most one :class:`LoopStage`)
    costs one await in all.
    """

    def __init__(self, middlewares: Iterable[Middleware], terminal: Next, *, terminal_name: str):
        self.middlewares: tuple[Middleware, ...] = tuple(middlewares)
        self.terminal = terminal
        self.terminal_name = terminal_name
        handler = terminal
        hooks: list[HookStage] = []  # a run of hook stages, innermost first
        for mw in reversed(self.middlewares):
            if isinstance(mw, HookStage):
                if isinstance(mw, LoopStage) and any(isinstance(h, LoopStage) for h in hooks):
                    handler = _fuse(hooks[::-1], handler)  # one loop per fused run
                    hooks = []
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

    @property
    def entry(self) -> Next:
        """The composed chain as one callable (what calling the pipeline runs)."""
        return self._entry

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


def _has_exit(hook: HookStage) -> bool:
    return type(hook).exit is not HookStage.exit or "exit" in getattr(hook, "__dict__", ())


def _fuse(hooks: Sequence[HookStage], call_next: Next) -> Next:
    """One coroutine running ``hooks`` (outermost first) around ``call_next``.

    The coroutine is generated for the shape of the run (how many stages, which one
    loops, which have an ``exit``), with each token in a local variable: a loop over
    the stages with a list of tokens measured slower than the separate coroutines it
    replaces. Tokens start as ``None`` and go back to ``None`` once exited, so a stage
    that never entered (an earlier ``enter`` raised) or already exited is skipped.
    """
    loops = [i for i, h in enumerate(hooks) if isinstance(h, LoopStage)]
    assert len(loops) <= 1, "one loop stage per fused run"
    shape = (
        len(hooks),
        loops[0] if loops else -1,
        tuple(_has_exit(h) for h in hooks),
        tuple(h.retries_only for h in hooks),
    )
    code = _FUSED_CODE.get(shape)
    if code is None:
        code = _FUSED_CODE[shape] = compile(
            _fused_source(*shape), f"<meshkit fused {len(hooks)} stages>", "exec"
        )
    namespace: dict[str, Any] = {}
    exec(code, {"_unwind": _unwind, "_sleep": asyncio.sleep}, namespace)
    args: list[Any] = []
    for h in hooks:
        args += [h.enter, h.exit]
    again = hooks[loops[0]].again if loops else None  # type: ignore[attr-defined]
    stages: Next = namespace["make"](call_next, again, *args)
    stages.__name__ = "+".join(middleware_name(h) for h in hooks)
    return stages


_FUSED_CODE: dict[tuple[int, int, tuple[bool, ...], tuple[bool, ...]], Any] = {}


def _fused_source(
    n: int, loop: int, exits: tuple[bool, ...], retries_only: tuple[bool, ...]
) -> str:
    """The source of ``make(call_next, again, e0, x0, …)`` returning the fused coroutine.

    Stages ``0..loop`` enter once; stages after ``loop`` (all of them when ``loop`` is
    -1 and there is no loop) enter and exit once per run of the rest of the chain. An
    error that an exit put in place of another is raised outside any ``except`` block
    (from ``replaced``), so Python keeps the chain ``_unwind`` built.
    """
    outer = range(n) if loop < 0 else range(loop + 1)
    inner = range(loop + 1, n) if loop >= 0 else range(0)

    def pairs(stages: Iterable[int]) -> str:  # (exit, token) pairs as a tuple literal
        return "(" + "".join(f"(x{i}, t{i}), " for i in stages if exits[i]) + ")"

    def enter(i: int) -> str:
        call = f"e{i}(ctx)"
        if retries_only[i]:
            call = f"{call} if ctx.attempt else None"
        keep = exits[i] or i == loop
        return f"t{i} = {call}" if keep else call

    tokens = [f"t{i}" for i in range(n) if exits[i] or i == loop]
    lines = [
        f"def make(call_next, again, {', '.join(f'e{i}, x{i}' for i in range(n))}):",
        "    async def stages(ctx):",
        f"        {' = '.join([*tokens, 'replaced'])} = None",
        "        try:",
        *(f"            {enter(i)}" for i in outer),
    ]
    if loop < 0:
        lines.append("            result = await call_next(ctx)")
    else:
        lines += [
            "            while True:",
            "                try:",
            *(f"                    {enter(i)}" for i in inner),
            "                    result = await call_next(ctx)",
        ]
        for i in reversed(inner):
            if exits[i]:
                lines += [
                    f"                    if t{i} is not None:",
                    f"                        token, t{i} = t{i}, None",
                    f"                        x{i}(ctx, token, None)",
                ]
        lines += [
            "                    break",
            "                except BaseException as exc:",
            f"                    failed = _unwind({pairs(inner)}, ctx, exc)",
        ]
        inner_tokens = [f"t{i}" for i in inner if exits[i]]
        if inner_tokens:
            lines.append(f"                    {' = '.join(inner_tokens)} = None")
        # The loop's decision is made outside the except block, so an error raised by
        # again() (or the failure itself) keeps the chain as nested stages would.
        lines += [
            f"                    if failed is exc and (t{loop} is None"
            " or not isinstance(exc, Exception)):",
            "                        raise",
            f"                if t{loop} is None or not isinstance(failed, Exception):",
            "                    replaced = failed",
            "                    break",
            "                try:",
            f"                    delay = again(ctx, t{loop}, failed)",
            "                except BaseException as exc:",
            "                    if exc is not failed:",
            "                        exc.__context__ = failed",
            "                    replaced = exc",
            "                    break",
            "                if delay is None:",
            "                    replaced = failed",
            "                    break",
            "                failed = None",
            "                if delay > 0:",
            "                    await _sleep(delay)",
            "            if replaced is not None:",
            "                raise replaced",
        ]

    def unwound(indent: str, stages: Iterable[int]) -> list[str]:
        """Exit ``stages`` with ``exc``; re-raise it, or raise what replaced it outside
        the except block."""
        return [
            f"{indent}except BaseException as exc:",
            f"{indent}    error = _unwind({pairs(stages)}, ctx, exc)",
            f"{indent}    if error is exc:",
            f"{indent}        raise",
            f"{indent}    replaced = error",
            f"{indent}if replaced is not None:",
            f"{indent}    raise replaced",
        ]

    lines += unwound(" " * 8, range(n))
    for i in reversed(outer):
        if exits[i]:
            lines += [
                f"        if t{i} is not None:",
                "            try:",
                f"                x{i}(ctx, t{i}, None)",
                *unwound(" " * 12, range(i)),
            ]
    lines += ["        return result", "    return stages", ""]
    return "\n".join(lines)


def _unwind(
    entered: tuple[tuple[Callable[[CallContext, Any, BaseException | None], None], Any], ...],
    ctx: CallContext,
    error: BaseException,
) -> BaseException:
    """Exit the ``(exit, token)`` pairs (innermost last in the tuple, exited first) with
    ``error``; the error to raise (an exit may replace it).

    Called while the caller handles ``error``: Python then links anything an exit
    raises to that first error. The chain is set as nested stages would have it: a
    replacement follows the error it replaced, and an exit that re-raises the error it
    was given changes nothing.
    """
    handled = error
    for exit_, token in reversed(entered):
        if token is not None:
            context = error.__context__
            try:
                exit_(ctx, token, error)
            except BaseException as exc:
                if exc is error:  # re-raised as given: not a replacement
                    error.__context__ = context
                    continue
                if exc.__context__ is handled or exc.__context__ is None:
                    exc.__context__ = error
                error = exc
    return error
