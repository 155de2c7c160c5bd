"""Layered settings: defaults → file → shared store → service store → environment → overrides.

Each layer is a nested ``dict``. Layers are merged from lowest to highest along the
schema's *nested models* (a nested :class:`pydantic.BaseModel` field merges key by key;
any other value, a ``dict`` or ``list`` field included, is replaced whole), and each leaf
remembers the layer it came from. The result is validated by the schema (a pydantic v2
model), so a value from any layer is checked the same way.

Secret fields (``pydantic.SecretStr``, ``SecretBytes`` or ``Secret[...]``) are shown as
``**********`` by :func:`effective` and never appear in messages made here: validation
errors are rendered without the offending input.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, SecretBytes, SecretStr, ValidationError
from pydantic import Secret as _Secret

from ..errors import ConfigError

__all__ = [
    "LAYERS",
    "MASK",
    "effective",
    "env_layer",
    "flatten",
    "load_file",
    "merge",
    "render_errors",
    "secret_paths",
]

#: Layer names, lowest precedence first (as shown by ``/info`` and ``meshkit config show``).
LAYERS = ("default", "file", "shared", "store", "env", "override")
MASK = "**********"


def _unwrap(annotation: Any) -> list[Any]:
    """The member types of ``X | None`` / ``Optional[X]`` / ``Annotated[X, …]``."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin is typing.Union or origin is types.UnionType:
        out: list[Any] = []
        for arg in typing.get_args(annotation):
            if arg is not type(None):
                out += _unwrap(arg)
        return out
    return [annotation]


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    members = _unwrap(annotation)
    if len(members) == 1 and isinstance(members[0], type) and issubclass(members[0], BaseModel):
        return members[0]
    return None


def _is_secret(annotation: Any) -> bool:
    for member in _unwrap(annotation):
        base = typing.get_origin(member) or member
        if isinstance(base, type) and issubclass(base, SecretStr | SecretBytes):
            return True
        if isinstance(base, type) and issubclass(base, _Secret):
            return True
    return False


def _is_text(annotation: Any) -> bool:
    return all(m in (str, SecretStr) for m in _unwrap(annotation))


def _holds_secret(annotation: Any, seen: frozenset[type] = frozenset()) -> bool:
    """Whether a value of this type is or contains a secret (``dict[str, SecretStr]``,
    ``list[SecretStr]``, a container of models with secret fields, ...)."""
    if _is_secret(annotation):
        return True
    for member in _unwrap(annotation):
        if isinstance(member, type) and issubclass(member, BaseModel):
            if member not in seen and any(
                _holds_secret(f.annotation, seen | {member}) for f in member.model_fields.values()
            ):
                return True
        elif any(_holds_secret(arg, seen) for arg in typing.get_args(member)):
            return True
    return False


def secret_paths(schema: type[BaseModel], prefix: str = "") -> set[str]:
    """Dotted paths of the secret fields of ``schema`` (nested models included).

    A container holding secrets (``dict[str, SecretStr]``, ``list[SecretStr]``, a dict of
    models with secret fields) is one path: its whole subtree is secret.
    """
    out: set[str] = set()
    for name, info in schema.model_fields.items():
        path = prefix + name
        nested = _nested_model(info.annotation)
        if nested is not None:
            out |= secret_paths(nested, path + ".")
        elif _holds_secret(info.annotation):
            out.add(path)
    return out


def _is_masked(path: str, secrets: set[str]) -> bool:
    return any(path == s or path.startswith(s + ".") for s in secrets)


def merge(
    schema: type[BaseModel], layers: list[tuple[str, Mapping[str, Any]]]
) -> tuple[dict[str, Any], dict[str, str]]:
    """Merge ``(layer name, values)`` from lowest to highest; returns values and sources.

    ``sources`` maps each dotted leaf path that some layer set to that layer's name.
    """
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, values in layers:
        _merge_into(schema, merged, values, name, "", sources)
    return merged, sources


def _merge_into(
    schema: type[BaseModel] | None,
    target: dict[str, Any],
    values: Mapping[str, Any],
    layer: str,
    prefix: str,
    sources: dict[str, str],
) -> None:
    fields = schema.model_fields if schema is not None else {}
    for key, value in values.items():
        path = prefix + key
        info = fields.get(key)
        nested = _nested_model(info.annotation) if info is not None else None
        if nested is not None and isinstance(value, Mapping):
            child = target.get(key)
            if not isinstance(child, dict):
                child = target[key] = {}
                for stale in [p for p in sources if p == path or p.startswith(path + ".")]:
                    del sources[stale]
            _merge_into(nested, child, value, layer, path + ".", sources)
            continue
        target[key] = value
        for stale in [p for p in sources if p.startswith(path + ".")]:
            del sources[stale]
        sources[path] = layer


def load_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The settings in a TOML (``.toml``, the default), YAML (``.yaml``/``.yml``) or JSON file.

    Raises :class:`~meshkit.errors.ConfigError` naming the file and what is wrong.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror or exc}") from None
    if p.suffix.lower() == ".json":
        try:
            parsed = json.loads(data)
        except ValueError as exc:
            raise ConfigError(f"config file {p} is not valid JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise ConfigError(f"config file {p}: expected a JSON object at the top level")
        return parsed
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            parsed = yaml.safe_load(data)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
        if parsed is None:
            return {}
        if not isinstance(parsed, dict):
            raise ConfigError(f"config file {p}: expected a YAML mapping at the top level")
        return parsed
    try:
        return tomllib.loads(data.decode())
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {p} is not UTF-8 text: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None


def env_prefix_for(service: str) -> str:
    """The default environment prefix: the service name upper-cased, ``ECHO_`` for ``echo``."""
    return re.sub(r"[^A-Za-z0-9]", "_", service).upper() + "_"


def env_layer(
    schema: type[BaseModel], prefix: str, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Values from ``<PREFIX><FIELD>`` variables (nested models: ``<PREFIX><A>__<B>``).

    Text fields take the variable as is; other fields read it as JSON when it parses
    (``5``, ``true``, ``["a"]``, ``{"k": 1}``) and as text otherwise, for the schema to
    convert or reject.
    """
    env = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    _env_into(schema, prefix.upper(), env, out)
    return out


def _env_into(
    schema: type[BaseModel], prefix: str, env: Mapping[str, str], out: dict[str, Any]
) -> None:
    for name, info in schema.model_fields.items():
        var = prefix + name.upper()
        nested = _nested_model(info.annotation)
        if nested is not None:
            child: dict[str, Any] = {}
            _env_into(nested, var + "__", env, child)
            if child:
                out[name] = child
            continue
        raw = env.get(var)
        if raw is None:
            continue
        if _is_text(info.annotation):
            out[name] = raw
            continue
        try:
            out[name] = json.loads(raw)
        except ValueError:
            out[name] = raw


def render_errors(exc: ValidationError, sources: Mapping[str, str] | None = None) -> str:
    """A one-line summary of a validation error, without the rejected input values."""
    parts = []
    for error in exc.errors(include_input=False, include_url=False):
        path = ".".join(str(p) for p in error["loc"]) or "(root)"
        where = f" (from {sources[path]})" if sources and path in sources else ""
        parts.append(f"{path}{where}: {error['msg']}")
    return "; ".join(parts)


def flatten(values: Any, prefix: str = "", schema: type[BaseModel] | None = None) -> dict[str, Any]:
    """Leaf values by dotted path, descending into nested models (or every dict if no schema)."""
    out: dict[str, Any] = {}
    if not isinstance(values, Mapping):
        return {prefix.rstrip("."): values} if prefix else {}
    for key, value in values.items():
        path = prefix + str(key)
        if schema is not None:
            info = schema.model_fields.get(key)
            nested = _nested_model(info.annotation) if info is not None else None
            if nested is not None and isinstance(value, Mapping):
                out.update(flatten(value, path + ".", nested))
                continue
            out[path] = value
        elif isinstance(value, Mapping) and value:
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def effective(model: BaseModel, sources: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """``{dotted key: {"value": …, "source": layer}}`` for every leaf; secrets masked."""
    schema = type(model)
    secrets = secret_paths(schema)
    dumped = model.model_dump(mode="json")
    out: dict[str, dict[str, Any]] = {}
    for path, value in flatten(dumped, schema=schema).items():
        shown = MASK if _is_masked(path, secrets) and value is not None else value
        out[path] = {"value": shown, "source": sources.get(path, _source_above(path, sources))}
    return out


def _source_above(path: str, sources: Mapping[str, str]) -> str:
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if (found := sources.get(".".join(parts[:i]))) is not None:
            return found
    return "default"


def mask_values(values: Mapping[str, Any], secrets: set[str]) -> dict[str, Any]:
    """A copy of raw ``values`` with the leaves under ``secrets`` masked (for tools)."""

    def walk(node: Any, prefix: str) -> Any:
        if not isinstance(node, Mapping):
            return node
        out = {}
        for key, value in node.items():
            path = f"{prefix}{key}"
            out[key] = MASK if _is_masked(path, secrets) else walk(value, path + ".")
        return out

    return walk(values, "")  # type: ignore[no-any-return]
