"""Structured logging for meshkit processes (DESIGN.md section 2, "Logs").

One call, :func:`configure_logging`, sets up structlog and routes the standard library's
``logging`` (aiohttp, kafka clients, …) through the same processors, so every line has the same
shape: JSON lines in production, a readable console format on a terminal. Every line carries
``service`` and ``instance``, plus whatever is bound with
``structlog.contextvars.bind_contextvars`` (the tracing layer adds ``trace_id``/``span_id``
through a processor passed in ``processors``).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import structlog
from structlog.tracebacks import ExceptionDictTransformer
from structlog.typing import EventDict, Processor, WrappedLogger

from .errors import ConfigError

__all__ = ["LEVEL_ENV", "bind_identity", "configure_logging"]

LEVEL_ENV = "MESHKIT_LOG_LEVEL"
"""Environment variable read for the level when ``configure_logging`` gets none."""


class _NamedWriteLogger(structlog.WriteLogger):
    """A ``WriteLogger`` that remembers the name given to ``structlog.get_logger(name)``."""

    def __init__(self, file: TextIO, name: str | None) -> None:
        super().__init__(file)
        self.name = name


class _LoggerFactory:
    def __init__(self, file: TextIO) -> None:
        self._file = file

    def __call__(self, *args: Any) -> _NamedWriteLogger:
        name = args[0] if args and isinstance(args[0], str) else None
        return _NamedWriteLogger(self._file, name)


class _MeshkitHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the root handler installed by :func:`configure_logging` (so it can be replaced)."""


def _add_logger_name(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    record = event_dict.get("_record")
    name = record.name if record is not None else getattr(logger, "name", None)
    if name:
        event_dict.setdefault("logger", name)
    return event_dict


#: The identity fields of the current configuration; :func:`bind_identity` updates them.
_identity: dict[str, str] = {}


def bind_identity(*, service: str | None = None, instance: str | None = None) -> None:
    """Add ``service``/``instance`` to every later line of this process (standard library
    records included), e.g. once the instance id is known. Applies to the current
    configuration; :func:`configure_logging` starts a new one from its own arguments.
    """
    for key, value in (("service", service), ("instance", instance)):
        if value is not None:
            _identity[key] = value


def _identity_processor(fields: dict[str, str]) -> Processor:
    def add_identity(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
        for key, value in fields.items():
            event_dict.setdefault(key, value)
        return event_dict

    return add_identity


def _resolve_level(level: str | int | None) -> int:
    source = "the log level"
    if level is None:
        level = os.environ.get(LEVEL_ENV) or "INFO"
        source = LEVEL_ENV
    if isinstance(level, int):
        return level
    text = level.strip()
    if text.isdigit():
        return int(text)
    names = logging.getLevelNamesMapping()
    try:
        return names[text.upper()]
    except KeyError:
        expected = "DEBUG, INFO, WARNING, ERROR, CRITICAL or a number"
        raise ConfigError(f"expected {source} to be {expected}, found {level!r}") from None


def configure_logging(
    *,
    level: str | int | None = None,
    json: bool | None = None,
    service: str | None = None,
    instance: str | None = None,
    processors: Sequence[Processor] = (),
    stream: TextIO | None = None,
) -> None:
    """Configure structlog and the standard library's logging for this process.

    ``level``: a name (``"debug"``, ``"INFO"``) or number; when ``None``, the
    ``MESHKIT_LOG_LEVEL`` environment variable, else ``INFO``. ``json``: JSON lines when
    true, console format when false; when ``None``, JSON unless ``stream`` is a TTY.
    ``service``/``instance``: added to every line. ``processors``: extra structlog
    processors, run after the standard ones and before exceptions are rendered and the line
    is formatted. ``stream``: where lines go (default ``sys.stdout``, looked up at call time).

    Calling it again replaces the previous configuration completely (no handlers pile up).
    Loggers are not cached on first use, so module-level ``structlog.get_logger()`` proxies
    follow a reconfiguration; a hot path can hold ``structlog.get_logger().bind()`` instead.
    Raises :class:`~meshkit.errors.ConfigError` for an unknown level.
    """
    out = stream if stream is not None else sys.stdout
    levelno = _resolve_level(level)
    isatty = getattr(out, "isatty", None)
    tty = bool(callable(isatty) and isatty())
    if json is None:
        json = not tty

    global _identity
    identity = {
        key: value
        for key, value in (("service", service), ("instance", instance))
        if value is not None
    }
    _identity = identity
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        _add_logger_name,
        structlog.processors.add_log_level,
        _identity_processor(identity),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Processor
    final: list[Processor]
    if json:
        renderer = structlog.processors.JSONRenderer()
        # Tracebacks as data, without frame locals: they bloat lines and leak secrets.
        tracebacks = structlog.processors.ExceptionRenderer(
            ExceptionDictTransformer(show_locals=False)
        )
        final = [tracebacks, renderer]
    else:
        # Never frame locals on a terminal either (rich's default shows them): secrets.
        renderer = structlog.dev.ConsoleRenderer(
            colors=tty, exception_formatter=_console_tracebacks()
        )
        final = [renderer]
    extra = list(processors)

    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), *extra, *final],
        wrapper_class=structlog.make_filtering_bound_logger(levelno),
        logger_factory=_LoggerFactory(out),
        context_class=dict,
        cache_logger_on_first_use=False,
    )

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *extra, *final],
    )
    handler = _MeshkitHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _MeshkitHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(levelno)


def _console_tracebacks() -> structlog.typing.ExceptionRenderer:
    """Rich tracebacks without locals when ``rich`` is installed, else plain ones."""
    try:
        import rich  # noqa: F401
    except ImportError:
        return structlog.dev.plain_traceback
    return structlog.dev.RichTracebackFormatter(show_locals=False)
