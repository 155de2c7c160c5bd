"""Service lifecycle and configuration fixes: a failed or interrupted start leaves nothing
behind, a second signal forces the stop, URLs never print their credentials, bad settings
name their variable, and every log line carries the instance."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from echo_support import ROOT, EchoImpl, echo_thrift
from etcd_server import EtcdServer, free_port
from prometheus_client import CollectorRegistry
from waiting import finishes_within, wait_until

from meshkit import Client, Service
from meshkit._redact import redact_url
from meshkit.config.url import kv_from_url
from meshkit.errors import ConfigError, Unavailable
from meshkit.logs import configure_logging
from meshkit.mq.runtime import MqRuntime
from meshkit.mq.url import bootstrap_servers
from meshkit.registry import Instance, LocalRegistry, registry_from_url
from meshkit.registry.etcd import EtcdRegistry
from meshkit.settings import Settings

ECHO_IDL = ROOT / "examples" / "echo" / "echo.thrift"
TESTS = Path(__file__).resolve().parent
SECRET = "s3cret-pw"


# -- helpers -----------------------------------------------------------------------------


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _service(registry: Any, **options: Any) -> Service:
    svc = Service(
        "probe",
        echo_thrift.Echo,
        registry=registry,
        config_store=None,
        metrics_registry=CollectorRegistry(),
        **options,
    )
    svc.implement(EchoImpl())
    return svc


async def _records(directory: Path) -> list[Instance]:
    reg = LocalRegistry(str(directory))
    try:
        return await reg.resolve("probe")
    finally:
        await reg.close()


class _FailsAfterRegistering(LocalRegistry):
    """Writes the record, then fails (as a registry that loses its lease right after)."""

    async def register(self, instance: Instance) -> None:
        await super().register(instance)
        raise Unavailable("injected: the registry failed after the record was written")


class _EtcdFailsAfterRegistering(EtcdRegistry):
    """The etcd record and lease are written, then the start fails."""

    async def register(self, instance: Instance) -> None:
        await super().register(instance)
        raise Unavailable("injected: failed after the lease was granted")


class _BlocksInRegister(LocalRegistry):
    """Writes the record, then waits forever: a start that never completes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.written = asyncio.Event()

    async def register(self, instance: Instance) -> None:
        await super().register(instance)
        self.written.set()
        await asyncio.Event().wait()


class _FailsToClose(LocalRegistry):
    async def deregister(self, instance: Instance) -> None:
        await super().deregister(instance)
        raise Unavailable("injected: deregistration failed")

    async def close(self) -> None:
        await super().close()
        raise Unavailable("injected: close failed")


def _app(tmp_path: Path, body: str) -> str:
    path = tmp_path / "app.py"
    path.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(TESTS)!r})
            from echo_support import EchoImpl, echo_thrift
            from meshkit import Service
            svc = Service("probe", echo_thrift.Echo, config_store=None)
            svc.implement(EchoImpl())
            """
        )
        + textwrap.dedent(body)
    )
    return f"{path}:svc"


def _env(**extra: str) -> dict[str, str]:
    """The test's environment without MESHKIT_* settings (each test names its own)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHKIT_")}
    return {**env, **extra}


def _run(app: str, registry: str, *args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "meshkit", "run", app, "--registry", registry, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=ROOT,
    )


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


# -- 1. a failed or interrupted start leaves nothing behind ---------------------------------


async def test_failed_start_after_registering_deregisters_and_closes_everything(
    tmp_path: Path,
) -> None:
    before = asyncio.all_tasks()
    svc = _service(_FailsAfterRegistering(str(tmp_path)))
    with pytest.raises(Unavailable, match="injected"):
        await svc.start()
    assert svc.server is not None and svc.health is not None
    assert await _records(tmp_path) == []
    assert not _accepts(svc.server.port), "the RPC port still accepts connections"
    assert not _accepts(svc.health.port), "the health endpoint still answers"
    left = {t.get_name() for t in asyncio.all_tasks() - before if t is not asyncio.current_task()}
    assert left == set(), f"tasks left running: {left}"


async def test_failed_start_revokes_the_etcd_registration(etcd: EtcdServer) -> None:
    prefix = "/meshkit-test/failed-start"
    svc = _service(_EtcdFailsAfterRegistering.from_url(f"{etcd.url}?prefix={prefix}&ttl=30"))
    with pytest.raises(Unavailable, match="injected"):
        await svc.start()
    reg = registry_from_url(f"{etcd.url}?prefix={prefix}")
    try:
        assert await reg.resolve("probe") == []  # deleted at once, not after the 30 s TTL
    finally:
        await reg.close()


async def test_worker_that_cannot_start_is_never_registered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MESHKIT_MQ", raising=False)
    svc = _service(f"local://{tmp_path}")

    @svc.subscribe("orders")
    async def handle(msg: Any, ctx: Any) -> None:
        return None

    with pytest.raises(ConfigError, match="MESHKIT_MQ"):
        await svc.start()
    assert await _records(tmp_path) == []
    assert svc.server is not None and not _accepts(svc.server.port)


async def test_stop_requested_during_start_abandons_it_and_deregisters(tmp_path: Path) -> None:
    registry = _BlocksInRegister(str(tmp_path))
    svc = _service(registry)
    serving = asyncio.create_task(svc.serve())
    await asyncio.wait_for(registry.written.wait(), 10)
    assert len(await _records(tmp_path)) == 1
    svc.request_stop()
    await asyncio.wait_for(serving, 10)  # returns although start() never completed
    assert svc.clean_exit is False
    assert await _records(tmp_path) == []
    assert svc.server is not None and not _accepts(svc.server.port)


@pytest.mark.slow
def test_rpc_and_worker_service_is_not_ready_while_its_worker_starts(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    """An RPC + worker service whose broker does not answer: not ready, not registered
    while the worker is starting; SIGTERM then stops it with nothing registered."""
    app = _app(
        tmp_path,
        """
        @svc.subscribe("orders")
        async def handle(msg, ctx):
            pass
        """,
    )
    health_port = free_port()
    dead = free_port()
    registry_dir = tmp_path / "reg"
    env = _env(MESHKIT_MQ=f"kafka://127.0.0.1:{dead}")
    proc = _run(app, f"local://{registry_dir}", "--health-port", str(health_port), env=env)
    procs.append(proc)
    base = f"http://127.0.0.1:{health_port}"
    asyncio.run(wait_until(lambda: _status(base + "/health/live") == 200, "health endpoint up", 30))
    assert proc.poll() is None, "the worker's start ended early; this test needs it running"
    assert _status(base + "/health/ready") == 503
    assert list(registry_dir.glob("probe/*.json")) == []
    proc.send_signal(signal.SIGTERM)
    output = finishes_within(90, proc.communicate)[0]
    assert proc.returncode == 1, output
    assert list(registry_dir.glob("probe/*.json")) == [], output
    assert "stop requested while starting" in output


# -- 2. credentials in URLs are never printed back ------------------------------------------


def test_redact_url_masks_userinfo_and_token_values() -> None:
    assert redact_url(f"etcd://user:{SECRET}@h1:2379,h2:2379") == "etcd://***@h1:2379,h2:2379"
    assert (
        redact_url(f"consul://h:8500/x?prefix=/a&token={SECRET}#f")
        == "consul://h:8500/x?prefix=/a&token=<redacted>#f"
    )
    assert redact_url("local:///tmp/dir") == "local:///tmp/dir"
    assert redact_url(f"kafka://{SECRET}@h") == "kafka://***@h"


@pytest.mark.parametrize(
    "make",
    [
        lambda: registry_from_url(f"etcd://user:{SECRET}@127.0.0.1:2379"),
        lambda: registry_from_url(f"etcd://user:{SECRET}@127.0.0.1:2379/path"),
        lambda: registry_from_url(f"consul://user:{SECRET}@127.0.0.1:8500"),
        lambda: registry_from_url(f"http://user:{SECRET}@127.0.0.1:2379"),
        lambda: kv_from_url(f"etcd://user:{SECRET}@127.0.0.1:2379"),
        lambda: kv_from_url(f"etcd://user:{SECRET}@127.0.0.1:2379?bad=1"),
        lambda: kv_from_url(f"consul://user:{SECRET}@127.0.0.1:8500"),
        lambda: kv_from_url(f"http://user:{SECRET}@127.0.0.1:2379"),
        lambda: bootstrap_servers(f"kafka://user:{SECRET}@127.0.0.1:9092"),
        lambda: bootstrap_servers(f"kafka://user:{SECRET}@127.0.0.1:x"),
        lambda: bootstrap_servers(f"http://user:{SECRET}@127.0.0.1:9092"),
    ],
)
def test_url_errors_do_not_echo_credentials(make: Any) -> None:
    with pytest.raises(ConfigError) as info:
        make()
    message = str(info.value)
    assert SECRET not in message
    assert "***@" in message


def test_kafka_url_with_credentials_is_refused_with_the_sasl_hint() -> None:
    with pytest.raises(ConfigError, match=r"sasl\.username") as info:
        bootstrap_servers(f"kafka://user:{SECRET}@127.0.0.1:9092")
    assert SECRET not in str(info.value)
    runtime = MqRuntime("probe", f"kafka://user:{SECRET}@127.0.0.1:9092")
    assert SECRET not in json.dumps(runtime.info())


def test_meshkit_run_and_call_do_not_print_registry_credentials(tmp_path: Path) -> None:
    url = f"etcd://user:{SECRET}@127.0.0.1:2379"
    run = subprocess.run(
        [sys.executable, "-m", "meshkit", "run", "examples/echo/service.py:svc", "--registry", url],
        capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=60,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    call = subprocess.run(
        [sys.executable, "-m", "meshkit", "call", "echo", "echo", "--idl", str(ECHO_IDL),
         "--arg", "message=x", "--registry", url],
        capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=60,
    )  # fmt: skip
    assert call.returncode != 0
    for result in (run, call):
        assert SECRET not in result.stdout + result.stderr
        assert "etcd://***@127.0.0.1:2379" in result.stderr


# -- 3. drain timeout: finite ≥ 0; stop() runs every step ------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_drain_timeout_must_be_finite_and_names_the_variable(value: str) -> None:
    with pytest.raises(ConfigError, match="MESHKIT_DRAIN_TIMEOUT"):
        Settings.from_env({"MESHKIT_DRAIN_TIMEOUT": value})
    with pytest.raises(ConfigError, match="drain_timeout="):
        Service("probe", None, registry=None, config_store=None, drain_timeout=float(value))


async def test_stop_with_nan_drain_timeout_and_a_call_in_flight_still_stops(
    tmp_path: Path,
) -> None:
    svc = _service(f"local://{tmp_path}")
    await svc.start()
    async with Client(echo_thrift.Echo, "probe", addr=f"127.0.0.1:{svc.port}", timeout=30) as c:
        call = asyncio.ensure_future(c.slow(20_000))
        await wait_until(lambda: svc.server is not None and svc.server.in_flight == 1, "call in")
        assert await asyncio.wait_for(svc.stop(drain_timeout=math.nan), 20) is False
        call.cancel()
        await asyncio.gather(call, return_exceptions=True)
    assert not _accepts(svc.health_port)
    assert await _records(tmp_path) == []


async def test_stop_runs_every_step_when_one_fails(tmp_path: Path) -> None:
    svc = _service(_FailsToClose(str(tmp_path)))
    svc._owns_registry = True  # the service closes it, as one built from a URL
    await svc.start()
    with structlog.testing.capture_logs() as logs:
        assert await svc.stop() is True
    events = [entry["event"] for entry in logs]
    assert "deregistration failed" in events and "closing the registry failed" in events
    assert not _accepts(svc.health_port) and not _accepts(svc.port)
    assert await _records(tmp_path) == []


# -- 4. a client made before start() discovers through the service's registry -------------


async def test_client_made_before_start_uses_the_service_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MESHKIT_REGISTRY", raising=False)
    monkeypatch.setenv("MESHKIT_RUNTIME_DIR", str(tmp_path / "default-runtime"))
    url = f"local://{tmp_path / 'reg'}"
    echo = _service(url)
    gateway = Service(
        "gateway", echo_thrift.Echo, registry=url, config_store=None,
        metrics_registry=CollectorRegistry(),
    )  # fmt: skip
    gateway.implement(EchoImpl())
    early = gateway.client(echo_thrift.Echo, "probe", timeout=5.0)
    await echo.start()
    await gateway.start()
    try:
        assert early.resolver.registry is gateway.registry  # type: ignore[attr-defined]
        assert await early.echo("hi") == "hi"
    finally:
        await gateway.stop()
        await echo.stop()


# -- 5./6. logs: every line carries the instance; console never shows locals ----------------


def test_every_log_line_carries_service_and_instance(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    port, health_port = free_port(), free_port()
    proc = _run(
        "examples/echo/service.py:svc",
        f"local://{tmp_path}",
        "--port", str(port), "--health-port", str(health_port),
        env=_env(),
    )  # fmt: skip
    procs.append(proc)
    ready = f"http://127.0.0.1:{health_port}/health/ready"
    asyncio.run(wait_until(lambda: _status(ready) == 200, "service ready", 30))
    proc.send_signal(signal.SIGTERM)
    output = finishes_within(60, proc.communicate)[0]
    assert proc.returncode == 0, output
    lines = [json.loads(line) for line in output.splitlines()]
    assert {"service started", "signal received, draining", "service drained"} <= {
        d["event"] for d in lines
    }
    instances = {line.get("instance") for line in lines}
    assert len(instances) == 1 and None not in instances, output
    assert all(line.get("service") == "echo" for line in lines)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.mark.usefixtures("restore_logging")
def test_console_logs_never_show_frame_locals() -> None:
    # rich (a dev dependency) is what shows locals by default: the test needs it installed.
    import rich  # noqa: F401

    out = io.StringIO()
    configure_logging(json=False, stream=out, service="probe")
    try:
        db_password = SECRET  # noqa: F841 (a local the traceback must not show)
        {}["missing"]
    except KeyError:
        structlog.get_logger("probe").exception("handler failed")
    text = out.getvalue()
    assert "KeyError" in text and "handler failed" in text
    assert SECRET not in text


# -- 7. a second signal forces the stop; an unfinished drain exits 1 ------------------------


async def _slow_call_then(port: int, signals: list[signal.Signals], proc: Any) -> None:
    async with Client(echo_thrift.Echo, "probe", addr=f"127.0.0.1:{port}", timeout=120) as c:
        call = asyncio.ensure_future(c.slow(100_000))
        await asyncio.sleep(0.3)  # let the call reach the server (not a timing assertion)
        for sig in signals:
            proc.send_signal(sig)
            await asyncio.sleep(0.5)
        await wait_until(lambda: proc.poll() is not None, "the process exited", 30)
        call.cancel()
        await asyncio.gather(call, return_exceptions=True)


@pytest.mark.parametrize(
    ("drain_timeout", "signals"),
    [
        ("100", [signal.SIGTERM, signal.SIGINT]),  # a second signal cuts the drain short
        ("0.5", [signal.SIGTERM]),  # the drain timeout cuts the call off
    ],
)
def test_unfinished_drain_exits_1_and_a_second_signal_forces_it(
    tmp_path: Path,
    procs: list[subprocess.Popen[str]],
    drain_timeout: str,
    signals: list[signal.Signals],
) -> None:
    port, health_port = free_port(), free_port()
    proc = _run(
        _app(tmp_path, ""),
        f"local://{tmp_path / 'reg'}",
        "--port", str(port), "--health-port", str(health_port),
        env=_env(MESHKIT_DRAIN_TIMEOUT=drain_timeout),
    )  # fmt: skip
    procs.append(proc)
    ready = f"http://127.0.0.1:{health_port}/health/ready"
    asyncio.run(wait_until(lambda: _status(ready) == 200, "service ready", 30))
    asyncio.run(_slow_call_then(port, signals, proc))
    output = proc.communicate()[0]
    assert proc.returncode == 1, output
    assert list((tmp_path / "reg").glob("probe/*.json")) == []
    if len(signals) == 2:
        assert "second signal received" in output


# -- 8. bad settings name their variable; bind failures name the listener -------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"MESHKIT_PORT": "70000"}, "MESHKIT_PORT"),
        ({"MESHKIT_HEALTH_PORT": "-1"}, "MESHKIT_HEALTH_PORT"),
        ({"MESHKIT_MAX_CONCURRENCY": "0"}, "MESHKIT_MAX_CONCURRENCY"),
    ],
)
def test_range_errors_name_the_variable(env: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        Settings.from_env(env)


@pytest.mark.usefixtures("restore_logging")
def test_bad_log_level_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHKIT_LOG_LEVEL", "loud")
    with pytest.raises(ConfigError, match="MESHKIT_LOG_LEVEL"):
        configure_logging(stream=io.StringIO())


@pytest.mark.parametrize(
    ("options", "listener", "variable"),
    [
        ({"host": "no-such-host.invalid"}, "RPC", "MESHKIT_HOST"),
        (
            {"settings": Settings(health_host="no-such-host.invalid")},
            "health",
            "MESHKIT_HEALTH_HOST",
        ),
    ],
)
async def test_bind_failure_names_listener_address_and_variable(
    options: dict[str, Any], listener: str, variable: str
) -> None:
    svc = _service(None, **options)
    with pytest.raises(OSError) as info:
        await svc.start()
    message = str(info.value)
    assert f"cannot listen for {listener} on no-such" in message
    assert variable in message


def test_bind_failure_in_meshkit_run_names_the_health_listener(tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "meshkit", "run", "examples/echo/service.py:svc",
             "--registry", f"local://{tmp_path}", "--health-port", str(port)],
            capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=60,
        )  # fmt: skip
    finally:
        busy.close()
    assert result.returncode == 1
    assert f"cannot listen for health on 127.0.0.1:{port}" in result.stderr
    assert list(tmp_path.glob("echo/*.json")) == []


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_call_timeout_must_be_finite(value: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "meshkit", "call", "echo", "echo", "--idl", str(ECHO_IDL),
         "--arg", "message=x", "--addr", "127.0.0.1:1", "--timeout", value],
        capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "finite" in result.stderr
