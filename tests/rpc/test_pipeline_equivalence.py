"""Fused hook stages behave exactly as the same stages nested one by one.

Random chains of hook stages and at most one loop stage, where any enter, exit,
``again`` or the terminal may fail (with an Exception or a BaseException), re-raise,
or open nothing, run twice: fused by :class:`Pipeline` and nested as plain
middlewares. The order of enters/exits, the outcome and the exception chain must match.
"""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest

from meshkit.rpc.context import CallContext
from meshkit.rpc.pipeline import HookStage, LoopStage, Next, Pipeline, _bind

Plan = dict[str, list[Any]]


class Failure(Exception):
    pass


class Fatal(BaseException):
    pass


def act(action: Any, what: str, error: BaseException | None = None) -> None:
    if action == "exc":
        raise Failure(what)
    if action == "base":
        raise Fatal(what)
    if action == "reraise" and error is not None:
        raise error


class Hook(HookStage):
    def __init__(self, name: str, log: list[str], plan: Plan) -> None:
        self.name, self.log, self.plan = name, log, plan

    def enter(self, ctx: CallContext) -> Any:
        self.log.append(f"enter {self.name} attempt {ctx.attempt}")
        action = self.plan["enter"].pop(0) if self.plan["enter"] else None
        act(action, f"enter {self.name}")
        return None if action == "none" else f"token {self.name}"

    def exit(self, ctx: CallContext, token: Any, error: BaseException | None) -> None:
        self.log.append(f"exit {self.name} {token} {type(error).__name__ if error else 'ok'}")
        act(self.plan["exit"].pop(0) if self.plan["exit"] else None, f"exit {self.name}", error)


class Loop(LoopStage):
    def __init__(self, name: str, log: list[str], plan: Plan) -> None:
        self.name, self.log, self.plan = name, log, plan

    def enter(self, ctx: CallContext) -> Any:
        self.log.append(f"enter {self.name}")
        action = self.plan["enter"].pop(0) if self.plan["enter"] else None
        act(action, "loop enter")
        return None if action == "none" else "loop"

    def again(self, ctx: CallContext, token: Any, error: Exception) -> float | None:
        self.log.append(f"again {type(error).__name__}")
        action = self.plan["again"].pop(0) if self.plan["again"] else None
        act(action, "again")
        if action is None:
            return None
        ctx.attempt += 1
        return float(action)

    def exit(self, ctx: CallContext, token: Any, error: BaseException | None) -> None:
        self.log.append(f"exit {self.name} {type(error).__name__ if error else 'ok'}")
        act(self.plan["exit"].pop(0) if self.plan["exit"] else None, "loop exit")


def random_chain(seed: int) -> tuple[list[tuple[str, Plan]], list[str]]:
    r = random.Random(seed)
    n = r.randint(1, 5)
    loop_at = r.choice([-1, *range(n)])
    specs: list[tuple[str, Plan]] = []
    for i in range(n):
        if i == loop_at:
            plan = {
                "enter": [r.choice([None, None, None, "exc", "none"])],
                "again": [r.choice([0, 0, 0.0005, None, "exc"]) for _ in range(3)],
                "exit": [r.choice([None, None, "exc"])],
            }
            specs.append(("loop", plan))
        else:
            plan = {
                "enter": [r.choice([None] * 6 + ["exc", "base", "none"]) for _ in range(4)],
                "exit": [r.choice([None] * 6 + ["exc", "base", "reraise"]) for _ in range(4)],
            }
            specs.append(("hook", plan))
    return specs, [r.choice(["ok", "exc", "exc", "base"]) for _ in range(4)]


def build(
    specs: list[tuple[str, Plan]], outcomes: list[str], log: list[str]
) -> tuple[list[Any], Next]:
    stages = [
        (Loop if kind == "loop" else Hook)(f"s{i}", log, copy.deepcopy(plan))
        for i, (kind, plan) in enumerate(specs)
    ]
    left = list(outcomes)

    async def terminal(ctx: CallContext) -> str:
        outcome = left.pop(0) if left else "ok"
        log.append(f"terminal {outcome}")
        act(outcome, "terminal")
        return "result"

    return stages, terminal


def chain(error: BaseException) -> list[str]:
    out: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        out.append(f"{type(current).__name__}({current})")
        current = current.__cause__ or (
            None if current.__suppress_context__ else current.__context__
        )
    return out


async def outcome(entry: Next) -> tuple[str, Any]:
    try:
        return "ok", await entry(CallContext("svc", "method"))
    except BaseException as error:
        return "error", chain(error)


@pytest.mark.parametrize("block", range(6))
async def test_fused_chains_match_nested_ones(block: int) -> None:
    for seed in range(block * 500, (block + 1) * 500):
        specs, outcomes = random_chain(seed)
        fused_log: list[str] = []
        stages, terminal = build(specs, outcomes, fused_log)
        fused = await outcome(Pipeline(stages, terminal, terminal_name="t"))
        nested_log: list[str] = []
        stages, terminal = build(specs, outcomes, nested_log)
        entry = terminal
        for stage in reversed(stages):
            entry = _bind(stage, entry)
        nested = await outcome(entry)
        assert (fused_log, fused) == (nested_log, nested), f"seed {seed}: {specs} {outcomes}"
