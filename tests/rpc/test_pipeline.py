"""Pipeline composition: hook-form stages fused into one coroutine behave as nested ones."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from meshkit.rpc.context import CallContext
from meshkit.rpc.pipeline import HookStage, LoopStage, Next, Pipeline


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


class Repeat(LoopStage):
    """Runs the rest again up to ``times`` more times (after ``delay`` seconds) on ValueError."""

    def __init__(self, name: str, log: list[str], times: int, delay: float = 0.0) -> None:
        self.name = name
        self.log = log
        self.times = times
        self.delay = delay

    def enter(self, ctx: CallContext) -> Any:
        self.log.append(f"enter {self.name}")
        return [self.times]

    def again(self, ctx: CallContext, token: Any, error: Exception) -> float | None:
        self.log.append(f"again {self.name} {type(error).__name__}")
        if token[0] == 0 or not isinstance(error, ValueError):
            return None
        token[0] -= 1
        return self.delay

    def exit(self, ctx: CallContext, token: Any, error: BaseException | None) -> None:
        self.log.append(f"exit {self.name} {type(error).__name__ if error else 'ok'}")


def flaky(log: list[str], failures: int, error: type[BaseException] = ValueError) -> Next:
    """A terminal that raises ``error`` ``failures`` times, then answers."""
    left = [failures]

    async def call(ctx: CallContext) -> str:
        log.append("terminal")
        if left[0]:
            left[0] -= 1
            raise error("not yet")
        return "result"

    return call


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "standalone"])
async def test_a_loop_stage_runs_the_inner_stages_again(fused: bool) -> None:
    log: list[str] = []
    a, r, b = Recorder("a", log), Repeat("r", log, times=2), Recorder("b", log)
    terminal = flaky(log, 2)
    if fused:
        assert await Pipeline([a, r, b], terminal, terminal_name="t")(ctx()) == "result"
    else:  # each stage called as a plain middleware

        async def run_b(c: CallContext) -> Any:
            return await b(c, terminal)

        async def run_r(c: CallContext) -> Any:
            return await r(c, run_b)

        assert await a(ctx(), run_r) == "result"
    attempt_failed = ["enter b", "terminal", "exit b token ValueError", "again r ValueError"]
    assert log == [
        "enter a",
        "enter r",
        *attempt_failed,
        *attempt_failed,
        "enter b",
        "terminal",
        "exit b token ok",
        "exit r ok",
        "exit a token ok",
    ]


async def test_a_loop_stage_gives_up_with_the_last_error() -> None:
    log: list[str] = []
    stages = [Recorder("a", log), Repeat("r", log, times=1), Recorder("b", log)]
    pipeline = Pipeline(stages, flaky(log, 5), terminal_name="t")
    with pytest.raises(ValueError, match="not yet"):
        await pipeline(ctx())
    assert log.count("terminal") == 2
    assert log[-3:] == ["again r ValueError", "exit r ValueError", "exit a token ValueError"]


async def test_a_loop_stage_is_not_asked_about_cancellation() -> None:
    log: list[str] = []
    stages = [Repeat("r", log, times=3), Recorder("b", log)]
    pipeline = Pipeline(stages, flaky(log, 1, asyncio.CancelledError), terminal_name="t")
    with pytest.raises(asyncio.CancelledError):
        await pipeline(ctx())
    assert log == [
        "enter r",
        "enter b",
        "terminal",
        "exit b token CancelledError",
        "exit r CancelledError",
    ]


async def test_cancellation_during_the_backoff_reaches_the_exits_once() -> None:
    log: list[str] = []
    stages = [Recorder("a", log), Repeat("r", log, times=3, delay=60), Recorder("b", log)]
    pipeline = Pipeline(stages, flaky(log, 1), terminal_name="t")
    task = asyncio.ensure_future(pipeline(ctx()))
    while "again r ValueError" not in log:
        await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert log == [
        "enter a",
        "enter r",
        "enter b",
        "terminal",
        "exit b token ValueError",
        "again r ValueError",
        "exit r CancelledError",
        "exit a token CancelledError",
    ]


async def test_an_inner_exit_that_raises_is_a_failed_run() -> None:
    log: list[str] = []
    stages = [Repeat("r", log, times=1), Recorder("b", log, fail_exit=True)]
    pipeline = Pipeline(stages, flaky(log, 0), terminal_name="t")
    with pytest.raises(KeyError):
        await pipeline(ctx())
    # b's exit failed once per run; the loop was asked (and declined: not a ValueError).
    assert log == [
        "enter r",
        "enter b",
        "terminal",
        "exit b token ok",
        "again r KeyError",
        "exit r KeyError",
    ]


async def test_two_loop_stages_nest() -> None:
    log: list[str] = []
    stages = [Repeat("outer", log, times=1), Repeat("inner", log, times=1)]
    pipeline = Pipeline(stages, flaky(log, 3), terminal_name="t")
    assert await pipeline(ctx()) == "result"
    assert log.count("terminal") == 4
    assert log[-2:] == ["exit inner ok", "exit outer ok"]


async def test_an_exit_raising_from_none_is_not_chained() -> None:
    class Replace(HookStage):
        def enter(self, ctx: CallContext) -> Any:
            return True

        def exit(self, ctx: CallContext, token: Any, error: BaseException | None) -> None:
            raise LookupError("replaced") from None

    pipeline = Pipeline([Replace()], flaky([], 1), terminal_name="t")
    with pytest.raises(LookupError) as caught:
        await pipeline(ctx())
    assert caught.value.__suppress_context__
    assert caught.value.__cause__ is None


async def test_a_retries_only_stage_is_skipped_on_the_first_attempt() -> None:
    class Counting(Repeat):
        def again(self, ctx: CallContext, token: Any, error: Exception) -> float | None:
            delay = super().again(ctx, token, error)
            if delay is not None:
                ctx.attempt += 1
            return delay

    class AttemptsOnly(Recorder):
        retries_only = True

        def enter(self, ctx: CallContext) -> Any:
            self.log.append(f"asked {self.name}")  # the fused chain does not ask on attempt 0
            return super().enter(ctx) if ctx.attempt else None

    log: list[str] = []
    stages = [Counting("r", log, times=1), AttemptsOnly("b", log)]
    pipeline = Pipeline(stages, flaky(log, 1), terminal_name="t")
    assert await pipeline(ctx()) == "result"
    assert log == [
        "enter r",
        "terminal",
        "again r ValueError",
        "asked b",
        "enter b",
        "terminal",
        "exit b token ok",
        "exit r ok",
    ]


async def test_the_server_deadline_cancels_the_task_that_runs_it() -> None:
    # A middleware before the deadline stage may run the rest of the chain in a task of
    # its own (wait_for on 3.11, shield): that task is the one to cancel.
    from meshkit.errors import DeadlineExceeded
    from meshkit.rpc.context import TIMEOUT_KEY
    from meshkit.rpc.deadline import ServerDeadline

    class WaitFor:
        name = "wait_for"

        async def __call__(self, ctx: CallContext, call_next: Next) -> Any:
            return await asyncio.wait_for(call_next(ctx), 30)

    async def slow(ctx: CallContext) -> None:
        await asyncio.sleep(30)

    pipeline = Pipeline([WaitFor(), ServerDeadline()], slow, terminal_name="t")
    call = CallContext("svc", "method", headers={TIMEOUT_KEY: "50"})
    with pytest.raises(DeadlineExceeded, match="ran out"):
        await asyncio.wait_for(pipeline(call), 10)
