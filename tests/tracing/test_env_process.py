"""A real service process configured only by MESHKIT_TRACES exports to the collector.

The process installs meshkit's provider by itself (no code), names its spans after the
service, continues the caller's W3C context from the THeader headers, puts trace ids
on its log lines, and exports what is queued when SIGTERM drains it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from echo_support import ROOT, echo_thrift
from prometheus_client import CollectorRegistry
from tracing_support import flushed, get_json, get_trace
from waiting import wait_until

from meshkit import Client
from meshkit.registry import LocalRegistry
from meshkit.tracing.collector import Collector
from meshkit.tracing.otel import OTelHook

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


async def test_service_process_exports_by_env_and_flushes_on_sigterm(
    collector: Collector, tmp_path: Path
) -> None:
    registry_url = f"local://{tmp_path / 'registry'}"
    env = {
        **os.environ,
        "MESHKIT_TRACES": collector.url,
        "MESHKIT_LOG_LEVEL": "debug",
        "MESHKIT_REGISTRY": registry_url,
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshkit", "run", "examples/echo/service.py:svc"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        reg = LocalRegistry(registry_url.removeprefix("local://"))

        async def registered() -> bool:
            return bool(await reg.resolve("echo"))

        await wait_until(registered, "the echo process registered", limit=30)
        instance = (await reg.resolve("echo"))[0]
        await reg.close()
        # A foreign THeader caller: only the W3C header, no meshkit span on this side.
        from opentelemetry.trace import NoOpTracerProvider

        async with Client(
            echo_thrift.Echo,
            "echo",
            addr=instance.address,
            tracer=OTelHook(tracer_provider=NoOpTracerProvider()),
            metrics_registry=CollectorRegistry(),
        ) as client:
            headers = {"traceparent": f"00-{TRACE_ID}-{PARENT}-01"}
            assert await client.call("reverse", "abc", headers=headers) == "cba"
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.to_thread(proc.wait, 30)
        output = proc.stdout.read().decode() if proc.stdout else ""
        assert rc == 0, output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    await flushed(collector)
    status, trace = await get_trace(collector.url, TRACE_ID)
    assert status == 200, (trace, output)
    (span,) = trace["spans"]
    assert span["parent_id"] == PARENT
    assert (span["service"], span["name"], span["kind"]) == ("echo", "echo/reverse", "SERVER")
    assert trace["resources"][span["resource"]]["service.name"] == "echo"
    assert span["attrs"]["meshkit.instance"] == instance.instance_id
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    access = [r for r in lines if r.get("event") == "rpc" and r.get("side") == "server"]
    assert access and access[0]["trace_id"] == TRACE_ID
    _, stats = await get_json(collector.url + "/api/stats")
    assert stats["spans_received"] == 1
