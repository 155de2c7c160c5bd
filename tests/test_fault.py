"""Fault test: three instances under steady load; one is SIGKILLed, one is SIGTERMed.

SIGKILL: no idempotent call fails (calls caught on the dead connection are retried on
another instance). SIGTERM: no call of any kind fails (the instance deregisters, tells
meshkit clients to go away, answers what it received, and only then exits).
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from echo_support import ROOT, echo_thrift

from meshkit import Client
from meshkit.registry import LocalRegistry

INSTANCE = textwrap.dedent(
    """
    import asyncio, sys
    sys.path.insert(0, {tests!r})
    from echo_support import EchoImpl, echo_thrift
    from meshkit import Service

    class Named(EchoImpl):
        async def echo(self, message):
            await asyncio.sleep(0.002)
            return message + "@" + {name!r}

    svc = Service("fault", echo_thrift.Echo, registry={registry!r})
    svc.implement(Named)
    svc.run()
    """
)


def start_instance(tmp: Path, registry: str, name: str) -> subprocess.Popen[bytes]:
    script = tmp / f"{name}.py"
    script.write_text(INSTANCE.format(tests=str(ROOT / "tests"), registry=registry, name=name))
    env = {**os.environ, "MESHKIT_DRAIN_TIMEOUT": "10", "MESHKIT_LOG_LEVEL": "warning"}
    return subprocess.Popen([sys.executable, str(script)], env=env)


async def wait_instances(reg: LocalRegistry, count: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(await reg.resolve("fault")) == count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"expected {count} instances, found {len(await reg.resolve('fault'))}")


async def steady_load(
    client: Client, method: str, stop: asyncio.Event, served: collections.Counter[str]
) -> list[BaseException]:
    errors: list[BaseException] = []

    async def worker(n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                if method == "echo":
                    reply = await client.echo(f"{n}-{i}")
                    served[reply.rsplit("@", 1)[1]] += 1
                else:
                    assert await client.reverse(f"{n}-{i}") == f"{n}-{i}"[::-1]
                    served["reverse"] += 1
            except Exception as exc:
                errors.append(exc)

    await asyncio.gather(*(worker(n) for n in range(8)))
    return errors


async def test_sigkill_and_sigterm_under_load(tmp_path: Path) -> None:
    registry = f"local://{tmp_path / 'registry'}"
    reg = LocalRegistry(registry.removeprefix("local://"), ttl=2.0)
    procs = {name: start_instance(tmp_path, registry, name) for name in ("a", "b", "c")}
    try:
        await wait_instances(reg, 3)
        async with Client(
            echo_thrift.Echo, "fault", registry=registry, timeout=5.0, idempotent=["echo"]
        ) as client:
            # 1. SIGKILL one instance while idempotent calls flow.
            stop = asyncio.Event()
            served: collections.Counter[str] = collections.Counter()
            load = asyncio.ensure_future(steady_load(client, "echo", stop, served))
            await asyncio.sleep(1.0)
            assert set(served) == {"a", "b", "c"}, served
            procs["a"].send_signal(signal.SIGKILL)
            await asyncio.to_thread(procs["a"].wait, 10)
            await asyncio.sleep(0.3)  # replies "a" sent before it died may still be read
            before = served.copy()
            await asyncio.sleep(1.2)
            stop.set()
            errors = await load
            assert errors == [], errors[:3]
            assert served["a"] == before["a"], "a dead instance answered"
            assert served["b"] > before["b"] and served["c"] > before["c"]

            # 2. SIGTERM another while NON-idempotent calls flow: nothing may fail.
            stop = asyncio.Event()
            counts: collections.Counter[str] = collections.Counter()
            load = asyncio.ensure_future(steady_load(client, "reverse", stop, counts))
            await asyncio.sleep(0.5)
            procs["b"].send_signal(signal.SIGTERM)
            rc = await asyncio.to_thread(procs["b"].wait, 20)
            await asyncio.sleep(0.5)
            stop.set()
            errors = await load
            assert rc == 0
            assert errors == [], errors[:3]
            assert counts["reverse"] > 0
            # The survivor serves everything now.
            replies = await asyncio.gather(*(client.echo(str(i)) for i in range(20)))
            assert {r.rsplit("@", 1)[1] for r in replies} == {"c"}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        await reg.close()
