"""Tracing benchmark: what spans and export cost, collector ingest, viewer render time.

    python bench/tracing.py              # about two minutes
    python bench/tracing.py --quick      # about a minute
    python bench/tracing.py --duration 3 --rounds 5

1. RPC throughput of a meshkit echo Service called by a meshkit Client (each its own
   process, concurrency 16, 100 B) with tracing
   ``off`` (no ``MESHKIT_TRACES``), ``100pct`` (every span exported to the bundled
   collector, itself a third process), ``100pct_sink`` (the same, exported to a sink that
   discards the requests: the services' own cost), ``1pct`` (head sampling 1 %, tail keeping on: the
   default) and ``1pct_notail`` (1 %, ``MESHKIT_TRACES_TAIL=0``). The modes run
   interleaved for ``--rounds`` rounds; the median per mode is reported, as ratios to
   ``off``. Exported and dropped span counts come from the processes' Prometheus
   counters.
2. Collector ingest: protobuf batches of 512 spans posted by 4 concurrent senders to a
   collector process until every span is in SQLite (``/api/stats``).
3. Viewer: time from navigation to a drawn waterfall for a 10k-span trace in Debian's
   Chromium (Playwright), median of 3.

Load (``/proc/loadavg``) is printed before and after. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
ECHO_THRIFT = BENCH_DIR / "echo.thrift"  # echo only, as bench/rpc.py uses
MODES: dict[str, dict[str, str]] = {
    "off": {},
    "100pct": {"MESHKIT_TRACES_SAMPLE": "1"},
    # every span exported to a sink that discards it: the services' own cost, without the
    # collector's CPU (on this 2-core machine the collector competes with both processes)
    "100pct_sink": {"MESHKIT_TRACES_SAMPLE": "1"},
    "1pct": {"MESHKIT_TRACES_SAMPLE": "0.01"},
    "1pct_notail": {"MESHKIT_TRACES_SAMPLE": "0.01", "MESHKIT_TRACES_TAIL": "0"},
}
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless=new",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]


def log(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode} while starting")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_collector(tmp: Path, name: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshkit", "traces", "serve", "--port", str(port),
         "--db", str(tmp / f"{name}.db")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/api/stats", proc)
    return proc, url


# -- child processes: the echo server and the client ------------------------------------


def run_server(port_file: str) -> None:
    import thriftpy2

    from meshkit import Service

    echo = thriftpy2.load(str(ECHO_THRIFT), module_name="echo_thrift")

    class Echo:
        async def echo(self, message: str) -> str:
            return message

        async def reverse(self, message: str) -> str:
            return message[::-1]

        async def slow(self, delay_ms: int) -> int:
            await asyncio.sleep(delay_ms / 1000)
            return delay_ms

        async def ping(self) -> None:
            return None

    svc = Service("bench-echo", echo.Echo, registry=None)
    svc.implement(Echo())

    async def main() -> None:
        stopped = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stopped.set)
        await svc.start(port=0, health_port=0)
        Path(port_file).write_text(f"{svc.port} {svc.health_port}")
        await stopped.wait()
        await svc.stop(drain_timeout=2.0)

    from meshkit import _loop

    _loop.run(main())


def run_client(
    port: int, duration: float, warmup: float, concurrency: int, server_pid: int
) -> None:
    import thriftpy2
    from prometheus_client import REGISTRY

    from meshkit import Client, _loop
    from meshkit.tracing import flush

    echo = thriftpy2.load(str(ECHO_THRIFT), module_name="echo_thrift")
    message = "x" * 100

    async def main() -> dict[str, float]:
        async with Client(echo.Echo, "bench-echo", addr=f"127.0.0.1:{port}", timeout=5) as c:
            count = 0
            stop_at = 0.0

            async def worker() -> None:
                nonlocal count
                while time.perf_counter() < stop_at:
                    await c.echo(message)
                    count += 1

            stop_at = time.perf_counter() + warmup
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            count = 0
            cpu0, server0 = time.process_time(), proc_cpu(server_pid)
            start = time.perf_counter()
            stop_at = start + duration
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed = time.perf_counter() - start
            # CPU of both processes over the window (all threads: export threads included)
            cpu1, server1 = time.process_time(), proc_cpu(server_pid)
        flush()
        return {
            "calls_per_s": count / elapsed,
            "calls": count,
            "client_cpu_s": cpu1 - cpu0,
            "server_cpu_s": server1 - server0,
            "exported": REGISTRY.get_sample_value("meshkit_traces_spans_exported_total") or 0,
            "dropped": sum(
                REGISTRY.get_sample_value("meshkit_traces_spans_dropped_total", {"reason": r}) or 0
                for r in ("queue_full", "export_failed", "shutdown")
            ),
        }

    print(json.dumps(_loop.run(main())), flush=True)


def run_sink(port: int) -> None:
    """An OTLP/HTTP endpoint that reads each request and answers 200 without decoding."""
    from aiohttp import web

    async def accept(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def alive(request: web.Request) -> web.Response:
        return web.Response(text="sink")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", accept)
    app.router.add_get("/", alive)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


# -- 1. RPC throughput ------------------------------------------------------------------


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rpc_round(
    mode: str,
    collector: str,
    collector_pid: int,
    sink: str,
    tmp: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHKIT_TRACES")}
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if mode != "off":
        env.update(MESHKIT_TRACES=sink if mode.endswith("_sink") else collector, **MODES[mode])
    port_file = tmp / f"port-{mode}"
    port_file.unlink(missing_ok=True)
    errors = open(tmp / f"server-{mode}.log", "wb")  # noqa: SIM115
    server = subprocess.Popen(
        [sys.executable, __file__, "_server", str(port_file)], env=env,
        stdout=errors, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text():
            if server.poll() is not None or time.monotonic() > deadline:
                log_text = (tmp / f"server-{mode}.log").read_text()[-800:]
                raise RuntimeError(f"bench server ({mode}) did not start: {log_text}")
            time.sleep(0.05)
        port, health = port_file.read_text().split()
        collector_cpu = proc_cpu(collector_pid) if mode == "100pct" else 0.0
        out = subprocess.run(
            [sys.executable, __file__, "_client", port, str(args.duration), str(args.warmup),
             str(args.concurrency), str(server.pid)],
            env=env, capture_output=True, text=True, timeout=args.duration + args.warmup + 60,
        )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"bench client ({mode}) failed: {out.stderr[-500:]}")
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        if mode == "100pct":  # over the client's whole run: an upper bound per call
            result["collector_cpu_s"] = proc_cpu(collector_pid) - collector_cpu
        calls = result["calls"]
        result["cpu_us_per_call"] = (result["client_cpu_s"] + result["server_cpu_s"]) / calls * 1e6
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{health}/metrics").read().decode()
        for line in metrics.splitlines():
            if line.startswith("meshkit_traces_spans_exported_total"):
                result["server_exported"] = float(line.split()[-1])
            if line.startswith("meshkit_traces_spans_dropped_total"):
                result["server_dropped"] = result.get("server_dropped", 0) + float(line.split()[-1])
        return result
    finally:
        stop(server)
        errors.close()


def bench_rpc(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    collector, url = start_collector(tmp, "rpc")
    sink_port = free_port()
    sink = subprocess.Popen([sys.executable, __file__, "_sink", str(sink_port)])
    sink_url = f"http://127.0.0.1:{sink_port}"
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    try:
        wait_http(sink_url + "/", sink)
        for r in range(args.rounds):
            for mode in MODES:
                result = rpc_round(mode, url, collector.pid, sink_url, tmp, args)
                runs[mode].append(result)
                log(
                    f"  round {r + 1} {mode:12s} {result['calls_per_s']:8.0f} calls/s  "
                    f"{result['cpu_us_per_call']:6.0f} µs CPU/call  "
                    f"exported client {result['exported']:.0f} server "
                    f"{result.get('server_exported', 0):.0f}  dropped "
                    f"{result['dropped'] + result.get('server_dropped', 0):.0f}  "
                    f"(load {loadavg()})"
                )
        stats = get_json(url + "/api/stats")
    finally:
        stop(collector)
        stop(sink)
    medians = {m: statistics.median(r["calls_per_s"] for r in runs[m]) for m in MODES}
    cpu = {m: statistics.median(r["cpu_us_per_call"] for r in runs[m]) for m in MODES}
    collector_cpu = statistics.median(
        r["collector_cpu_s"] / r["calls"] * 1e6 for r in runs["100pct"]
    )
    return {
        "medians": medians,
        "cpu_us_per_call": cpu,
        "collector_cpu_us_per_call": collector_cpu,
        "runs": runs,
        "collector_stats": stats,
    }


# -- 2. collector ingest ----------------------------------------------------------------


def synthetic_batches(batches: int, size: int) -> list[bytes]:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    from meshkit.tracing.otlp_encode import encode_request

    provider = TracerProvider(resource=Resource.create({"service.name": "bench"}))
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("bench")
    # One batch of realistic RPC spans; the others differ only in ids (re-generated).
    bodies = []
    for _ in range(batches):
        memory.clear()
        for i in range(size // 2):
            with (
                tracer.start_as_current_span(
                    "echo/echo",
                    kind=SpanKind.CLIENT,
                    attributes={
                        "rpc.system": "thrift",
                        "rpc.service": "echo",
                        "rpc.method": "echo",
                        "meshkit.service": "gateway",
                        "net.peer.name": "127.0.0.1:9090",
                        "meshkit.status_code": "OK",
                        "meshkit.attempts": 1,
                        "meshkit.deadline_ms": 500.0 - i % 7,
                    },
                ),
                tracer.start_as_current_span(
                    "echo/echo",
                    kind=SpanKind.SERVER,
                    attributes={
                        "rpc.system": "thrift",
                        "rpc.service": "echo",
                        "rpc.method": "echo",
                        "meshkit.service": "echo",
                        "meshkit.status_code": "OK",
                    },
                ),
            ):
                pass  # fmt: skip
        bodies.append(encode_request(memory.get_finished_spans()))
    return bodies


def bench_ingest(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    size = 512
    batches = synthetic_batches(args.ingest_batches, size)
    total = size * len(batches)
    collector, url = start_collector(tmp, "ingest")
    try:
        import requests

        queue = list(batches)
        lock = threading.Lock()
        refused = 0

        def sender() -> None:
            nonlocal refused
            session = requests.Session()
            headers = {"Content-Type": "application/x-protobuf"}
            while True:
                with lock:
                    if not queue:
                        return
                    body = queue.pop()
                while True:
                    resp = session.post(url + "/v1/traces", data=body, headers=headers)
                    if resp.status_code == 200:
                        break
                    refused += 1
                    time.sleep(0.05)

        cpu0 = proc_cpu(collector.pid)
        start = time.perf_counter()
        threads = [threading.Thread(target=sender) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        accepted = time.perf_counter() - start
        while get_json(url + "/api/stats")["spans_written"] < total:
            time.sleep(0.01)
        elapsed = time.perf_counter() - start
        collector_cpu = proc_cpu(collector.pid) - cpu0
        stats = get_json(url + "/api/stats")
    finally:
        stop(collector)
    return {
        "spans": total,
        "seconds": elapsed,
        # the collector's own CPU per span (decode + SQLite, all threads): what the rate
        # would be with a core to itself, whatever else the machine is doing
        "collector_cpu_us_per_span": collector_cpu / total * 1e6,
        "accepted_seconds": accepted,
        "spans_per_s": total / elapsed,
        "refused_503": refused,
        "db_bytes": stats["live_bytes"],
    }


# -- 3. viewer --------------------------------------------------------------------------


def bench_viewer(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    sys.path.insert(0, str(REPO_ROOT / "tests"))  # (tracing_support imports echo_support)
    sys.path.insert(0, str(REPO_ROOT / "tests" / "tracing"))
    from test_viewer import big_trace  # the same 10k-span shape the browser test uses
    from tracing_support import otlp_json_request

    collector, url = start_collector(tmp, "viewer")
    trace_id = "3af7651916cd43dd8448eb211c80319c"
    try:
        spans = big_trace(trace_id, 10_000)
        for i in range(0, len(spans), 2000):
            body = json.dumps(otlp_json_request("big", spans[i : i + 2000])).encode()
            req = urllib.request.Request(
                url + "/v1/traces", data=body, headers={"Content-Type": "application/json"}
            )
            urllib.request.urlopen(req).close()
        while get_json(url + "/api/stats")["spans_written"] < 10_000:
            time.sleep(0.05)
        times = []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900}, bypass_csp=True)
            page.goto(url + "/#/deps")  # load the assets once (cached after)
            for _ in range(3):
                page.goto(url + "/#/")
                page.wait_for_selector("#search-form")
                start = time.perf_counter()
                page.evaluate(f"location.hash = '#/trace/{trace_id}'")
                page.wait_for_function(f"window.__meshkitRendered === '{trace_id}'", timeout=60000)
                times.append((time.perf_counter() - start) * 1000)
            rows = page.locator(".wf-row").count()
            browser.close()
    finally:
        stop(collector)
    return {"render_ms": statistics.median(times), "runs_ms": times, "rows_in_dom": rows}


# -- main -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_server":
        run_server(argv[1])
        return 0
    if argv and argv[0] == "_sink":
        run_sink(int(argv[1]))
        return 0
    if argv and argv[0] == "_client":
        run_client(int(argv[1]), float(argv[2]), float(argv[3]), int(argv[4]), int(argv[5]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter windows, fewer rounds")
    ap.add_argument("--duration", type=float, help="measured seconds per RPC run (3; quick 1.5)")
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, help="interleaved rounds of all modes (5; quick 2)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--ingest-batches", type=int, help="512-span batches (200; quick 100)")
    args = ap.parse_args(argv)
    args.duration = args.duration or (1.5 if args.quick else 3.0)
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.ingest_batches = args.ingest_batches or (100 if args.quick else 200)

    load_before = loadavg()
    log(f"load before: {load_before} ({os.cpu_count()} cores)")
    with tempfile.TemporaryDirectory(prefix="meshkit-bench-tracing-") as tmp_name:
        tmp = Path(tmp_name)
        log(f"RPC throughput (echo, 100 B, concurrency {args.concurrency}):")
        rpc = bench_rpc(tmp, args)
        log("collector ingest:")
        ingest = bench_ingest(tmp, args)
        log(
            f"  {ingest['spans']} spans in {ingest['seconds']:.2f} s "
            f"({ingest['collector_cpu_us_per_span']:.1f} µs of collector CPU per span)"
        )
        log("viewer, 10k-span trace in Chromium:")
        viewer = bench_viewer(tmp, args)
        log(f"  runs {', '.join(f'{t:.0f} ms' for t in viewer['runs_ms'])}")
    load_after = loadavg()

    med = rpc["medians"]
    off = med["off"]
    print()
    cpu = rpc["cpu_us_per_call"]
    print(f"{'mode':14s} {'calls/s':>9s} {'vs off':>7s} {'CPU µs/call':>12s} {'off/mode':>9s}")
    for mode in MODES:
        print(
            f"{mode:14s} {med[mode]:9.0f} {med[mode] / off:7.3f} {cpu[mode]:12.0f} "
            f"{cpu['off'] / cpu[mode]:9.3f}"
        )
    print(
        "(CPU µs/call: client + server processes, export threads included; the collector "
        f"used {rpc['collector_cpu_us_per_call']:.0f} µs more per call at 100 %)"
    )
    print(
        f"collector ingest   {ingest['spans_per_s']:9.0f} spans/s into SQLite "
        f"({ingest['collector_cpu_us_per_span']:.1f} µs collector CPU per span: "
        f"{1e6 / ingest['collector_cpu_us_per_span']:.0f} spans per CPU-second)"
    )
    print(f"viewer 10k spans   {viewer['render_ms']:9.0f} ms to a drawn waterfall")
    print(f"load before {load_before}, after {load_after}")
    summary = {
        "tracing_100pct_vs_off": round(med["100pct"] / off, 3),
        "tracing_1pct_vs_off": round(med["1pct"] / off, 3),
        "tracing_1pct_notail_vs_off": round(med["1pct_notail"] / off, 3),
        "tracing_100pct_sink_vs_off": round(med["100pct_sink"] / off, 3),
        "rpc_calls_per_s": {m: round(v) for m, v in med.items()},
        "rpc_cpu_us_per_call": {m: round(v, 1) for m, v in cpu.items()},
        "tracing_100pct_cpu_efficiency": round(cpu["off"] / cpu["100pct"], 3),
        "tracing_1pct_cpu_efficiency": round(cpu["off"] / cpu["1pct"], 3),
        "collector_cpu_us_per_call_100pct": round(rpc["collector_cpu_us_per_call"], 1),
        "collector_spans_per_s": round(ingest["spans_per_s"]),
        "collector_cpu_us_per_span": round(ingest["collector_cpu_us_per_span"], 1),
        "viewer_10k_render_ms": round(viewer["render_ms"], 1),
        "load_before": load_before,
        "load_after": load_after,
        "cores": os.cpu_count(),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
