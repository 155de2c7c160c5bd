"""RPC echo benchmark: meshkit against bare thriftpy2, grpcio and a raw asyncio floor.

    python bench/rpc.py              # full run, asyncio and uvloop rows
    python bench/rpc.py --quick      # under a minute
    python bench/rpc.py --only meshkit,thriftpy2_aio --loops asyncio --duration 5

For every implementation and loop kind: one server subprocess (bench/_servers.py) and one
client subprocess (bench/_clients.py) that runs 100 B and 4 KiB echo at concurrency 1 and
16, each cell a warm-up then a measured window. Server CPU is read from /proc/<pid>/stat
around the window. Progress goes to stderr; a table and, as the last line, one JSON object
with every figure go to stdout.

Implementations:
  meshkit         meshkit Client (async, one multiplexed client shared by C tasks)
                  -> meshkit Service with the full default pipeline
  meshkit_sync    meshkit SyncClient shared by C threads -> a meshkit Service as above
  thriftpy2_aio   thriftpy2.contrib.aio, binary protocol, framed transport; C clients
  thriftpy2_sync  thriftpy2.rpc threaded server, Cython binary + framed; C threads/clients
  grpcio_aio      grpc.aio unary call (protobuf message, one bytes field); one channel
  raw_asyncio     asyncio.BufferedProtocol, length-prefixed frames pipelined on one
                  connection, responses matched by id: the floor
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BENCH_DIR, IMPLS, LOOPLESS, LOOPS, REPO_ROOT

SERVER_START_TIMEOUT = 30.0
CELL_SLACK = 25.0  # per cell, on top of warm-up + duration: connect, drain, close
NOISY_PCT = 10.0  # other load in a window (% of the machine) above which a cell is flagged


def log(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


class LineReader:
    """Lines of a child's stdout, with a timeout (a thread feeding a queue)."""

    def __init__(self, stream: IO[str]) -> None:
        self.q: queue.Queue[str | None] = queue.Queue()
        self.thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self.thread.start()

    def _pump(self, stream: IO[str]) -> None:
        with contextlib.suppress(Exception), stream:
            for line in stream:
                self.q.put(line.rstrip("\n"))
        self.q.put(None)

    def get(self, deadline: float) -> str | None:
        """The next line; None at EOF; raises TimeoutError past the deadline."""
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            raise TimeoutError
        try:
            return self.q.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError from None


def stop_process(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=5)


def tail(f: IO[bytes], n: int = 3) -> str:
    f.flush()
    f.seek(0)
    lines = [ln for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    return " | ".join(ln.strip() for ln in lines[-n:])


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
        )
        self.env["MESHKIT_BENCH_PARENT"] = str(os.getpid())
        self.env["PYTHONUNBUFFERED"] = "1"

    def spawn(
        self, argv: list[str], stdin: Any, output: IO[bytes]
    ) -> tuple[subprocess.Popen, LineReader]:
        """Start a runner; its reports come on a pipe of their own (libraries may log to
        stdout), its stdout and stderr go to `output`."""
        r, w = os.pipe()
        try:
            proc = subprocess.Popen(
                [sys.executable, *argv, "--report-fd", str(w)],
                stdin=stdin,
                stdout=output,
                stderr=subprocess.STDOUT,
                pass_fds=(w,),
                text=True,
                env=self.env,
                cwd=str(REPO_ROOT),
            )
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        self.procs.append(proc)
        return proc, LineReader(os.fdopen(r, encoding="utf-8", errors="replace"))

    def kill_all(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(Exception):
                stop_process(proc)
        self.procs.clear()

    def run_pair(self, impl: str, loop: str) -> list[dict[str, Any]]:
        """One server process + one client process; returns one dict per cell."""
        with tempfile.TemporaryFile() as srv_err, tempfile.TemporaryFile() as cli_err:
            return self._run_pair(impl, loop, srv_err, cli_err)

    def _run_pair(
        self, impl: str, loop: str, srv_err: IO[bytes], cli_err: IO[bytes]
    ) -> list[dict[str, Any]]:
        a = self.args
        wanted = [(p, c) for p in a.payloads for c in a.concurrency]
        cells: dict[tuple[int, int], dict[str, Any]] = {}

        def fail_rest(error: str) -> None:
            for p, c in wanted:
                if (p, c) not in cells:
                    cells[p, c] = {"impl": impl, "loop": loop, "payload": p, "concurrency": c}
                    cells[p, c]["error"] = error
                    log(f"  {impl:15s} {loop:8s} {p:5d} B  C={c:<3d} FAILED: {error}")

        srv = cli = None
        try:
            srv, srv_out = self.spawn(
                [str(BENCH_DIR / "_servers.py"), IMPLS[impl], loop], subprocess.DEVNULL, srv_err
            )
            # the client imports its libraries while the server starts, then waits for the port
            cli, cli_out = self.spawn(
                [
                    str(BENCH_DIR / "_clients.py"),
                    impl,
                    loop,
                    "--payloads",
                    ",".join(map(str, a.payloads)),
                    "--concurrency",
                    ",".join(map(str, a.concurrency)),
                    "--duration",
                    str(a.duration),
                    "--warmup",
                    str(a.warmup),
                ],
                subprocess.PIPE,
                cli_err,
            )
            port = None
            deadline = time.monotonic() + SERVER_START_TIMEOUT
            try:
                line = srv_out.get(deadline)
            except TimeoutError:
                line = f"ERROR no port after {SERVER_START_TIMEOUT:.0f} s"
            if line and line.startswith("PORT "):
                port = int(line.split()[1])
            else:
                detail = (line or "").removeprefix("ERROR ").strip()
                if not detail:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        srv.wait(timeout=2)
                    detail = f"exited rc={srv.poll()}: {tail(srv_err)}"
                fail_rest(f"server failed to start: {detail}")
                return [cells[k] for k in wanted]

            cli.stdin.write(f"{port} {srv.pid}\n")
            cli.stdin.close()
            deadline = time.monotonic() + len(wanted) * (a.warmup + a.duration + CELL_SLACK)
            while len(cells) < len(wanted):
                try:
                    line = cli_out.get(deadline)
                except TimeoutError:
                    fail_rest("client timed out")
                    break
                if line is None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        cli.wait(timeout=2)
                    fail_rest(f"client exited rc={cli.poll()}: {tail(cli_err)}")
                    break
                try:
                    cell = json.loads(line)
                except ValueError:
                    log(f"  [{impl} client] {line}")
                    continue
                cells[cell["payload"], cell["concurrency"]] = cell
                log("  " + format_progress(cell))
            if srv.poll() is not None:
                log(f"  warning: {impl} server exited rc={srv.poll()}: {tail(srv_err)}")
            return [cells[k] for k in wanted if k in cells]
        finally:
            stop_process(cli)
            stop_process(srv)

    def run(self) -> list[dict[str, Any]]:
        plan: list[tuple[str, str]] = []
        for loop in self.args.loops:
            for impl in self.args.only:
                if impl in LOOPLESS:
                    if (impl, "n/a") not in plan:
                        plan.append((impl, "n/a"))
                else:
                    plan.append((impl, loop))
        results: list[dict[str, Any]] = []
        for i, (impl, loop) in enumerate(plan, 1):
            log(f"[{i}/{len(plan)}] {impl} ({loop})")
            cells = self.run_pair(impl, loop)
            for attempt in range(self.args.rerun_noisy):
                if not any(is_noisy(c) for c in cells):
                    break
                log(f"[{i}/{len(plan)}] {impl} ({loop}) again: noisy cells (rerun {attempt + 1})")
                again = {cell_key(c): c for c in self.run_pair(impl, loop)}
                cells = [better(c, again.get(cell_key(c))) for c in cells]
            results.extend(cells)
        return results


def cell_key(c: dict[str, Any]) -> tuple:
    return (c["impl"], c["loop"], c["payload"], c["concurrency"])


def better(a: dict[str, Any], b: dict[str, Any] | None) -> dict[str, Any]:
    """Of two runs of a cell keep the cleaner: a success, then the least other load."""
    if b is None or b.get("error"):
        return a
    if a.get("error") or b.get("other_cpu_pct", 0.0) < a.get("other_cpu_pct", 0.0):
        return b
    return a


def format_progress(cell: dict[str, Any]) -> str:
    head = (
        f"{cell['impl']:15s} {cell['loop']:8s} {cell['payload']:5d} B  C={cell['concurrency']:<3d}"
    )
    if cell.get("error"):
        return f"{head} FAILED: {cell['error']}"
    return (
        f"{head} {cell['calls_per_s']:9.0f} calls/s  p50 {cell['p50_ms']:.3f} ms"
        f"  p99 {cell['p99_ms']:.3f} ms  server {cell['server_cpu_us_per_call']:.0f} us/call"
    )


def ratio(cells: list[dict[str, Any]], a: tuple[str, str], b: tuple[str, str]) -> float | None:
    """calls/s of a over b at C=16, 100 B; None if either is missing or failed."""

    def rate(impl: str, loop: str) -> float | None:
        for c in cells:
            if (c["impl"], c["loop"], c["payload"], c["concurrency"]) == (impl, loop, 100, 16):
                return c.get("calls_per_s") if not c.get("error") else None
        return None

    ra, rb = rate(*a), rate(*b)
    return round(ra / rb, 3) if ra and rb else None


def is_noisy(cell: dict[str, Any]) -> bool:
    return (cell.get("other_cpu_pct") or 0.0) > NOISY_PCT


def render_table(cells: list[dict[str, Any]]) -> str:
    cols = ["impl", "loop", "payload", "C", "calls/s", "p50 ms", "p99 ms", "srv us/call"]
    cols += ["cli us/call", "other cpu"]
    rows: list[list[str]] = []
    errors: dict[str, int] = {}
    for c in cells:
        base = [c["impl"], c["loop"], f"{c['payload']} B", str(c["concurrency"])]
        if c.get("error"):
            n = errors.setdefault(c["error"], len(errors) + 1)
            rows.append([*base, "FAILED", f"[{n}]", "", "", "", ""])
        else:
            rows.append(
                [
                    *base,
                    f"{c['calls_per_s']:.0f}",
                    f"{c['p50_ms']:.3f}",
                    f"{c['p99_ms']:.3f}",
                    f"{c['server_cpu_us_per_call']:.1f}",
                    f"{c['client_cpu_us_per_call']:.1f}",
                    f"{c['other_cpu_pct']:.0f}%" + (" !" if is_noisy(c) else "  "),
                ]
            )
    widths = [max(len(r[i]) for r in [cols, *rows]) for i in range(len(cols))]
    left = {0, 1}

    def fmt(r: list[str]) -> str:
        return "  ".join(
            r[i].ljust(widths[i]) if i in left else r[i].rjust(widths[i]) for i in range(len(r))
        ).rstrip()

    out = [fmt(cols), fmt(["-" * w for w in widths])]
    prev = None
    for c, r in zip(cells, rows, strict=True):
        group = (
            c["loop"] if c["loop"] != "n/a" else prev and prev[0],
            c["payload"],
            c["concurrency"],
        )
        if prev is not None and group != prev:
            out.append("")
        prev = group
        out.append(fmt(r))
    out.append(
        "calls/s, p50, p99: client side; srv/cli us/call: CPU (user+sys) per call of the"
        " server / client process; other cpu: CPU used by anything else on the machine"
        " during the window, % of all CPUs (noise gauge);"
        f" ! marks cells where that exceeded {NOISY_PCT:.0f}%: rerun them on a quiet machine"
    )
    for text, n in errors.items():
        out.append(f"[{n}] {text}")
    return "\n".join(out)


def table_order(cells: list[dict[str, Any]], loops: list[str]) -> list[dict[str, Any]]:
    """Group comparable rows: loop kind, then payload, then concurrency, then impl."""
    impl_rank = {name: i for i, name in enumerate(IMPLS)}

    def key(c: dict[str, Any]) -> tuple:
        loop_rank = loops.index(c["loop"]) if c["loop"] in loops else 0  # n/a: with the first
        return (loop_rank, c["payload"], c["concurrency"], impl_rank[c["impl"]])

    return sorted(cells, key=key)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short cells; whole run under 60 s")
    ap.add_argument("--duration", type=float, help="measured seconds per cell (2.0; quick 0.6)")
    ap.add_argument("--warmup", type=float, help="warm-up seconds per cell (0.5; quick 0.3)")
    ap.add_argument("--only", help=f"comma-separated subset of: {','.join(IMPLS)}")
    ap.add_argument("--loops", default=",".join(LOOPS), help="asyncio,uvloop (default both)")
    ap.add_argument(
        "--rerun-noisy",
        type=int,
        default=0,
        metavar="N",
        help="rerun an implementation up to N times while some of its cells are noisy\n"
        "(other load > 10%% of the machine); keeps the cleanest run of each cell",
    )
    ap.add_argument("--payloads", default="100,4096", help="bytes, comma-separated")
    ap.add_argument("--concurrency", default="1,16", help="comma-separated")
    args = ap.parse_args(argv)
    if args.duration is None:
        args.duration = 0.6 if args.quick else 2.0
    if args.warmup is None:
        args.warmup = 0.3 if args.quick else 0.5
    args.only = [s.strip() for s in (args.only or ",".join(IMPLS)).split(",") if s.strip()]
    unknown = [s for s in args.only if s not in IMPLS]
    if unknown:
        ap.error(f"unknown implementation(s) {unknown}; choose from {list(IMPLS)}")
    args.only = [name for name in IMPLS if name in args.only]
    args.loops = [s.strip() for s in args.loops.split(",") if s.strip()]
    if not args.loops or any(s not in LOOPS for s in args.loops):
        ap.error(f"--loops takes a comma-separated subset of {list(LOOPS)}")
    args.payloads = [int(s) for s in args.payloads.split(",")]
    args.concurrency = [int(s) for s in args.concurrency.split(",")]
    return args


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    bench = Bench(args)
    load_at_start = round(os.getloadavg()[0], 2)
    t0 = time.monotonic()
    try:
        cells = bench.run()
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        bench.kill_all()
    elapsed = time.monotonic() - t0
    cells = table_order(cells, args.loops)

    print(
        f"RPC echo, {args.duration:g} s per cell after {args.warmup:g} s warm-up;"
        f" {os.cpu_count()} CPUs, Python {platform.python_version()};"
        " calls/s and latency from the client, CPU from /proc"
    )
    print(render_table(cells))
    summary: dict[str, Any] = {
        "cells": [
            {
                k: c.get(k)
                for k in (
                    "impl",
                    "loop",
                    "payload",
                    "concurrency",
                    "calls_per_s",
                    "p50_ms",
                    "p99_ms",
                    "server_cpu_us_per_call",
                    "client_cpu_us_per_call",
                    "other_cpu_pct",
                    "calls",
                    "window_s",
                    "error",
                )
            }
            for c in cells
        ],
        "meshkit_vs_thriftpy2_aio": ratio(
            cells, ("meshkit", "asyncio"), ("thriftpy2_aio", "asyncio")
        ),
        "meshkit_vs_grpcio_aio": ratio(cells, ("meshkit", "asyncio"), ("grpcio_aio", "asyncio")),
        "meshkit_vs_raw_asyncio": ratio(cells, ("meshkit", "asyncio"), ("raw_asyncio", "asyncio")),
        "meshkit_uvloop_vs_thriftpy2_aio_uvloop": ratio(
            cells, ("meshkit", "uvloop"), ("thriftpy2_aio", "uvloop")
        ),
        "meshkit_uvloop_vs_grpcio_aio_uvloop": ratio(
            cells, ("meshkit", "uvloop"), ("grpcio_aio", "uvloop")
        ),
        "meshkit_uvloop_vs_raw_asyncio_uvloop": ratio(
            cells, ("meshkit", "uvloop"), ("raw_asyncio", "uvloop")
        ),
        "meshkit_sync_vs_thriftpy2_sync": ratio(
            cells, ("meshkit_sync", "asyncio"), ("thriftpy2_sync", "n/a")
        ),
        "config": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "loops": args.loops,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "elapsed_s": round(elapsed, 1),
            "loadavg_at_start": load_at_start,
        },
    }
    noisy = sum(1 for c in cells if is_noisy(c))
    if noisy:
        log(f"warning: {noisy} of {len(cells)} cells ran while something else used the CPU")
    log(f"done in {elapsed:.1f} s")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
