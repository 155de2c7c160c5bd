"""The ``meshkit`` command line.

::

    meshkit run examples/echo/service.py:svc --port 9090      # serve a Service (like uvicorn)
    meshkit call echo echo --idl echo.thrift --arg message=hi  # one ad-hoc RPC, JSON out
    meshkit demo                                               # a small real system, locally
    meshkit version

Exit codes: 0 success; 1 the call or the service failed (an IDL exception, a
:class:`~meshkit.MeshkitError`, a service that could not start, an app that raised while
loading); 2 a usage error (bad ``module:attr``, module or attribute not found, not a
Service, unknown method or argument, a value of the wrong type); 130 interrupted (demo).

Nothing here prints environment variables or settings values that were not given on the
command line.
"""

from __future__ import annotations

import base64
import contextlib
import importlib
import importlib.util
import inspect
import json
import math
import os
import re
import sys
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import click

__all__ = ["cli", "load_service", "main"]

USAGE_ERROR = 2
FAILURE = 1


class CliUsageError(click.ClickException):
    """Reported as ``Error: <message>`` on stderr; exit code 2."""

    exit_code = USAGE_ERROR


class CliFailure(click.ClickException):
    """Reported as ``Error: <message>`` on stderr; exit code 1."""

    exit_code = FAILURE


def _fail(message: str, exit_code: int = FAILURE) -> NoReturn:
    raise (CliUsageError if exit_code == USAGE_ERROR else CliFailure)(message)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """meshkit: Python microservices on a Thrift service mesh."""


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``meshkit`` console script and ``python -m meshkit``."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="meshkit")


# -- meshkit version ---------------------------------------------------------------------


@cli.command()
def version() -> None:
    """Print the meshkit version."""
    from . import __version__

    click.echo(f"meshkit {__version__}")


# -- meshkit run ---------------------------------------------------------------------------

_IDENTIFIER_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _import_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        # Only "the module named on the command line (or a parent package) does not exist"
        # is a usage error; a missing import *inside* the module is the module's failure.
        missing = exc.name or ""
        if missing == name or name.startswith(missing + "."):
            _fail(
                f"cannot import module {name!r}: no module named {missing!r} "
                f"(searched the current directory and sys.path)",
                USAGE_ERROR,
            )
        raise


def _import_file(path_text: str) -> ModuleType:
    path = Path(path_text).expanduser()
    if not path.is_file():
        _fail(f"cannot load {path_text!r}: no such file", USAGE_ERROR)
    path = path.resolve()
    if path.suffix != ".py":
        _fail(f"expected a Python file (*.py), found {path_text!r}", USAGE_ERROR)
    stem = path.stem
    name = stem if stem.isidentifier() and stem not in sys.modules else None
    if name is None:
        name = "_meshkit_app_" + re.sub(r"\W", "_", stem)
    # Like ``python path/to/file.py``: the file's directory comes first on sys.path.
    directory = str(path.parent)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        _fail(f"cannot load {path_text!r} as a Python module", USAGE_ERROR)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _describe(obj: Any) -> str:
    kind = type(obj).__name__
    return f"{kind} {obj!r}" if len(repr(obj)) <= 60 else kind


def load_service(target: str, app_dir: str | None = ".") -> Any:
    """Load the :class:`~meshkit.Service` named by ``module:attr`` or ``path/file.py:attr``.

    ``attr`` may be dotted, and may name a zero-argument factory that returns a Service.
    ``app_dir`` is put first on ``sys.path`` (as uvicorn's ``--app-dir``). Raises
    :class:`click.ClickException` (exit code 2) for usage errors; exceptions raised by the module's
    own code propagate.
    """
    from .service import Service

    module_part, sep, attr = target.rpartition(":")
    is_file = module_part.endswith(".py") or "/" in module_part or os.sep in module_part
    if (
        not sep
        or not module_part
        or not _IDENTIFIER_PATH.fullmatch(attr)
        or (not is_file and not _IDENTIFIER_PATH.fullmatch(module_part))
    ):
        _fail(
            f"expected MODULE:ATTR (e.g. myapp.service:svc) or PATH.py:ATTR "
            f"(e.g. examples/echo/service.py:svc), found {target!r}",
            USAGE_ERROR,
        )
    if app_dir is not None:
        directory = os.path.abspath(app_dir)
        if directory not in sys.path:
            sys.path.insert(0, directory)
    module = _import_file(module_part) if is_file else _import_module(module_part)

    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            services = sorted(
                k for k, v in vars(module).items() if isinstance(v, Service) and k[:1] != "_"
            )
            hint = f"; Service objects in it: {', '.join(services)}" if services else ""
            _fail(f"module {module_part!r} has no attribute {attr!r}{hint}", USAGE_ERROR)
    if isinstance(obj, Service):
        return obj
    if callable(obj) and not isinstance(obj, type):
        try:
            inspect.signature(obj).bind()
        except TypeError:
            _fail(
                f"expected {target} to be a meshkit.Service or a zero-argument factory "
                f"returning one; found a callable that takes arguments",
                USAGE_ERROR,
            )
        except ValueError:
            pass  # no signature available (builtins): just try it
        result = obj()
        if isinstance(result, Service):
            return result
        _fail(
            f"expected the factory {target} to return a meshkit.Service, found {_describe(result)}",
            USAGE_ERROR,
        )
    _fail(
        f"expected {target} to be a meshkit.Service (or a zero-argument factory returning one), "
        f"found {_describe(obj)}",
        USAGE_ERROR,
    )


@cli.command()
@click.argument("app", metavar="MODULE:ATTR")
@click.option("--host", help="RPC listen address (overrides MESHKIT_HOST).")
@click.option(
    "--port", type=click.IntRange(0, 65535), help="RPC port, 0 for any (overrides MESHKIT_PORT)."
)
@click.option(
    "--health-port",
    type=click.IntRange(0, 65535),
    help="Health endpoint port, 0 for any (overrides MESHKIT_HEALTH_PORT).",
)
@click.option(
    "--registry",
    metavar="URL",
    help="Registry URL, e.g. local:///abs/dir (overrides MESHKIT_REGISTRY for the process).",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error", "critical"], case_sensitive=False),
    help="Log level (overrides MESHKIT_LOG_LEVEL).",
)
@click.option(
    "--app-dir",
    default=".",
    show_default=True,
    help="Directory put first on sys.path before importing MODULE.",
)
def run(
    app: str,
    host: str | None,
    port: int | None,
    health_port: int | None,
    registry: str | None,
    log_level: str | None,
    app_dir: str,
) -> None:
    """Serve the Service at MODULE:ATTR (or PATH.py:ATTR) until SIGTERM/SIGINT.

    ATTR is a meshkit.Service or a zero-argument factory returning one. The service
    serves RPC and health, registers, and on SIGTERM or Ctrl-C drains and exits 0 (1 when
    calls were cut off by MESHKIT_DRAIN_TIMEOUT or a second signal, or the stop came before
    the start completed). A second SIGTERM/Ctrl-C during the drain stops at once.
    """
    from .errors import MeshkitError

    if log_level is not None:
        os.environ["MESHKIT_LOG_LEVEL"] = log_level.upper()
    if registry is not None:
        from .registry import registry_from_url

        try:
            registry_from_url(registry)  # validates the URL; opens nothing
        except MeshkitError as exc:
            _fail(exc.message, USAGE_ERROR)
        # Clients created by the app (not only the Service) must see the same registry.
        os.environ["MESHKIT_REGISTRY"] = registry

    try:
        svc = load_service(app, app_dir)
    except (click.ClickException, click.exceptions.Exit):
        raise
    except MeshkitError as exc:
        _fail(f"cannot load {app}: {exc}", FAILURE)
    except Exception:
        click.echo(f"Error: {app} raised while loading:", err=True)
        traceback.print_exc()
        sys.exit(FAILURE)

    try:
        svc.settings = svc.settings.with_overrides(
            host=host, port=port, health_port=health_port, registry=registry
        )
        svc.settings.validate()
    except MeshkitError as exc:
        _fail(str(exc.message), USAGE_ERROR)

    try:
        svc.run()
    except MeshkitError as exc:
        _fail(f"service {svc.name!r} failed: {exc}", FAILURE)
    except OSError as exc:
        _fail(f"service {svc.name!r} could not start: {exc}", FAILURE)


# -- meshkit call --------------------------------------------------------------------------


def _finite(value: float, param: click.Parameter) -> float:
    """Refuse ``nan`` and ``inf`` (``FloatRange`` lets both through) as a usage error."""
    if not math.isfinite(value):
        raise click.BadParameter(f"expected a finite number of seconds, found {value}", param=param)
    return value


# thriftpy2 type ids (thriftpy2.thrift.TType), as found in ``thrift_spec`` entries.
_BOOL, _BYTE, _DOUBLE, _I16, _I32, _I64, _STRING = 2, 3, 4, 6, 8, 10, 11
_STRUCT, _MAP, _SET, _LIST, _BINARY = 12, 13, 14, 15, 18
_INT_RANGES = {
    _BYTE: ("byte", 8),
    _I16: ("i16", 16),
    _I32: ("i32", 32),
    _I64: ("i64", 64),
}
_TYPE_NAMES = {_BOOL: "bool", _DOUBLE: "double", _STRING: "string", _BINARY: "binary"}


def _field_type(spec: tuple[Any, ...]) -> tuple[int, Any]:
    """``(ttype, type argument)`` of a ``thrift_spec`` field entry."""
    return spec[0], (spec[2] if len(spec) == 4 else None)


def _elem_type(spec: Any) -> tuple[int, Any]:
    """``(ttype, type argument)`` of a container element spec (an int or a pair)."""
    return (spec[0], spec[1]) if isinstance(spec, tuple) else (spec, None)


def _is_enum(targ: Any) -> bool:
    return isinstance(targ, type) and hasattr(targ, "_NAMES_TO_VALUES")


def _type_name(ttype: int, targ: Any) -> str:
    if ttype in _INT_RANGES:
        return targ.__name__ if _is_enum(targ) else _INT_RANGES[ttype][0]
    if ttype == _STRUCT:
        return getattr(targ, "__name__", "struct")
    if ttype in (_LIST, _SET):
        inner = _type_name(*_elem_type(targ))
        return f"{'list' if ttype == _LIST else 'set'}<{inner}>"
    if ttype == _MAP:
        return f"map<{_type_name(*_elem_type(targ[0]))}, {_type_name(*_elem_type(targ[1]))}>"
    return _TYPE_NAMES.get(ttype, f"type {ttype}")


class _ValueError(Exception):
    """A value that does not fit its IDL type (``where`` says which argument or field)."""


def _bad(where: str, expected: str, value: Any) -> _ValueError:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return _ValueError(f"{where}: expected {expected}, found {shown}")


def _int_from(value: Any, ttype: int, targ: Any, where: str) -> int:
    if _is_enum(targ) and isinstance(value, str) and value in targ._NAMES_TO_VALUES:
        return int(targ._NAMES_TO_VALUES[value])
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = int(value.strip(), 0)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    expected = _type_name(ttype, targ)
    if _is_enum(targ):
        expected = f"{expected} ({', '.join(targ._NAMES_TO_VALUES)} or an integer)"
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(where, expected, value)
    bits = _INT_RANGES[ttype][1]
    if not -(2 ** (bits - 1)) <= value < 2 ** (bits - 1):
        raise _bad(
            where, f"{expected} between {-(2 ** (bits - 1))} and {2 ** (bits - 1) - 1}", value
        )
    return value


def _bool_from(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise _bad(where, "a bool (true/false)", value)


def from_json(value: Any, ttype: int, targ: Any, where: str) -> Any:
    """Convert a JSON value to the Python value thriftpy2 sends for ``(ttype, targ)``.

    Binary values are base64 strings; enums are names or integers; maps are JSON objects
    (keys converted from strings) or lists of ``[key, value]`` pairs.
    """
    if value is None:
        return None
    if ttype in _INT_RANGES:
        return _int_from(value, ttype, targ, where)
    if ttype == _BOOL:
        return _bool_from(value, where)
    if ttype == _DOUBLE:
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _bad(where, "a double", value)
        return float(value)
    if ttype == _STRING:
        if not isinstance(value, str):
            raise _bad(where, "a string", value)
        return value
    if ttype == _BINARY:
        if not isinstance(value, str):
            raise _bad(where, "binary as a base64 string", value)
        try:
            return base64.b64decode(value, validate=True)
        except ValueError:
            raise _bad(where, "binary as a base64 string", value) from None
    if ttype in (_LIST, _SET):
        if not isinstance(value, list):
            raise _bad(where, f"a JSON array ({_type_name(ttype, targ)})", value)
        etype, earg = _elem_type(targ)
        items = [from_json(v, etype, earg, f"{where}[{i}]") for i, v in enumerate(value)]
        if ttype == _SET:
            try:
                return set(items)
            except TypeError:
                raise _bad(where, "a set of hashable values", value) from None
        return items
    if ttype == _MAP:
        ktype, karg = _elem_type(targ[0])
        vtype, varg = _elem_type(targ[1])
        if isinstance(value, dict):
            pairs = list(value.items())
        elif isinstance(value, list) and all(
            isinstance(p, list | tuple) and len(p) == 2 for p in value
        ):
            pairs = [tuple(p) for p in value]
        else:
            raise _bad(where, f"a JSON object ({_type_name(ttype, targ)})", value)
        result = {}
        for k, v in pairs:
            key = from_json(k, ktype, karg, f"{where} key {k!r}")
            try:
                result[key] = from_json(v, vtype, varg, f"{where}[{k!r}]")
            except TypeError:
                raise _bad(where, "a map with hashable keys", value) from None
        return result
    if ttype == _STRUCT:
        if not isinstance(value, dict):
            raise _bad(where, f"a JSON object ({_type_name(ttype, targ)})", value)
        fields = {spec[1]: spec for spec in targ.thrift_spec.values()}
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise _ValueError(
                f"{where}: {targ.__name__} has no field {', '.join(map(repr, unknown))}; "
                f"expected {', '.join(fields) or '(none)'}"
            )
        obj = targ()
        for name, v in value.items():
            ftype, farg = _field_type(fields[name])
            setattr(obj, name, from_json(v, ftype, farg, f"{where}.{name}"))
        return obj
    raise _ValueError(f"{where}: values of {_type_name(ttype, targ)} are not supported")


def from_text(text: str, ttype: int, targ: Any, where: str) -> Any:
    """Convert a ``--arg name=VALUE`` text: strings as-is, scalars parsed, the rest JSON."""
    if ttype == _STRING:
        return text
    if ttype in (_STRUCT, _MAP, _SET, _LIST):
        try:
            value = json.loads(text)
        except ValueError:
            raise _bad(where, f"JSON for {_type_name(ttype, targ)}", text) from None
        return from_json(value, ttype, targ, where)
    return from_json(text, ttype, targ, where)


def to_json(value: Any, ttype: int | None = None, targ: Any = None) -> Any:
    """A JSON-safe form of a thriftpy2 value: structs → dicts, binary → base64, enums → names."""
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(bytes(value)).decode("ascii")
    if hasattr(value, "thrift_spec") and not isinstance(value, type):
        out = {}
        for spec in sorted(value.thrift_spec.items()):
            ftype, farg = _field_type(spec[1])
            name = spec[1][1]
            out[name] = to_json(getattr(value, name, None), ftype, farg)
        return out
    if isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        if _is_enum(targ):
            return targ._VALUES_TO_NAMES.get(value, value)
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        ktype, karg = _elem_type(targ[0]) if isinstance(targ, tuple) else (None, None)
        vtype, varg = _elem_type(targ[1]) if isinstance(targ, tuple) else (None, None)
        keys = [to_json(k, ktype, karg) for k in value]
        values = [to_json(v, vtype, varg) for v in value.values()]
        if all(isinstance(k, str | int | float | bool) for k in keys):
            return {
                str(k) if not isinstance(k, str) else k: v
                for k, v in zip(keys, values, strict=True)
            }
        return [[k, v] for k, v in zip(keys, values, strict=True)]
    if isinstance(value, list | tuple | set | frozenset):
        etype, earg = _elem_type(targ) if targ is not None else (None, None)
        items = [to_json(v, etype, earg) for v in value]
        if isinstance(value, set | frozenset):
            with contextlib.suppress(TypeError):
                items.sort()
        return items
    return str(value)


def _thrift_services(module: Any) -> list[Any]:
    meta = getattr(module, "__thrift_meta__", None)
    return list(meta["services"]) if meta else []


def _pick_service_class(module: Any, service: str, class_name: str | None, idl: str) -> Any:
    classes = _thrift_services(module)
    names = [c.__name__ for c in classes]
    if not classes:
        _fail(f"the IDL {idl} defines no service", USAGE_ERROR)
    if class_name is not None:
        for cls in classes:
            if cls.__name__ == class_name:
                return cls
        _fail(
            f"the IDL {idl} has no service {class_name!r}; expected one of {', '.join(names)}",
            USAGE_ERROR,
        )
    if len(classes) == 1:
        return classes[0]
    wanted = re.sub(r"[^a-z0-9]", "", service.lower())
    matches = [c for c in classes if c.__name__.lower() == wanted]
    if len(matches) == 1:
        return matches[0]
    _fail(
        f"the IDL {idl} defines several services ({', '.join(names)}) and none is named like "
        f"{service!r}: choose one with --service-class",
        USAGE_ERROR,
    )


def _parse_pairs(pairs: Sequence[str], option: str) -> list[tuple[str, str]]:
    out = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            _fail(f"expected {option} NAME=VALUE, found {pair!r}", USAGE_ERROR)
        out.append((key, value))
    return out


def build_call_args(spec: Any, arg_pairs: Sequence[str], json_args: str | None) -> list[Any]:
    """The positional arguments of a call, converted to the IDL types of ``spec``'s method."""
    fields = {entry[1]: entry for entry in spec.args_cls.thrift_spec.values()}
    signature = ", ".join(f"{_type_name(*_field_type(fields[n]))} {n}" for n in spec.arg_names)
    values: dict[str, Any] = {}

    def unknown(name: str) -> NoReturn:
        _fail(
            f"{spec.name} has no argument {name!r}; expected {spec.name}({signature})",
            USAGE_ERROR,
        )

    try:
        if json_args is not None:
            try:
                data = json.loads(json_args)
            except ValueError as exc:
                _fail(f"--json: expected a JSON object, could not parse it: {exc}", USAGE_ERROR)
            if not isinstance(data, dict):
                _fail(f"--json: expected a JSON object, found {type(data).__name__}", USAGE_ERROR)
            for name, value in data.items():
                if name not in fields:
                    unknown(name)
                values[name] = from_json(value, *_field_type(fields[name]), name)
        for name, text in _parse_pairs(arg_pairs, "--arg"):
            if name not in fields:
                unknown(name)
            values[name] = from_text(text, *_field_type(fields[name]), name)
    except _ValueError as exc:
        _fail(f"argument {exc}", USAGE_ERROR)
    return [values.get(name) for name in spec.arg_names]


def _load_idl(idl: str, include_dirs: Sequence[str]) -> Any:
    import thriftpy2

    path = Path(idl).resolve()
    stem = re.sub(r"\W", "_", path.stem)
    try:
        return thriftpy2.load(
            str(path),
            module_name=f"meshkit_call_{stem}_thrift",
            include_dirs=[str(path.parent), *include_dirs],
        )
    except Exception as exc:
        _fail(f"cannot load the IDL {idl}: {type(exc).__name__}: {exc}", USAGE_ERROR)


async def _do_call(
    service_cls: Any,
    service: str,
    method: str,
    args: list[Any],
    *,
    addr: Sequence[str],
    registry: str | None,
    timeout: float,
    headers: Mapping[str, str],
) -> Any:
    from .client import Client

    client = Client(
        service_cls,
        service,
        addr=list(addr) if addr else None,
        registry=registry,
        timeout=timeout,
    )
    try:
        return await client.call(method, *args, headers=headers)
    finally:
        await client.close()


@cli.command()
@click.argument("service")
@click.argument("method")
@click.option(
    "--idl",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Thrift IDL file of the service.",
)
@click.option(
    "--service-class",
    metavar="NAME",
    help="The IDL service to use when the IDL defines several (default: the only one, "
    "or the one named like SERVICE).",
)
@click.option(
    "--addr",
    multiple=True,
    metavar="HOST:PORT",
    help="Call this address instead of discovering SERVICE (repeatable).",
)
@click.option(
    "--registry", metavar="URL", help="Registry to discover SERVICE in (default: MESHKIT_REGISTRY)."
)
@click.option(
    "--arg",
    "arg_pairs",
    multiple=True,
    metavar="NAME=VALUE",
    help="An argument (repeatable): strings as-is, numbers and bools parsed, binary as base64, "
    "lists/maps/structs as JSON.",
)
@click.option(
    "--json",
    "json_args",
    metavar="JSON",
    help='All arguments as a JSON object, e.g. \'{"message": "hi"}\' (--arg wins).',
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=5.0,
    show_default=True,
    callback=lambda ctx, param, value: _finite(value, param),
    help="Seconds the call may take.",
)
@click.option(
    "--header",
    "header_pairs",
    multiple=True,
    metavar="KEY=VALUE",
    help="Call metadata (repeatable).",
)
@click.option(
    "--include-dir",
    "include_dirs",
    multiple=True,
    type=click.Path(exists=True, file_okay=False),
    help="Where the IDL's includes are found (the IDL's directory is searched first).",
)
def call(
    service: str,
    method: str,
    idl: str,
    service_class: str | None,
    addr: tuple[str, ...],
    registry: str | None,
    arg_pairs: tuple[str, ...],
    json_args: str | None,
    timeout: float,
    header_pairs: tuple[str, ...],
    include_dirs: tuple[str, ...],
) -> None:
    """Call METHOD of SERVICE once and print the result as JSON.

    Structs print as objects, binary as base64, enums by name. An exception declared in the
    IDL prints {"error": NAME, "fields": {...}} and exits 1; other failures print a message on
    stderr and exit 1.
    """
    from . import _loop
    from .errors import MeshkitError
    from .logs import configure_logging
    from .rpc.handler import method_specs

    if addr and registry:
        _fail("use --addr or --registry, not both", USAGE_ERROR)
    # stdout carries only the result; warnings (if any) go to stderr.
    configure_logging(level="WARNING", json=False, stream=sys.stderr)

    module = _load_idl(idl, include_dirs)
    service_cls = _pick_service_class(module, service, service_class, idl)
    specs = method_specs(service_cls)
    spec = specs.get(method)
    if spec is None:
        _fail(
            f"{service_cls.__name__} has no method {method!r}; expected one of: {', '.join(specs)}",
            USAGE_ERROR,
        )
    args = build_call_args(spec, arg_pairs, json_args)
    headers = dict(_parse_pairs(header_pairs, "--header"))

    try:
        result = _loop.run(
            _do_call(
                service_cls,
                service,
                method,
                args,
                addr=addr,
                registry=registry,
                timeout=timeout,
                headers=headers,
            )
        )
    except MeshkitError as exc:
        _fail(f"{service}.{method} failed: {exc}", FAILURE)
    except Exception as exc:
        declared = tuple(cls for _, cls in spec.exception_fields)
        if declared and isinstance(exc, declared):
            click.echo(
                json.dumps(
                    {"error": type(exc).__name__, "fields": to_json(exc)},
                    indent=2,
                    ensure_ascii=False,
                )
            )
            sys.exit(FAILURE)
        _fail(f"{service}.{method} failed: {type(exc).__name__}: {exc}", FAILURE)

    rtype, rarg = (None, None)
    result_spec = getattr(spec.result_cls, "thrift_spec", {})
    if 0 in result_spec:
        rtype, rarg = _field_type(result_spec[0])
    click.echo(json.dumps(to_json(result, rtype, rarg), indent=2, ensure_ascii=False))


# -- meshkit demo --------------------------------------------------------------------------


@cli.command(short_help="Run a small real system locally: two services, traffic, a summary.")
@click.option(
    "--calls",
    type=click.IntRange(min=1),
    help="Stop after this many calls (default: run for --duration).",
)
@click.option(
    "--concurrency", type=click.IntRange(min=1), default=8, show_default=True, help="Callers."
)
@click.option(
    "--duration",
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds of traffic (default 3 unless --calls is given).",
)
@click.option(
    "--keep-running",
    is_flag=True,
    help="After the summary keep the services up (to try the URLs and the meshkit call "
    "hint) until Ctrl-C.",
)
def demo(calls: int | None, concurrency: int, duration: float | None, keep_running: bool) -> None:
    """Run a small real system on this machine: echo and gateway services as separate
    processes, a private local:// registry, a burst of traffic and a summary.

    Exits 0 when every call succeeded and every service drained and exited 0; 1 otherwise;
    130 when interrupted by Ctrl-C (0 if Ctrl-C ends --keep-running).
    """
    from .demo import run_demo
    from .logs import configure_logging

    configure_logging(level="WARNING", json=False, stream=sys.stderr)
    code = run_demo(
        calls=calls, concurrency=concurrency, duration=duration, keep_running=keep_running
    )
    sys.exit(code)


# -- meshkit traces (the bundled trace collector; see cli_traces.py) --------------------
from .cli_traces import traces as _traces  # noqa: E402

cli.add_command(_traces)

# -- meshkit config (meshkit/cli_config.py) ------------------------------------------------

from .cli_config import config as _config_group  # noqa: E402

cli.add_command(_config_group)

# -- meshkit mq (Kafka tools: meshkit/cli_mq.py) ---------------------------------------------
from .cli_mq import mq as _mq_group  # noqa: E402

cli.add_command(_mq_group)


if __name__ == "__main__":  # pragma: no cover
    main()
