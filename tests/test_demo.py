"""``meshkit demo``, end to end: it starts real service processes and drives real calls."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from meshkit.demo import INSTANCES, DemoInstance, run_demo

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 120.0


def demo_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHKIT_")}
    env["TMPDIR"] = str(tmp_path)  # the demo's private directory goes here
    # A user's settings must not leak into the demo's services.
    env["MESHKIT_PORT"] = "1"
    env["MESHKIT_REGISTRY"] = "local:///nonexistent-should-not-be-used"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def start_demo(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "meshkit", "demo", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=demo_env(tmp_path),
        cwd=tmp_path,
        # Ctrl-C must reach the demo even when the test runner was started with it ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for_children(proc: subprocess.Popen[str], count: int) -> list[int]:
    deadline = time.monotonic() + TIMEOUT
    while len(kids := children_of(proc.pid)) < count:
        assert proc.poll() is None, proc.communicate()
        if time.monotonic() > deadline:
            pytest.fail(f"the demo did not start {count} services within {TIMEOUT} s")
        time.sleep(0.05)
    return kids


def assert_cleaned_up(kids: Sequence[int], tmp_path: Path) -> None:
    deadline = time.monotonic() + 10
    while any(alive(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [k for k in kids if alive(k)], "demo services outlived the demo"
    assert list(tmp_path.glob("meshkit-demo-*")) == [], "the demo directory was not removed"


def test_demo_runs_and_reports(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "meshkit", "demo", "--duration", "1"],
        capture_output=True,
        text=True,
        env=demo_env(tmp_path),
        cwd=tmp_path,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    calls = int(re.search(r"^\s+calls\s+(\d+)$", out, re.M).group(1))  # type: ignore[union-attr]
    assert calls > 0
    assert re.search(r"^\s+errors\s+0$", out, re.M), out
    assert re.search(r"p50 [\d.]+ ms\s+p99 [\d.]+ ms", out)
    assert re.search(r"calls/s\s+\d+", out)
    # Every gateway call crossed to echo.
    served = dict(re.findall(r"(echo-1|echo-2|echo-canary|gateway-1) (\d+)", out))
    assert int(served["gateway-1"]) == calls
    echo = {slot: int(served[slot]) for slot in ("echo-1", "echo-2", "echo-canary")}
    assert sum(echo.values()) == calls, served  # every gateway call reached one echo
    assert echo["echo-1"] > 0 and echo["echo-2"] > 0, served  # balanced over the stable pool
    assert 0.05 < echo["echo-canary"] / calls < 0.4, served  # the 20 % canary rule
    for path in ("/health/ready", "/metrics", "/info"):
        assert out.count(path) == len(INSTANCES)
    assert "registry" in out and "meshkit call gateway greet --idl" in out
    assert "stopped gateway-1, echo-canary, echo-2, echo-1 (drained, exit 0)" in result.stderr
    assert list(tmp_path.glob("meshkit-demo-*")) == []


def test_demo_with_a_number_of_calls(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "meshkit", "demo", "--calls", "150", "--concurrency", "3"],
        capture_output=True,
        text=True,
        env=demo_env(tmp_path),
        cwd=tmp_path,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^\s+calls\s+150$", result.stdout, re.M)
    assert re.search(r"^\s+errors\s+0$", result.stdout, re.M)


def test_ctrl_c_during_traffic_stops_everything_and_exits_130(tmp_path: Path) -> None:
    proc = start_demo(tmp_path, "--duration", "60")
    try:
        kids = wait_for_children(proc, len(INSTANCES))
        assert proc.stderr is not None
        line = proc.stderr.readline()  # "services ready; sending ..."
        assert "services ready" in line, line + proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert "stopped gateway-1, echo-canary, echo-2, echo-1 (drained, exit 0)" in err
    assert_cleaned_up(kids, tmp_path)


def test_ctrl_c_ends_keep_running_with_exit_0(tmp_path: Path) -> None:
    proc = start_demo(tmp_path, "--calls", "50", "--keep-running")
    try:
        kids = wait_for_children(proc, len(INSTANCES))
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("  meshkit call gateway greet"):
                break
        assert seen and seen[-1].startswith("  meshkit call"), "".join(seen)
        # The services are still up: the hint works.
        registry = re.search(r"--registry (\S+)", seen[-1]).group(1)  # type: ignore[union-attr]
        idl = re.search(r"--idl (\S+)", seen[-1]).group(1)  # type: ignore[union-attr]
        env = demo_env(tmp_path)
        del env["MESHKIT_REGISTRY"]
        call = subprocess.run(
            [sys.executable, "-m", "meshkit", "call", "gateway", "greet", "--idl", idl,
             "--registry", registry, "--arg", "name=you"],
            capture_output=True, text=True, env=env, timeout=TIMEOUT,
        )  # fmt: skip
        assert call.returncode == 0, call.stderr
        assert call.stdout.strip() == '"hello, you"'
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopped gateway-1, echo-canary, echo-2, echo-1 (drained, exit 0)" in err
    assert_cleaned_up(kids, tmp_path)


def test_a_service_that_fails_to_start_fails_the_demo(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    broken = DemoInstance("broken-1", "gateway", "meshkit._demo.services:no_such_factory")
    code = run_demo(
        duration=0.5, instances=[INSTANCES[0], broken], out=out, err=err, base_dir=tmp_path
    )
    assert code == 1
    text = err.getvalue()
    assert "broken-1 (meshkit._demo.services:no_such_factory) exited with code 2" in text
    assert "has no attribute 'no_such_factory'" in text  # the tail of its log
    assert out.getvalue() == ""
    assert list(tmp_path.glob("meshkit-demo-*")) == []


@pytest.mark.parametrize(
    ("shipped", "example"),
    [
        ("meshkit/_demo/echo.thrift", "examples/echo/echo.thrift"),
        ("meshkit/_demo/gateway.thrift", "examples/gateway/gateway.thrift"),
    ],
)
def test_shipped_idls_match_the_examples(shipped: str, example: str) -> None:
    assert (ROOT / shipped).read_text() == (ROOT / example).read_text()
