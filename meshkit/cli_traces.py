"""``meshkit traces``: the bundled trace collector and viewer.

::

    meshkit traces serve                       # OTLP/HTTP + viewer on http://127.0.0.1:4318
    meshkit traces serve --db /var/lib/meshkit/traces.db --max-age 3d --max-size 2GB

Point services at it with ``MESHKIT_TRACES=http://127.0.0.1:4318``.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import click

__all__ = ["parse_duration", "parse_size", "traces"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?\s*$", re.IGNORECASE)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|kb|mb|gb|tb|k|m|g|t)?\s*$", re.IGNORECASE)
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_BYTES = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``12h``, ``7d``, ``2w`` → seconds (> 0)."""
    match = _DURATION.match(text)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"expected a duration like 30m, 12h or 7d, found {text!r}")
    return float(match.group(1)) * _SECONDS[(match.group(2) or "s").lower()]


def parse_size(text: str) -> int:
    """``500MB``, ``2GB``, ``1048576`` → bytes (> 0)."""
    match = _SIZE.match(text)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"expected a size like 500MB or 2GB, found {text!r}")
    return int(float(match.group(1)) * _BYTES[(match.group(2) or "b")[0].lower()])


class _Parsed(click.ParamType):
    def __init__(self, name: str, parse: Any) -> None:
        self.name = name
        self._parse = parse

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return self._parse(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def default_db() -> Path:
    """``$XDG_DATA_HOME/meshkit/traces.db`` (``~/.local/share/meshkit/traces.db``)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "meshkit" / "traces.db"


@click.group()
def traces() -> None:
    """The bundled trace collector (OTLP/HTTP → SQLite) and its web viewer."""


@traces.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Listen address.")
@click.option("--port", type=click.IntRange(0, 65535), default=4318, show_default=True)
@click.option(
    "--db",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="SQLite file (default ~/.local/share/meshkit/traces.db).",
)
@click.option(
    "--max-age",
    type=_Parsed("duration", parse_duration),
    default="7d",
    show_default=True,
    help="Delete spans older than this (30m, 12h, 7d, …).",
)
@click.option(
    "--max-size",
    type=_Parsed("size", parse_size),
    default="1GB",
    show_default=True,
    help="Delete the oldest spans while the database is larger than this.",
)
def serve(host: str, port: int, db: Path | None, max_age: float, max_size: int) -> None:
    """Accept OTLP/HTTP traces (protobuf or JSON) and serve the trace viewer.

    Binds 127.0.0.1 unless --host says otherwise: the viewer has no authentication.
    """
    from . import _loop
    from .logs import configure_logging
    from .tracing.collector import Collector
    from .tracing.collector import serve as run_collector

    configure_logging(level="WARNING", json=False, stream=sys.stderr)
    path = db or default_db()

    def ready(collector: Collector) -> None:
        click.echo(f"meshkit trace collector on {collector.url}", err=True)
        click.echo(f"  OTLP/HTTP: {collector.url}/v1/traces", err=True)
        click.echo(f"  viewer:    {collector.url}/", err=True)
        click.echo(f"  store:     {path}", err=True)
        click.echo(f"  services:  export MESHKIT_TRACES={collector.url}", err=True)

    try:
        _loop.run(
            run_collector(
                path, host=host, port=port, max_age=max_age, max_bytes=max_size, ready=ready
            )
        )
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        raise click.ClickException(f"could not serve on {host}:{port}: {exc}") from None
