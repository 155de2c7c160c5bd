"""examples/orders end to end: the orders RPC service publishes, the billing worker
charges; real processes (``meshkit run``), the real broker, a private local registry."""

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
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
import thriftpy2
from kafka_broker import KafkaBroker
from waiting import wait_until

from meshkit import Client

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "orders"
orders = thriftpy2.load(str(EXAMPLE / "orders.thrift"), module_name="orders_example_thrift")

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=2) as r:
            return int(r.status) == 200
    except (urllib.error.URLError, OSError):
        return False


class Proc:
    """``meshkit run TARGET`` with its output in a file."""

    def __init__(self, target: str, env: dict[str, str], log: Path, *args: str) -> None:
        self.health_port = _free_port()
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "meshkit",
                    "run",
                    target,
                    "--health-port",
                    str(self.health_port),
                    *args,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
            )
        deadline = time.monotonic() + 60
        while not _ready(self.health_port):
            assert self.proc.poll() is None, f"{target} exited:\n{self.output()}"
            assert time.monotonic() < deadline, f"{target} not ready:\n{self.output()}"
            time.sleep(0.1)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def env(broker: KafkaBroker, tmp_path: Path) -> Iterator[dict[str, str]]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MESHKIT_")}
    environ |= {
        "MESHKIT_MQ": broker.url,
        "MESHKIT_REGISTRY": f"local://{tmp_path / 'registry'}",
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    yield environ


def _charges(billing: Proc) -> list[dict[str, object]]:
    lines = []
    for line in billing.output().splitlines():
        if line.startswith("{") and '"charged"' in line:
            lines.append(json.loads(line))
    return lines


async def test_orders_placed_over_rpc_are_charged_once_each_in_order(
    env: dict[str, str], tmp_path: Path
) -> None:
    billing = Proc("examples/orders/billing.py:svc", env, tmp_path / "billing.log")
    port = _free_port()
    service = Proc(
        "examples/orders/service.py:svc", env, tmp_path / "orders.log", "--port", str(port)
    )
    try:
        placed: dict[str, list[str]] = defaultdict(list)
        async with Client(orders.Orders, "orders", addr=f"127.0.0.1:{port}", timeout=10) as c:
            for i in range(30):
                customer = f"c{i % 3}"
                placed[customer].append(await c.place(customer, 100 + i))
            with pytest.raises(orders.InvalidOrder, match="positive amount"):
                await c.place("c0", 0)
        # the README's command line, once
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "meshkit",
                "call",
                "orders",
                "place",
                "--idl",
                str(EXAMPLE / "orders.thrift"),
                "--arg",
                "customer=c0",
                "--arg",
                "amount_cents=1000",
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        placed["c0"].append(json.loads(result.stdout))
        await wait_until(lambda: len(_charges(billing)) >= 31, "31 orders charged", limit=60)
        time.sleep(1.0)  # anything charged twice would show up now
        charges = _charges(billing)
        assert len(charges) == 31
        by_customer: dict[str, list[str]] = defaultdict(list)
        for line in charges:
            by_customer[str(line["customer"])].append(str(line["order"]))
        assert by_customer == placed  # each once, each customer's in the order placed
        totals = {
            c: max(int(str(x["customer_total_cents"])) for x in charges if x["customer"] == c)
            for c in placed
        }
        assert totals == {
            "c0": sum(100 + i for i in range(0, 30, 3)) + 1000,
            "c1": sum(100 + i for i in range(1, 30, 3)),
            "c2": sum(100 + i for i in range(2, 30, 3)),
        }
    finally:
        assert service.stop() == 0, service.output()
        assert billing.stop() == 0, billing.output()
