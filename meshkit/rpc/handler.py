"""The server's method table, decode stage and handler stage.

``MethodTable`` maps each IDL method to the user's implementation. Handlers may
be ``async def`` (run on the event loop) or plain ``def`` (run in a bounded
thread pool with the caller's context variables, so deadlines and trace context
follow the call into the thread).
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from thriftpy2.thrift import TApplicationException

from ..errors import InvalidArgument, MeshkitError, Unimplemented
from .context import CallContext
from .pipeline import HookStage


@dataclass(slots=True)
class MethodSpec:
    """What the server needs to know about one IDL method."""

    name: str
    args_cls: type
    result_cls: type
    arg_names: tuple[str, ...]
    oneway: bool
    has_success: bool
    exception_fields: tuple[tuple[str, type], ...]
    func: Callable[..., Any] | None = None
    is_async: bool = False


def method_specs(service: Any) -> dict[str, MethodSpec]:
    """Read the methods of a thriftpy2 service class (e.g. ``echo_thrift.Echo``)."""
    names = getattr(service, "thrift_services", None)
    if names is None:
        raise InvalidArgument(
            f"expected a thriftpy2 service (e.g. thriftpy2.load(...).Echo), found {service!r}"
        )
    specs: dict[str, MethodSpec] = {}
    for name in names:
        args_cls = getattr(service, f"{name}_args")
        result_cls = getattr(service, f"{name}_result")
        arg_names = tuple(args_cls.thrift_spec[k][1] for k in sorted(args_cls.thrift_spec))
        exception_fields = tuple(
            (spec[1], spec[2])
            for fid, spec in sorted(result_cls.thrift_spec.items())
            if fid != 0 and spec[1] != "success"
        )
        specs[name] = MethodSpec(
            name=name,
            args_cls=args_cls,
            result_cls=result_cls,
            arg_names=arg_names,
            oneway=bool(getattr(result_cls, "oneway", False)),
            has_success=0 in result_cls.thrift_spec,
            exception_fields=exception_fields,
        )
    return specs


class MethodTable:
    """The IDL methods of a service bound to an implementation object."""

    def __init__(self, service: Any, implementation: Any) -> None:
        self.service = service
        self.specs = method_specs(service)
        missing = [n for n in self.specs if not callable(getattr(implementation, n, None))]
        if missing:
            raise InvalidArgument(
                f"implementation {type(implementation).__name__} must define every IDL method of "
                f"{getattr(service, '__name__', service)}; missing: {', '.join(missing)}"
            )
        for name, spec in self.specs.items():
            func = getattr(implementation, name)
            spec.func = func
            spec.is_async = inspect.iscoroutinefunction(func)
        self.implementation = implementation

    def get(self, name: str) -> MethodSpec | None:
        return self.specs.get(name)

    def unknown_method(self, name: str) -> Unimplemented:
        known = ", ".join(sorted(self.specs))
        return Unimplemented(
            f"expected one of the methods of {getattr(self.service, '__name__', 'the service')} "
            f"({known}), found {name!r}"
        )


class Decode(HookStage):
    """First server stage: decode the argument struct of the message."""

    name = "decode"

    def __init__(self, table: MethodTable) -> None:
        self.table = table

    def enter(self, ctx: CallContext) -> None:
        spec = self.table.specs[ctx.method]
        args = spec.args_cls()
        try:
            ctx.raw.read_struct(args)
        except Exception as exc:
            raise InvalidArgument(
                f"could not decode the arguments of {ctx.method}: {type(exc).__name__}: {exc}"
            ) from None
        ctx.args = args
        ctx.raw = None


class Handler:
    """Last server stage: run the user's method and wrap its outcome in the result struct."""

    name = "handler"

    def __init__(self, table: MethodTable, executor: Executor | None) -> None:
        self.table = table
        self.executor = executor

    async def __call__(self, ctx: CallContext) -> Any:
        spec = self.table.specs[ctx.method]
        args = ctx.args
        values = [getattr(args, n) for n in spec.arg_names]
        func = spec.func
        assert func is not None
        try:
            if spec.is_async:
                value = await func(*values)
            else:
                loop = asyncio.get_running_loop()
                call_ctx = contextvars.copy_context()
                value = await loop.run_in_executor(self.executor, call_ctx.run, func, *values)
                if inspect.isawaitable(value):
                    value = await value
        except (MeshkitError, TApplicationException, asyncio.CancelledError):
            raise
        except Exception as exc:
            result = spec.result_cls()
            for field_name, exc_cls in spec.exception_fields:
                if isinstance(exc, exc_cls):
                    setattr(result, field_name, exc)
                    ctx.extras["app_error"] = type(exc).__name__
                    return result
            raise
        result = spec.result_cls()
        if spec.has_success:
            result.success = value
        return result
