"""The JSON text the span store keeps: strict JSON, whatever the span carried.

OTLP doubles may be NaN or ±Infinity; Python's ``json`` would write them as the bare
tokens ``NaN`` and ``Infinity``, which are not JSON: SQLite's ``json_extract`` (tag
search, the trace API) then fails on the row and a browser's ``JSON.parse`` refuses it.
They are written as the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"``, as the
OTLP JSON encoding writes them.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["dumps", "float_text"]

_strict = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), default=str, allow_nan=False
).encode


def float_text(value: float) -> str:
    """A double as JSON text: its repr when finite, else an OTLP JSON string."""
    if value - value == 0.0:  # finite (NaN and ±inf give NaN)
        return repr(value)
    return '"NaN"' if value != value else ('"Infinity"' if value > 0 else '"-Infinity"')


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by its OTLP JSON string."""
    if value.__class__ is float:
        if math.isfinite(value):
            return value
        return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {(_finite(k) if k.__class__ is float else k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def dumps(value: Any) -> str:
    """``value`` as compact strict JSON (non-finite floats as strings)."""
    try:
        return _strict(value)
    except ValueError:  # a NaN or an infinity somewhere: rare, so looked for only now
        return _strict(_finite(value))
