"""``meshkit demo``: a small real system on one machine, with nothing to install.

What it does:

1. Makes a private temporary directory holding a ``local://`` registry and the services'
   logs, so the demo never collides with other runs or with real services.
2. Starts every entry of :data:`INSTANCES` as a separate process
   (``python -m meshkit run meshkit._demo.services:<factory>``) with ``MESHKIT_REGISTRY``
   pointing at the private registry, on free ports. The services ship inside the package
   (:mod:`meshkit._demo`), so the demo works from an installed meshkit.
3. Finds each instance in the registry by its ``demo-slot`` tag and waits until its
   ``/health/ready`` answers 200 (a child that exits or is not ready in time fails the
   demo, and the tail of its log is printed).
4. Drives traffic at ``gateway.greet``, whose handler calls ``echo.echo`` through
   discovery, so every call crosses two services. A live progress line goes to stderr
   (rewritten in place about 10 times a second on a terminal, one plain line a second otherwise).
5. Prints a summary on stdout: calls, errors, latency p50/p99, calls/s, the calls each
   service served (from its ``/metrics``), and where to look (health, metrics and info
   URLs, the registry directory, a ``meshkit call`` to try).
6. Stops the services with SIGTERM in reverse start order (they drain) and checks that each
   exits 0, then removes the temporary directory.

Exit status: 0 when every call succeeded and every service exited 0; 1 otherwise. Ctrl-C
(or SIGTERM) at any time stops the services the same way, removes the directory and exits
130 (143 for SIGTERM); with ``--keep-running``, Ctrl-C after the summary is the normal way
to end and exits 0.

Adding an instance (a second echo, a canary) is one more :class:`DemoInstance` entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from . import _loop

__all__ = ["INSTANCES", "DemoInstance", "run_demo"]

#: Tag that identifies a demo child in the registry.
SLOT_TAG = "demo-slot"
START_TIMEOUT = 20.0  # seconds for every service to become ready
STOP_TIMEOUT = 10.0  # seconds for a service to drain and exit after SIGTERM
DRAIN_TIMEOUT = 3.0  # MESHKIT_DRAIN_TIMEOUT of the children
CALL_TIMEOUT = 2.0
DEFAULT_DURATION = 3.0
LOG_TAIL_LINES = 25
TRACES_PORT = 4318  # the bundled trace collector's usual port (OTLP/HTTP's default)


@dataclass(frozen=True, slots=True)
class DemoInstance:
    """One service process of the demo.

    ``slot``: unique label (also the ``demo-slot`` tag and the log file name);
    ``service``: the name it registers under; ``target``: ``module:attr`` for
    ``meshkit run``; ``tags``: extra tags of its instance record.
    """

    slot: str
    service: str
    target: str
    tags: Mapping[str, str] = field(default_factory=dict)


#: The processes of the demo, started in this order and stopped in reverse.
INSTANCES: tuple[DemoInstance, ...] = (
    DemoInstance("echo-1", "echo", "meshkit._demo.services:echo_service"),
    DemoInstance("echo-2", "echo", "meshkit._demo.services:echo_service"),
    # The gateway sends a share of its calls here (see services.CANARY_RULES).
    DemoInstance("echo-canary", "echo", "meshkit._demo.services:echo_service", {"canary": "true"}),
    DemoInstance("gateway-1", "gateway", "meshkit._demo.services:gateway_service"),
)

#: The service the traffic is sent to.
ENTRY_SERVICE = "gateway"


class DemoError(Exception):
    """The demo cannot go on; ``detail`` is printed after the message (e.g. a log tail)."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


@dataclass(slots=True)
class _Child:
    spec: DemoInstance
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    instance: Any = None  # meshkit.registry.Instance once found in the registry
    returncode: int | None = None

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip("\n").splitlines()[-lines:])

    @property
    def health_url(self) -> str:
        host = self.instance.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.instance.health_port}"


@dataclass(slots=True)
class _Stats:
    calls: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    error_kinds: Counter[str] = field(default_factory=Counter)
    started: float = 0.0
    elapsed: float = 0.0

    def rate(self, now: float | None = None) -> float:
        elapsed = (now if now is not None else time.perf_counter()) - self.started
        return self.calls / elapsed if elapsed > 0 else 0.0


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))
    return sorted_values[index]


def _package_root() -> str:
    return str(Path(__file__).resolve().parent.parent)


class Demo:
    """One run of the demo; see the module docstring."""

    def __init__(
        self,
        workdir: Path,
        *,
        instances: Sequence[DemoInstance] = INSTANCES,
        calls: int | None = None,
        concurrency: int = 8,
        duration: float | None = None,
        keep_running: bool = False,
        out: TextIO | None = None,
        err: TextIO | None = None,
    ) -> None:
        self.workdir = workdir
        self.registry_dir = workdir / "registry"
        self.registry_url = f"local://{self.registry_dir}"
        self.config_url = f"local://{workdir / 'config'}"
        self.log_dir = workdir / "logs"
        self.children = [_Child(spec, self.log_dir / f"{spec.slot}.log") for spec in instances]
        self.calls = calls
        self.concurrency = concurrency
        self.duration = DEFAULT_DURATION if duration is None and calls is None else duration
        self.keep_running = keep_running
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr
        self.sigterm = False
        self._last_shown = -1
        # tracing: the bundled collector the services export to (see start_collector)
        self.collector: Any = None
        self.trace_store: Any = None

    # -- output ----------------------------------------------------------------------

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def warn(self, text: str) -> None:
        self.err.write(text + "\n")
        self.err.flush()

    # -- the whole run -----------------------------------------------------------------

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def on_sigterm() -> None:
            self.sigterm = True
            task.cancel()

        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGTERM, on_sigterm)
        code = 0
        try:
            await self.start_collector()
            self.spawn()
            await self.wait_ready()
            stats = await self.drive()
            served = await self.served_counts()
            self.report(stats, served)
            if stats.errors:
                code = 1
            # -- Kafka workers (meshkit/mq/demo.py): a round on a running broker, or how to
            # start one. Needs the kafka extra (confluent-kafka).
            if not await self.kafka_round():
                code = 1
            if self.keep_running:
                await self.hold()
        except DemoError as exc:
            self.warn(f"meshkit demo: {exc}")
            if exc.detail:
                self.warn(exc.detail)
            code = 1
        except asyncio.CancelledError:
            if self.sigterm:
                self.warn("\nmeshkit demo: terminated; stopping the services")
                code = 143
                task.uncancel()
            else:
                self.warn("\nmeshkit demo: interrupted; stopping the services")
                raise  # asyncio.Runner turns it into KeyboardInterrupt: exit 130
        finally:
            stop_ok = await self.stop_all()
            await self.stop_collector()
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signal.SIGTERM)
        if not stop_ok and code == 0:
            code = 1
        return code

    # -- tracing: the bundled collector -------------------------------------------------

    async def start_collector(self) -> None:
        """Serve the trace collector and viewer on 127.0.0.1:4318 (a free port if taken)."""
        from .tracing.collector import Collector, SpanStore

        self.trace_store = SpanStore(self.workdir / "traces.db", max_age=None)
        for port in (TRACES_PORT, 0):
            collector = Collector(self.trace_store, port=port)
            try:
                await collector.start()
            except OSError:
                continue
            self.collector = collector
            return

    async def stop_collector(self) -> None:
        if self.collector is not None:
            await self.collector.stop()
            self.collector = None
        if self.trace_store is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.trace_store.close)
            self.trace_store = None

    # -- starting ----------------------------------------------------------------------

    def child_env(self, child: _Child) -> dict[str, str]:
        # The user's MESHKIT_* settings (ports, advertise host, registry) are for their own
        # services: the demo's children get exactly the settings the demo chooses.
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("MESHKIT_") or k == "MESHKIT_UVLOOP"
        }
        tags = {**child.spec.tags, SLOT_TAG: child.spec.slot}
        env.update(
            MESHKIT_REGISTRY=self.registry_url,
            MESHKIT_CONFIG=self.config_url,
            MESHKIT_HOST="127.0.0.1",
            MESHKIT_PORT="0",
            MESHKIT_HEALTH_PORT="0",
            MESHKIT_DRAIN_TIMEOUT=str(DRAIN_TIMEOUT),
            MESHKIT_LOG_LEVEL="INFO",
            MESHKIT_DEMO_TAGS=",".join(f"{k}={v}" for k, v in tags.items()),
            MESHKIT_DEMO_PARENT_PID=str(os.getpid()),
            PYTHONUNBUFFERED="1",
        )
        if self.collector is not None:  # tracing: every service exports its spans to the demo
            env["MESHKIT_TRACES"] = self.collector.url
        # Import this very meshkit in the children, installed or not.
        root = _package_root()
        path = env.get("PYTHONPATH", "")
        env["PYTHONPATH"] = root + (os.pathsep + path if path else "")
        return env

    def spawn(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for child in self.children:
            command = [
                sys.executable,
                "-m",
                "meshkit",
                "run",
                child.spec.target,
                "--registry",
                self.registry_url,
            ]
            with open(child.log_path, "wb") as log:
                # A session of its own: Ctrl-C in the terminal reaches only the demo, which
                # then stops the services in order.
                child.proc = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self.child_env(child),
                    cwd=self.workdir,
                    start_new_session=True,
                )

    async def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        import aiohttp

        from .registry import registry_from_url

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pending = list(self.children)
        registry = registry_from_url(self.registry_url)
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as http:
                while pending:
                    for child in list(pending):
                        assert child.proc is not None
                        code = child.proc.poll()
                        if code is not None:
                            child.returncode = code
                            raise DemoError(
                                f"{child.spec.slot} ({child.spec.target}) exited with code "
                                f"{code} while starting; the end of its log:",
                                child.tail(),
                            )
                        if child.instance is None:
                            for instance in await registry.resolve(child.spec.service):
                                if instance.tags.get(SLOT_TAG) == child.spec.slot:
                                    child.instance = instance
                        if child.instance is not None and await _is_ready(http, child):
                            pending.remove(child)
                    if not pending:
                        break
                    if loop.time() > deadline:
                        names = ", ".join(c.spec.slot for c in pending)
                        raise DemoError(
                            f"not ready after {timeout:g} s: {names}; the end of the log of "
                            f"{pending[0].spec.slot}:",
                            pending[0].tail(),
                        )
                    await asyncio.sleep(0.1)
        finally:
            await registry.close()

    # -- traffic -----------------------------------------------------------------------

    async def drive(self) -> _Stats:
        from ._demo.services import gateway_thrift, greeting
        from .client import Client

        client = Client(
            gateway_thrift.Gateway, ENTRY_SERVICE, registry=self.registry_url, timeout=CALL_TIMEOUT
        )
        stats = _Stats()
        stop = asyncio.Event()
        issued = 0

        async def caller(worker: int) -> None:
            nonlocal issued
            while not stop.is_set():
                if self.calls is not None and issued >= self.calls:
                    return
                issued += 1
                name = f"user-{worker}-{issued}"
                start = time.perf_counter()
                try:
                    reply = await client.call("greet", name)
                except Exception as exc:
                    stats.errors += 1
                    stats.error_kinds[f"{type(exc).__name__}: {exc}"] += 1
                else:
                    if reply != greeting(name):
                        stats.errors += 1
                        stats.error_kinds[f"unexpected reply {reply!r}"] += 1
                    stats.latencies.append(time.perf_counter() - start)
                stats.calls += 1

        async def timer() -> None:
            if self.duration is not None:
                await asyncio.sleep(self.duration)
                stop.set()

        what = f"{self.calls} calls" if self.calls is not None else f"{self.duration:g} s of calls"
        if self.calls is not None and self.duration is not None:
            what += f" (at most {self.duration:g} s)"
        self.warn(
            f"meshkit demo: services ready; sending {what} to {ENTRY_SERVICE} "
            f"(concurrency {self.concurrency})"
        )
        progress = asyncio.create_task(self.show_progress(stats))
        timer_task = asyncio.create_task(timer())
        try:
            await client.start()
            stats.started = time.perf_counter()
            await asyncio.gather(*(caller(i) for i in range(self.concurrency)))
            stats.elapsed = time.perf_counter() - stats.started
        finally:
            stop.set()
            timer_task.cancel()
            progress.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await progress
            await client.close()
        self.progress_line(stats, final=True)
        return stats

    def progress_line(self, stats: _Stats, *, final: bool = False) -> None:
        tty = bool(getattr(self.err, "isatty", lambda: False)())
        elapsed = (time.perf_counter() - stats.started) if not final else stats.elapsed
        line = (
            f"  calls {stats.calls:>7}   errors {stats.errors:>4}   "
            f"{stats.calls / elapsed if elapsed > 0 else 0:>7.0f} calls/s   {elapsed:5.1f} s"
        )
        if tty:
            self.err.write("\r" + line + ("\n" if final else ""))
        elif not (final and stats.calls == self._last_shown):
            self.err.write(line + "\n")
        self._last_shown = stats.calls
        self.err.flush()

    async def show_progress(self, stats: _Stats) -> None:
        tty = bool(getattr(self.err, "isatty", lambda: False)())
        interval = 0.1 if tty else 1.0
        while True:
            await asyncio.sleep(interval)
            if stats.started:
                self.progress_line(stats)

    async def served_counts(self) -> dict[str, int]:
        """Calls each instance served, from its ``/metrics`` (by slot; missing if unreadable)."""
        import aiohttp
        from prometheus_client.parser import text_string_to_metric_families

        counts: dict[str, int] = {}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as http:
            for child in self.children:
                try:
                    async with http.get(child.health_url + "/metrics") as resp:
                        text = await resp.text()
                except (aiohttp.ClientError, TimeoutError):
                    continue
                total = 0.0
                for family in text_string_to_metric_families(text):
                    if family.name != "meshkit_rpc_server_requests":
                        continue
                    for sample in family.samples:
                        if sample.name.endswith("_total"):
                            total += sample.value
                counts[child.spec.slot] = int(total)
        return counts

    # -- the summary -------------------------------------------------------------------

    def report(self, stats: _Stats, served: Mapping[str, int]) -> None:
        lat = sorted(stats.latencies)
        rate = stats.calls / stats.elapsed if stats.elapsed > 0 else 0.0
        path = " → ".join(dict.fromkeys(c.spec.service for c in reversed(self.children)))
        say = self.say
        say("")
        say(f"meshkit demo: {len(self.children)} services, calls go {path}")
        say("")
        say(f"  calls      {stats.calls}")
        say(f"  errors     {stats.errors}")
        say(f"  latency    p50 {_percentile(lat, 0.5) * 1000:.2f} ms   "
            f"p99 {_percentile(lat, 0.99) * 1000:.2f} ms")  # fmt: skip
        say(f"  calls/s    {rate:.0f}   ({stats.elapsed:.1f} s, concurrency {self.concurrency})")
        if served:
            say("  served     " + "   ".join(f"{slot} {n}" for slot, n in served.items()))
        for kind, count in stats.error_kinds.most_common(5):
            say(f"  error (x{count}) {kind}")
        say("")
        if self.keep_running:
            say("where to look (the services keep running until Ctrl-C):")
        else:
            say("where to look (these stop with the demo; add --keep-running to explore them):")
        width = max(len(c.spec.slot) for c in self.children)
        for child in self.children:
            base = child.health_url
            say(f"  {child.spec.slot:<{width}}  rpc      {child.instance.address}")
            say(f"  {'':<{width}}  ready    {base}/health/ready")
            say(f"  {'':<{width}}  metrics  {base}/metrics")
            say(f"  {'':<{width}}  info     {base}/info")
        if self.collector is not None:
            url = self.collector.url
            say(f"  traces     {url}/   (trace viewer; MESHKIT_TRACES={url})")
        say(f"  registry   {self.registry_dir}   (MESHKIT_REGISTRY={self.registry_url})")
        say(f"  config     {self.config_url}   (MESHKIT_CONFIG; the gateway's routing is live)")
        say(f"  logs       {self.log_dir}")
        say("")
        from ._demo import GATEWAY_IDL

        say("try:")
        say(
            f"  meshkit call gateway greet --idl {GATEWAY_IDL} "
            f"--registry {self.registry_url} --arg name=you"
        )
        say(
            f"  meshkit config --store {self.config_url} set gateway routing "
            """'{"rules": []}'   # no canary traffic, live"""
        )
        say("")

    async def kafka_round(self) -> bool:
        try:
            from .mq.demo import demo_round
        except ImportError:
            self.say("kafka: Kafka workers need confluent-kafka: pip install 'meshkit[kafka]'")
            self.say("")
            return True
        return await demo_round(self.say)

    async def hold(self) -> None:
        """Keep the services up until Ctrl-C (a normal end: exit 0) or one of them exits."""
        try:
            while True:
                for child in self.children:
                    assert child.proc is not None
                    if child.proc.poll() is not None:
                        raise DemoError(
                            f"{child.spec.slot} exited with code {child.proc.returncode}; "
                            "the end of its log:",
                            child.tail(),
                        )
                await asyncio.sleep(0.2)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self.sigterm or task is None or task.uncancel() > 0:
                raise
            self.warn("")

    # -- stopping ------------------------------------------------------------------------

    async def stop_all(self) -> bool:
        """SIGTERM each child in reverse start order, wait for it; True if all exited 0."""
        ok = True
        stopped: list[str] = []
        for child in reversed(self.children):
            proc = child.proc
            if proc is None:
                continue
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + STOP_TIMEOUT
                while proc.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    proc.wait()
                    self.warn(
                        f"meshkit demo: {child.spec.slot} did not exit within {STOP_TIMEOUT:g} s "
                        "of SIGTERM and was killed; the end of its log:"
                    )
                    self.warn(child.tail())
                    ok = False
                    continue
            child.returncode = proc.returncode
            if proc.returncode != 0 and child.instance is not None:
                # Failed after starting (a failure while starting was reported already).
                self.warn(
                    f"meshkit demo: {child.spec.slot} exited with code {proc.returncode}; "
                    "the end of its log:"
                )
                self.warn(child.tail())
                ok = False
            elif proc.returncode != 0:
                ok = False
            else:
                stopped.append(child.spec.slot)
        if stopped and all(c.instance is not None for c in self.children):
            self.warn(f"meshkit demo: stopped {', '.join(stopped)} (drained, exit 0)")
        return ok

    def kill_all(self) -> None:
        """Last resort (a second Ctrl-C): make sure no child outlives the demo."""
        for child in reversed(self.children):
            proc = child.proc
            if proc is None or proc.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()


async def _is_ready(http: Any, child: _Child) -> bool:
    import aiohttp

    try:
        async with http.get(child.health_url + "/health/ready") as resp:
            return bool(resp.status == 200)
    except (aiohttp.ClientError, TimeoutError, OSError):
        return False


def run_demo(
    *,
    calls: int | None = None,
    concurrency: int = 8,
    duration: float | None = None,
    keep_running: bool = False,
    instances: Sequence[DemoInstance] = INSTANCES,
    out: TextIO | None = None,
    err: TextIO | None = None,
    base_dir: str | os.PathLike[str] | None = None,
) -> int:
    """Run the demo; returns the exit status (see the module docstring).

    The private directory (registry, logs) is made in ``base_dir`` (default: the system
    temporary directory) and removed at the end.
    """
    workdir = Path(tempfile.mkdtemp(prefix="meshkit-demo-", dir=base_dir))
    demo = Demo(
        workdir,
        instances=instances,
        calls=calls,
        concurrency=concurrency,
        duration=duration,
        keep_running=keep_running,
        out=out,
        err=err,
    )
    try:
        return _loop.run(demo.main())
    except KeyboardInterrupt:
        return 130
    finally:
        demo.kill_all()
        shutil.rmtree(workdir, ignore_errors=True)
