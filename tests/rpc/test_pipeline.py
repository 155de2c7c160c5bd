"""Pipeline composition: hook-form stages fused into one coroutine behave as nested ones."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from meshkit.rpc.context import CallContext
from meshkit.rpc.pipeline import HookStage, Next, Pipeline


class Recorder(HookStage):
    """Logs enter/exit into a shared list; optionally fails or opens nothing."""

    def __init__(
        self,
        name: str,
        log: list[str],
        *,
        fail_enter: bool = False,
        fail_exit: bool = False,
        token: Any = "token",
    ) -> None:
        self.name = name
        self.log = log
        self.fail_enter = fail_enter
        self.fail_exit = fail_exit
        self.token = token

    def enter(self, ctx: CallContext) -> Any:
        self.log.append(f"enter {self.name}")
        if self.fail_enter:
            raise ValueError(f"{self.name} refused")
        return self.token

    def exit(self, ctx: CallContext, token: Any, error: BaseException | None) -> None:
        self.log.append(f"exit {self.name} {token} {type(error).__name__ if error else 'ok'}")
        if self.fail_exit:
            raise KeyError(self.name)


class Plain:
    """An ordinary coroutine middleware, to break a run of hooks."""

    name = "plain"

    def __init__(self, log: list[str]) -> None:
        self.log = log

    async def __call__(self, ctx: CallContext, call_next: Next) -> Any:
        self.log.append("enter plain")
        try:
            return await call_next(ctx)
        finally:
            self.log.append("exit plain")


def terminal(log: list[str], *, fail: bool = False) -> Next:
    async def call(ctx: CallContext) -> str:
        log.append("terminal")
        if fail:
            raise RuntimeError("terminal failed")
        return "result"

    return call


def ctx() -> CallContext:
    return CallContext("svc", "method")


async def test_hooks_enter_in_order_and_exit_in_reverse() -> None:
    log: list[str] = []
    stages = [Recorder("a", log), Recorder("b", log), Plain(log), Recorder("c", log)]
    pipeline = Pipeline(stages, terminal(log), terminal_name="t")
    assert await pipeline(ctx()) == "result"
    assert log == [
        "enter a",
        "enter b",
        "enter plain",
        "enter c",
        "terminal",
        "exit c token ok",
        "exit plain",
        "exit b token ok",
        "exit a token ok",
    ]
    assert pipeline.describe() == "a → b → plain → c → t"


async def test_a_none_token_skips_exit() -> None:
    log: list[str] = []
    pipeline = Pipeline(
        [Recorder("a", log), Recorder("b", log, token=None)], terminal(log), terminal_name="t"
    )
    await pipeline(ctx())
    assert log == ["enter a", "enter b", "terminal", "exit a token ok"]


async def test_failure_of_the_rest_reaches_every_exit() -> None:
    log: list[str] = []
    pipeline = Pipeline(
        [Recorder("a", log), Recorder("b", log)], terminal(log, fail=True), terminal_name="t"
    )
    with pytest.raises(RuntimeError, match="terminal failed"):
        await pipeline(ctx())
    assert log[-2:] == ["exit b token RuntimeError", "exit a token RuntimeError"]


async def test_an_enter_that_raises_exits_only_the_stages_entered_before() -> None:
    log: list[str] = []
    stages = [Recorder("a", log), Recorder("b", log, fail_enter=True), Recorder("c", log)]
    pipeline = Pipeline(stages, terminal(log), terminal_name="t")
    with pytest.raises(ValueError, match="b refused"):
        await pipeline(ctx())
    assert log == ["enter a", "enter b", "exit a token ValueError"]


async def test_an_exit_that_raises_replaces_the_outcome_for_outer_stages() -> None:
    log: list[str] = []
    stages = [Recorder("a", log), Recorder("b", log, fail_exit=True), Recorder("c", log)]
    pipeline = Pipeline(stages, terminal(log), terminal_name="t")
    with pytest.raises(KeyError) as caught:
        await pipeline(ctx())
    assert log[-3:] == ["exit c token ok", "exit b token ok", "exit a token KeyError"]
    assert caught.value.args == ("b",)


async def test_an_exit_that_raises_on_the_error_path_is_chained() -> None:
    log: list[str] = []
    stages = [Recorder("a", log), Recorder("b", log, fail_exit=True)]
    pipeline = Pipeline(stages, terminal(log, fail=True), terminal_name="t")
    with pytest.raises(KeyError) as caught:
        await pipeline(ctx())
    assert isinstance(caught.value.__cause__ or caught.value.__context__, RuntimeError)
    assert log[-1] == "exit a token KeyError"


async def test_cancellation_reaches_the_exits() -> None:
    log: list[str] = []
    started = asyncio.Event()

    async def hang(ctx: CallContext) -> None:
        started.set()
        await asyncio.sleep(60)

    pipeline = Pipeline([Recorder("a", log), Recorder("b", log)], hang, terminal_name="t")
    task = asyncio.ensure_future(pipeline(ctx()))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert log[-2:] == ["exit b token CancelledError", "exit a token CancelledError"]


async def test_a_hook_stage_works_as_a_plain_middleware() -> None:
    log: list[str] = []
    stage = Recorder("a", log)
    assert await stage(ctx(), terminal(log)) == "result"
    assert log == ["enter a", "terminal", "exit a token ok"]


async def test_many_hooks_fuse() -> None:
    log: list[str] = []
    stages = [Recorder(str(i), log) for i in range(12)]
    pipeline = Pipeline(stages, terminal(log), terminal_name="t")
    assert await pipeline(ctx()) == "result"
    assert log[:12] == [f"enter {i}" for i in range(12)]
    assert log[13:] == [f"exit {i} token ok" for i in reversed(range(12))]
