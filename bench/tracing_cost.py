"""Tracing cost per call, in one process: deterministic enough for callgrind.

    python bench/tracing_cost.py --calls 2000             # CPU µs per call, every mode
    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python bench/tracing_cost.py --mode 100pct --calls 300   # instructions: run N and
                                                                 # 3N, difference / 2N

A meshkit echo Service and a meshkit Client share one event loop and call each other
``--calls`` times, one call at a time by default (the same code path every call;
``--concurrency`` for more in flight).
Tracing modes are those of ``bench/tracing.py``; spans go through meshkit's export queue
to an exporter that *encodes* each batch (the OTLP bytes the real exporter would post)
and discards it, and the queue is flushed before the process ends, so encoding is counted
whatever the background thread's timing. Both the client's and the server's spans are
recorded by this one process (two spans per call at 100 %).

``--hook-only``: the tracer hook alone (a client span and its server span per iteration,
no RPC and no event loop), whose instruction counts hardly move between runs.

Without ``--mode``, every mode runs in turn (a fresh provider each, interleaved
``--rounds`` times) and the CPU time per call (``time.process_time``, all threads) is
printed with ratios to ``off``; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ECHO_THRIFT = BENCH_DIR / "echo.thrift"
MODES: dict[str, dict[str, Any]] = {
    "off": {},
    "100pct": {"sample": 1.0, "tail": True},
    "1pct": {"sample": 0.01, "tail": True},
    "1pct_notail": {"sample": 0.01, "tail": False},
}


class EncodingSink:
    """An exporter that encodes every batch as the OTLP exporter would, then drops it."""

    def __init__(self) -> None:
        self.spans = 0
        self.bytes = 0

    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        from meshkit.tracing.otlp_encode import encode_request

        self.bytes += len(encode_request(spans))
        self.spans += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def run_mode(
    mode: str, calls: int, warmup: int, concurrency: int = 1, export_to: str | None = None
) -> dict[str, float]:
    """Set up ``mode``, make ``calls`` calls after ``warmup``; CPU seconds and spans."""
    import thriftpy2
    from opentelemetry import trace
    from prometheus_client import CollectorRegistry

    from meshkit import Client, Service, _loop
    from meshkit.tracing.otel import OTelHook
    from meshkit.tracing.provider import TraceSettings, build_provider

    echo = thriftpy2.load(str(ECHO_THRIFT), module_name="echo_thrift")
    sink = EncodingSink()
    provider: Any = None
    if MODES[mode]:
        exporter: Any = sink
        if export_to:
            from meshkit.tracing.otlp_encode import OtlpHttpExporter

            exporter = OtlpHttpExporter(export_to)
        provider = build_provider(
            TraceSettings(sample=MODES[mode]["sample"], tail=MODES[mode]["tail"]),
            exporter=exporter,
            service="bench-echo",
            metrics_registry=CollectorRegistry(),
        )
        hook = OTelHook(provider)
    else:
        hook = OTelHook(trace.NoOpTracerProvider())

    class Echo:
        async def echo(self, message: str) -> str:
            return message

        async def reverse(self, message: str) -> str:
            return message[::-1]

        async def slow(self, delay_ms: int) -> int:
            return delay_ms

        async def ping(self) -> None:
            return None

    message = "x" * 100

    async def main() -> dict[str, float]:
        svc = Service("bench-echo", echo.Echo, registry=None, tracer=hook)
        svc.implement(Echo())
        await svc.start(port=0, health_port=0)
        try:
            async with Client(
                echo.Echo, "bench-echo", addr=f"127.0.0.1:{svc.port}", timeout=5, tracer=hook
            ) as client:
                for _ in range(warmup):
                    await client.echo(message)
                if provider is not None:
                    provider.force_flush()
                spans0 = sink.spans
                cpu0 = time.process_time()

                async def worker(n: int) -> None:
                    for _ in range(n):
                        await client.echo(message)

                share, extra = divmod(calls, concurrency)
                await asyncio.gather(*(worker(share + (i < extra)) for i in range(concurrency)))
                if provider is not None:
                    provider.force_flush()
                cpu = time.process_time() - cpu0
        finally:
            await svc.stop(drain_timeout=1.0)
        if provider is not None:
            provider.shutdown()
        return {"cpu_s": cpu, "spans": sink.spans - spans0}

    return _loop.run(main())


def run_hook_only(mode: str, calls: int, warmup: int) -> dict[str, float]:
    """The tracer hook alone, no RPC: per iteration a client span and the server span under
    it, with ``CallContext``s as the pipelines build them; spans encoded as in
    :func:`run_mode`. Far steadier under callgrind than the RPC run (no event loop)."""
    import time as _time

    from opentelemetry import trace
    from prometheus_client import CollectorRegistry

    from meshkit.rpc.context import CallContext
    from meshkit.tracing.otel import OTelHook
    from meshkit.tracing.provider import TraceSettings, build_provider

    sink = EncodingSink()
    provider: Any = None
    if MODES[mode]:
        provider = build_provider(
            TraceSettings(sample=MODES[mode]["sample"], tail=MODES[mode]["tail"]),
            exporter=sink,
            service="bench-echo",
            metrics_registry=CollectorRegistry(),
        )
        hook = OTelHook(provider)
    else:
        hook = OTelHook(trace.NoOpTracerProvider())

    def one() -> None:
        client = CallContext("echo", "echo", caller="gateway", peer="127.0.0.1:9090")
        client.deadline = _time.monotonic() + 5
        client.headers["meshkit-timeout-ms"] = "5000"
        handle = hook.start_client(client)
        server = CallContext("echo", "echo", headers=dict(client.headers), peer="127.0.0.1:5")
        server.deadline = _time.monotonic() + 5
        server_handle = hook.start_server(server)
        if server_handle is not None:
            hook.end(server_handle, server, None)
        if handle is not None:
            hook.end(handle, client, None)

    for _ in range(warmup):
        one()
    if provider is not None:
        provider.force_flush()
    spans0 = sink.spans
    cpu0 = time.process_time()
    for _ in range(calls):
        one()
    if provider is not None:
        provider.force_flush()
    cpu = time.process_time() - cpu0
    if provider is not None:
        provider.shutdown()
    return {"cpu_s": cpu, "spans": sink.spans - spans0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--mode", choices=sorted(MODES), help="one mode only (for callgrind)")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--export-to", help="an OTLP/HTTP URL: export there instead of encoding only")
    ap.add_argument("--concurrency", type=int, default=1, help="calls in flight (1: one at a time)")
    ap.add_argument(
        "--hook-only",
        action="store_true",
        help="the tracer hook alone (no RPC, no event loop): steadier instruction counts",
    )
    args = ap.parse_args(argv)
    if args.mode and args.hook_only:
        result = run_hook_only(args.mode, args.calls, args.warmup)
        print(json.dumps({"mode": args.mode, "hook_only": True, "calls": args.calls, **result}))
        return 0
    if args.mode:
        result = run_mode(args.mode, args.calls, args.warmup, args.concurrency, args.export_to)
        print(json.dumps({"mode": args.mode, "calls": args.calls, **result}))
        return 0
    load = Path("/proc/loadavg").read_text().split()[:3]
    per_call: dict[str, list[float]] = {m: [] for m in MODES}
    spans: dict[str, float] = {}
    for _ in range(args.rounds):
        for mode in MODES:
            if args.hook_only:
                result = run_hook_only(mode, args.calls, args.warmup)
            else:
                result = run_mode(mode, args.calls, args.warmup, args.concurrency, args.export_to)
            per_call[mode].append(result["cpu_s"] / args.calls * 1e6)
            spans[mode] = result["spans"] / args.calls
    medians = {m: statistics.median(v) for m, v in per_call.items()}
    for mode, us in medians.items():
        sys.stderr.write(
            f"{mode:12s} {us:7.1f} µs CPU/call  (+{us - medians['off']:6.1f})  "
            f"{spans[mode]:.2f} spans exported/call\n"
        )
    out = {
        "load": " ".join(load),
        "calls": args.calls,
        "rounds": args.rounds,
        "concurrency": args.concurrency,
        **{f"{m}_cpu_us_per_call": round(v, 1) for m, v in medians.items()},
        **{
            f"{m}_extra_us_per_call": round(medians[m] - medians["off"], 1)
            for m in MODES
            if m != "off"
        },
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
