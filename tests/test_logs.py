"""configure_logging: structlog and stdlib logging come out in one format."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from meshkit.errors import ConfigError
from meshkit.logs import LEVEL_ENV, configure_logging


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    structlog.contextvars.clear_contextvars()
    yield
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line]


def test_json_line_has_identity_level_timestamp_and_context() -> None:
    out = io.StringIO()
    configure_logging(service="echo", instance="echo-1", stream=out)  # StringIO: not a TTY
    structlog.contextvars.bind_contextvars(request_id="r-42")
    structlog.get_logger("meshkit.test").info("call done", method="echo", ms=1.5)

    [line] = lines(out)
    assert line["event"] == "call done"
    assert line["service"] == "echo"
    assert line["instance"] == "echo-1"
    assert line["level"] == "info"
    assert line["logger"] == "meshkit.test"
    assert line["request_id"] == "r-42"
    assert (line["method"], line["ms"]) == ("echo", 1.5)
    assert line["timestamp"].endswith("Z")  # ISO 8601, UTC
    assert "T" in line["timestamp"]


def test_stdlib_logging_comes_out_as_json() -> None:
    out = io.StringIO()
    configure_logging(service="echo", instance="echo-1", stream=out)
    structlog.contextvars.bind_contextvars(trace_id="abc")
    logging.getLogger("aiohttp.server").warning("bad request from %s", "10.0.0.1")

    [line] = lines(out)
    assert line["event"] == "bad request from 10.0.0.1"
    assert line["level"] == "warning"
    assert line["logger"] == "aiohttp.server"
    assert line["service"] == "echo"
    assert line["instance"] == "echo-1"
    assert line["trace_id"] == "abc"
    assert "timestamp" in line


def test_exceptions_are_structured_without_locals() -> None:
    out = io.StringIO()
    configure_logging(stream=out)
    secret = "hunter2"
    for log in (structlog.get_logger("s"), logging.getLogger("stdlib")):
        try:
            raise ValueError(f"bad value, len {len(secret)}")
        except ValueError:
            log.exception("failed")

    records = lines(out)
    assert len(records) == 2
    for record in records:
        assert record["level"] == "error"
        [exc] = record["exception"]
        assert exc["exc_type"] == "ValueError"
        assert exc["exc_value"] == "bad value, len 7"
    assert "hunter2" not in out.getvalue()


def test_extra_processors_are_applied() -> None:
    def add_trace(logger: Any, method_name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        event_dict["trace_id"] = "0af7651916cd43dd8448eb211c80319c"
        event_dict["span_id"] = "b7ad6b7169203331"
        return event_dict

    out = io.StringIO()
    configure_logging(stream=out, processors=[add_trace])
    structlog.get_logger().info("from structlog")
    logging.getLogger("lib").info("from stdlib")

    records = lines(out)
    assert [r["event"] for r in records] == ["from structlog", "from stdlib"]
    for record in records:
        assert record["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
        assert record["span_id"] == "b7ad6b7169203331"


def test_reconfigure_replaces_handler_and_settings() -> None:
    first, second = io.StringIO(), io.StringIO()
    log = structlog.get_logger("meshkit.module")  # a module-level proxy, made before
    configure_logging(service="a", stream=first)
    configure_logging(service="b", stream=second)
    configure_logging(service="b", stream=second)

    ours = [h for h in logging.getLogger().handlers if type(h).__name__ == "_MeshkitHandler"]
    assert len(ours) == 1
    log.info("structlog line")
    logging.getLogger("lib").info("stdlib line")

    assert first.getvalue() == ""
    records = lines(second)
    assert [r["event"] for r in records] == ["structlog line", "stdlib line"]
    assert all(r["service"] == "b" for r in records)


def test_level_filters_both_paths() -> None:
    out = io.StringIO()
    configure_logging(level="warning", stream=out)
    structlog.get_logger().info("dropped")
    logging.getLogger("lib").info("dropped too")
    structlog.get_logger().warning("kept")
    assert [r["event"] for r in lines(out)] == ["kept"]


def test_level_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LEVEL_ENV, "DEBUG")
    out = io.StringIO()
    configure_logging(stream=out)
    structlog.get_logger().debug("shown")
    assert [r["event"] for r in lines(out)] == ["shown"]

    out = io.StringIO()
    configure_logging(level=logging.ERROR, stream=out)  # explicit level wins over env
    structlog.get_logger().warning("hidden")
    assert out.getvalue() == ""


def test_bad_level_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"the log level to be DEBUG, INFO.*found 'LOUD'"):
        configure_logging(level="LOUD", stream=io.StringIO())


def test_console_format_when_not_json() -> None:
    out = io.StringIO()
    configure_logging(json=False, service="echo", stream=out)
    structlog.get_logger("meshkit.x").info("hello", method="echo")
    text = out.getvalue()
    assert "hello" in text
    assert "method=echo" in text
    assert "service=echo" in text
    assert not text.lstrip().startswith("{")
    assert "\x1b[" not in text  # no colours when the stream is not a terminal
