"""The ``meshkit`` command line, end to end: real processes, real ports, a private registry."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ECHO_IDL = ROOT / "examples" / "echo" / "echo.thrift"
GATEWAY_IDL = ROOT / "examples" / "gateway" / "gateway.thrift"
START_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def meshkit_env(registry_url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHKIT_")}
    if registry_url is not None:
        env["MESHKIT_REGISTRY"] = registry_url
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def meshkit(
    *args: str, registry_url: str | None = None, timeout: float = 60.0, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshkit", *args],
        capture_output=True,
        text=True,
        env=meshkit_env(registry_url),
        cwd=cwd,
        timeout=timeout,
    )


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


@dataclass
class Running:
    proc: subprocess.Popen[str]
    port: int
    health_port: int
    registry_url: str
    registry_dir: Path
    log: Path

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_service(
    target: str, tmp: Path, *, extra: Sequence[str] = (), cwd: Path = ROOT
) -> Running:
    registry_dir = tmp / "registry"
    registry_url = f"local://{registry_dir}"
    port, health_port = free_port(), free_port()
    log = tmp / f"service-{port}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "meshkit",
                "run",
                target,
                "--port",
                str(port),
                "--health-port",
                str(health_port),
                *extra,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env=meshkit_env(registry_url),
            cwd=cwd,
        )
    running = Running(proc, port, health_port, registry_url, registry_dir, log)
    deadline = time.monotonic() + START_TIMEOUT
    ready = f"http://127.0.0.1:{health_port}/health/ready"
    while http_status(ready) != 200:
        if proc.poll() is not None:
            raise AssertionError(f"meshkit run exited with {proc.returncode}:\n{running.output()}")
        if time.monotonic() > deadline:
            stop(running)
            raise AssertionError(f"not ready after {START_TIMEOUT} s:\n{running.output()}")
        time.sleep(0.1)
    return running


def stop(running: Running) -> int:
    if running.proc.poll() is None:
        running.proc.send_signal(signal.SIGTERM)
        try:
            running.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            running.proc.kill()
            running.proc.wait()
    return running.proc.returncode


@pytest.fixture(scope="module")
def echo_running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    running = start_service("examples/echo/service.py:svc", tmp_path_factory.mktemp("echo"))
    try:
        yield running
    finally:
        stop(running)


# -- meshkit call ----------------------------------------------------------------------------


def test_call_through_the_registry(echo_running: Running) -> None:
    result = meshkit(
        "call", "echo", "echo", "--idl", str(ECHO_IDL), "--arg", "message=hi",
        registry_url=echo_running.registry_url,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == "hi"
    assert result.stdout.strip() == '"hi"'


def test_call_with_registry_option_and_json_args(echo_running: Running) -> None:
    result = meshkit(
        "call", "echo", "reverse", "--idl", str(ECHO_IDL),
        "--registry", echo_running.registry_url, "--json", '{"message": "abc"}',
        "--header", "user-id=42", "--timeout", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == "cba"


def test_call_by_address(echo_running: Running) -> None:
    result = meshkit(
        "call", "echo", "slow", "--idl", str(ECHO_IDL), "--addr", echo_running.addr,
        "--arg", "delay_ms=5",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == 5


def test_call_oneway_prints_null(echo_running: Running) -> None:
    result = meshkit("call", "echo", "ping", "--idl", str(ECHO_IDL), "--addr", echo_running.addr)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) is None


def test_idl_exception_prints_json_error_and_exits_1(echo_running: Running) -> None:
    result = meshkit(
        "call", "echo", "reverse", "--idl", str(ECHO_IDL), "--addr", echo_running.addr,
        "--arg", "message=",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert json.loads(result.stdout) == {
        "error": "EchoError",
        "fields": {"reason": "empty message"},
    }


def test_unknown_method_lists_the_methods(echo_running: Running) -> None:
    result = meshkit("call", "echo", "shout", "--idl", str(ECHO_IDL), "--addr", echo_running.addr)
    assert result.returncode == 2
    assert "shout" in result.stderr
    for method in ("echo", "reverse", "slow", "ping"):
        assert method in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--arg", "nope=1"], "expected echo(string message)"),
        (["--arg", "message"], "expected --arg NAME=VALUE"),
        (["--json", "[1]"], "expected a JSON object"),
        (["--json", '{"message": 5}'], "message: expected a string, found 5"),
    ],
)
def test_bad_arguments_are_usage_errors(args: list[str], expected: str) -> None:
    result = meshkit("call", "echo", "echo", "--idl", str(ECHO_IDL), "--addr", "127.0.0.1:1", *args)
    assert result.returncode == 2
    assert expected in result.stderr


def test_wrong_type_for_an_integer_argument() -> None:
    result = meshkit(
        "call", "echo", "slow", "--idl", str(ECHO_IDL), "--addr", "127.0.0.1:1",
        "--arg", "delay_ms=soon",
    )  # fmt: skip
    assert result.returncode == 2
    assert "delay_ms: expected i32, found 'soon'" in result.stderr


def test_meshkit_error_goes_to_stderr_and_exits_1(tmp_path: Path) -> None:
    result = meshkit(
        "call", "echo", "echo", "--idl", str(ECHO_IDL), "--arg", "message=hi", "--timeout", "2",
        registry_url=f"local://{tmp_path / 'empty-registry'}",
    )  # fmt: skip
    assert result.returncode == 1
    assert "NO_INSTANCES" in result.stderr
    assert result.stdout == ""


def test_call_picks_the_service_class(tmp_path: Path) -> None:
    idl = tmp_path / "two.thrift"
    idl.write_text("service Alpha { string a() }\nservice Beta { string b() }\n")
    result = meshkit("call", "gamma", "a", "--idl", str(idl), "--addr", "127.0.0.1:1")
    assert result.returncode == 2
    assert "Alpha, Beta" in result.stderr and "--service-class" in result.stderr
    result = meshkit(
        "call", "x", "a", "--idl", str(idl), "--service-class", "Beta", "--addr", "127.0.0.1:1"
    )
    assert result.returncode == 2
    assert "Beta has no method 'a'; expected one of: b" in result.stderr


RICH_IDL = """\
enum Color { RED = 1, GREEN = 2 }
struct Point { 1: i32 x, 2: i32 y, 3: optional string label }
struct Shape {
  1: list<Point> points,
  2: map<string, double> weights,
  3: set<i16> ids,
  4: Color color,
  5: binary data,
  6: bool filled,
  7: map<i64, Point> by_id,
}
exception Invalid { 1: string why, 2: i32 code }
service Shapes {
  Shape roundtrip(1: Shape shape, 2: byte flags, 3: i64 big, 4: Color color)
  void nothing()
  binary raw(1: binary data)
  bool check(1: bool value, 2: double ratio) throws (1: Invalid invalid)
}
"""

RICH_SERVICE = """\
from pathlib import Path

import thriftpy2

from meshkit import Service

shapes = thriftpy2.load(str(Path(__file__).with_name("shapes.thrift")), module_name="shapes_thrift")


class Shapes:
    async def roundtrip(self, shape, flags, big, color):
        assert isinstance(shape.data, bytes) and flags == -3 and big == 2**40 and color == 2
        return shape

    async def nothing(self):
        return None

    async def raw(self, data):
        return data[::-1]

    async def check(self, value, ratio):
        if not value:
            raise shapes.Invalid(why=f"ratio {ratio}", code=7)
        return value


def make():
    svc = Service("shapes", shapes.Shapes)
    svc.implement(Shapes())
    return svc
"""


def test_types_round_trip_through_a_real_service(tmp_path: Path) -> None:
    (tmp_path / "shapes.thrift").write_text(RICH_IDL)
    (tmp_path / "shapes_app.py").write_text(RICH_SERVICE)
    # Module form with --app-dir, and a factory instead of a Service object.
    running = start_service(
        "shapes_app:make", tmp_path, extra=["--app-dir", str(tmp_path), "--log-level", "warning"]
    )
    try:
        idl = str(tmp_path / "shapes.thrift")
        shape = {
            "points": [{"x": 1, "y": -2}, {"x": 3, "y": 4, "label": "p"}],
            "weights": {"a": 0.5, "b": 2},
            "ids": [3, 1, 2],
            "color": "RED",
            "data": "AAEC/w==",
            "filled": True,
            "by_id": {"10": {"x": 0, "y": 0}},
        }
        result = meshkit(
            "call", "shapes", "roundtrip", "--idl", idl, "--addr", running.addr,
            "--json", json.dumps({"shape": shape, "big": 2**40}),
            "--arg", "flags=-3", "--arg", "color=GREEN",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {
            "points": [{"x": 1, "y": -2, "label": None}, {"x": 3, "y": 4, "label": "p"}],
            "weights": {"a": 0.5, "b": 2.0},
            "ids": [1, 2, 3],
            "color": "RED",
            "data": "AAEC/w==",
            "filled": True,
            "by_id": {"10": {"x": 0, "y": 0, "label": None}},
        }

        result = meshkit(
            "call", "shapes", "raw", "--idl", idl, "--addr", running.addr, "--arg", "data=AAEC"
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == "AgEA"

        result = meshkit("call", "shapes", "nothing", "--idl", idl, "--addr", running.addr)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) is None

        result = meshkit(
            "call", "shapes", "check", "--idl", idl, "--addr", running.addr,
            "--arg", "value=false", "--arg", "ratio=0.25",
        )  # fmt: skip
        assert result.returncode == 1
        assert json.loads(result.stdout) == {
            "error": "Invalid",
            "fields": {"why": "ratio 0.25", "code": 7},
        }

        result = meshkit(
            "call", "shapes", "roundtrip", "--idl", idl, "--addr", running.addr,
            "--arg", "flags=300",
        )  # fmt: skip
        assert result.returncode == 2
        assert "flags: expected byte between -128 and 127, found 300" in result.stderr
        result = meshkit(
            "call", "shapes", "roundtrip", "--idl", idl, "--addr", running.addr,
            "--arg", "color=BLUE",
        )  # fmt: skip
        assert result.returncode == 2
        assert "Color (RED, GREEN or an integer)" in result.stderr
    finally:
        assert stop(running) == 0


# -- meshkit run -----------------------------------------------------------------------------


def test_sigterm_drains_deregisters_and_exits_0(tmp_path: Path) -> None:
    # Module form, from the repository root (examples/ is a namespace package).
    running = start_service("examples.echo.service:svc", tmp_path)
    records = list((running.registry_dir / "echo").glob("*.json"))
    assert len(records) == 1
    record = json.loads(records[0].read_text())
    assert record["port"] == running.port and record["health_port"] == running.health_port
    assert record["pid"] == running.proc.pid

    result = meshkit(
        "call", "echo", "echo", "--idl", str(ECHO_IDL), "--arg", "message=bye",
        registry_url=running.registry_url,
    )  # fmt: skip
    assert json.loads(result.stdout) == "bye"

    assert stop(running) == 0, running.output()
    assert list((running.registry_dir / "echo").glob("*.json")) == []
    assert "service drained" in running.output()


def test_options_override_environment(tmp_path: Path) -> None:
    # MESHKIT_REGISTRY in the environment points elsewhere; --registry wins.
    env_registry = tmp_path / "from-env"
    option_registry = tmp_path / "from-option"
    health_port = free_port()
    env = meshkit_env(f"local://{env_registry}")
    env["MESHKIT_HEALTH_PORT"] = "1"  # would fail (privileged); --health-port wins
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "meshkit", "run", "examples/echo/service.py:svc",
            "--registry", f"local://{option_registry}", "--health-port", str(health_port),
        ],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while http_status(f"http://127.0.0.1:{health_port}/health/ready") != 200:
            assert proc.poll() is None, proc.communicate()[0]
            if time.monotonic() > deadline:
                pytest.fail(f"meshkit run was not ready within {START_TIMEOUT} s")
            time.sleep(0.1)
        assert len(list((option_registry / "echo").glob("*.json"))) == 1
        assert not env_registry.exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, output


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("examples/echo/service.py", "expected MODULE:ATTR"),
        ("no_colon_here", "expected MODULE:ATTR"),
        ("examples.echo.service:", "expected MODULE:ATTR"),
        ("not a module:svc", "expected MODULE:ATTR"),
        ("no_such_module_xyz:svc", "cannot import module 'no_such_module_xyz'"),
        ("examples/echo/missing.py:svc", "no such file"),
        ("examples/echo/service.py:nope", "has no attribute 'nope'; Service objects in it: svc"),
        ("examples/echo/service.py:echo", "expected examples/echo/service.py:echo to be"),
        ("examples/echo/service.py:Echo", "found type"),
        ("os:getcwd", "expected the factory os:getcwd to return a meshkit.Service, found str"),
        ("os.path:join", "a callable that takes arguments"),
    ],
)
def test_bad_targets_exit_2_with_a_message(target: str, expected: str) -> None:
    result = meshkit("run", target, "--port", "0", "--health-port", "0", timeout=60)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_app_that_raises_while_loading_exits_1_with_traceback(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("import no_such_dependency_xyz\n")
    result = meshkit("run", f"{tmp_path / 'broken.py'}:svc")
    assert result.returncode == 1
    assert "raised while loading" in result.stderr
    assert "no_such_dependency_xyz" in result.stderr


def test_service_that_cannot_bind_exits_1(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = meshkit(
            "run", "examples/echo/service.py:svc", "--port", str(port),
            registry_url=f"local://{tmp_path / 'registry'}",
        )  # fmt: skip
    assert result.returncode == 1
    assert "could not start" in result.stderr


def test_file_form_works_from_another_directory(tmp_path: Path) -> None:
    running = start_service(str(ROOT / "examples" / "gateway" / "service.py") + ":svc", tmp_path,
                            cwd=tmp_path)  # fmt: skip
    try:
        echo = start_service(str(ROOT / "examples" / "echo" / "service.py") + ":svc", tmp_path,
                             cwd=tmp_path)  # fmt: skip
        try:
            result = meshkit(
                "call", "gateway", "greet", "--idl", str(GATEWAY_IDL), "--arg", "name=you",
                registry_url=running.registry_url, cwd=tmp_path,
            )  # fmt: skip
            assert result.returncode == 0, result.stderr
            assert json.loads(result.stdout) == "hello, you"
        finally:
            assert stop(echo) == 0
    finally:
        assert stop(running) == 0


# -- the rest ------------------------------------------------------------------------------


def test_version() -> None:
    from meshkit import __version__

    result = meshkit("version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"meshkit {__version__}"


def test_help_lists_the_commands() -> None:
    result = meshkit("--help")
    assert result.returncode == 0
    for command in ("run", "call", "demo", "version"):
        assert command in result.stdout


def test_examples_client_script(echo_running: Running) -> None:
    for extra in ([], ["--sync"], ["--addr", echo_running.addr]):
        result = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "echo" / "client.py"), "abc", *extra],
            capture_output=True,
            text=True,
            env=meshkit_env(echo_running.registry_url),
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert "cba" in result.stdout


def test_output_does_not_echo_the_environment(echo_running: Running) -> None:
    secret = "s3cr3t-value-that-must-not-appear"
    env = meshkit_env(echo_running.registry_url)
    env["MESHKIT_SECRET_TOKEN"] = secret
    result = subprocess.run(
        [sys.executable, "-m", "meshkit", "call", "echo", "nope", "--idl", str(ECHO_IDL)],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert secret not in result.stdout + result.stderr
