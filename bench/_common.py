"""Shared bits for bench/rpc.py and its server/client runner subprocesses.

Nothing here imports meshkit: the meshkit rows must be able to fail on their own
while the baselines still run.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import socket
import struct
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
ECHO_THRIFT = BENCH_DIR / "echo.thrift"
HOST = "127.0.0.1"

# Implementations, in table order. Each names its server kind (one server process each).
IMPLS: dict[str, str] = {
    "meshkit": "meshkit",
    "meshkit_sync": "meshkit",
    "thriftpy2_aio": "thriftpy2_aio",
    "thriftpy2_sync": "thriftpy2_sync",
    "grpcio_aio": "grpcio_aio",
    "raw_asyncio": "raw_asyncio",
}
# Implementations with no event loop on either side: run once, loop "n/a".
LOOPLESS = {"thriftpy2_sync"}
LOOPS = ("asyncio", "uvloop")

# raw_asyncio framing: u32 length of what follows, u32 request id, payload.
RAW_HDR = struct.Struct("!II")


class FrameProtocol(asyncio.BufferedProtocol):
    """raw_asyncio framing on a BufferedProtocol: the transport reads into our buffer.

    (A plain Protocol gets a fresh bytes object per read: on the default loop that is a
    256 KiB allocation per recv, which glibc serves with mmap/mremap/munmap, several
    syscalls per message. The floor should not pay that.)
    """

    def __init__(self) -> None:
        self.buf = bytearray(256 * 1024)
        self.n = 0
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        if len(self.buf) - self.n < 64 * 1024:
            bigger = bytearray(2 * len(self.buf))
            bigger[: self.n] = self.buf[: self.n]
            self.buf = bigger
        return memoryview(self.buf)[self.n :]

    def buffer_updated(self, nbytes: int) -> None:
        buf = self.buf
        n = self.n + nbytes
        pos = 0
        frames = []
        unpack = RAW_HDR.unpack_from
        while n - pos >= 8:
            length, rid = unpack(buf, pos)
            end = pos + 4 + length
            if end > n:
                break
            frames.append((rid, bytes(buf[pos + 8 : end])))
            pos = end
        if pos:
            rest = n - pos
            if rest:
                buf[:rest] = buf[pos:n]
            n = rest
        self.n = n
        if frames:
            self.frames_received(frames)

    def frames_received(self, frames: list[tuple[int, bytes]]) -> None:
        raise NotImplementedError


GRPC_PACKAGE = "meshkit.bench"
GRPC_SERVICE = "Echo"
GRPC_METHOD = f"/{GRPC_PACKAGE}.{GRPC_SERVICE}/Echo"


def load_echo() -> Any:
    import thriftpy2

    return thriftpy2.load(str(ECHO_THRIFT), module_name="echo_thrift")


def grpc_messages() -> tuple[Any, Any]:
    """EchoRequest/EchoReply ({bytes message = 1}) built from a descriptor in code.

    Same as what protoc would generate for:
        message EchoRequest { bytes message = 1; }
        message EchoReply { bytes message = 1; }
        service Echo { rpc Echo(EchoRequest) returns (EchoReply); }
    """
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fdp = descriptor_pb2.FileDescriptorProto(
        name="meshkit_bench_echo.proto", package=GRPC_PACKAGE, syntax="proto3"
    )
    fdt = descriptor_pb2.FieldDescriptorProto
    for name in ("EchoRequest", "EchoReply"):
        msg = fdp.message_type.add(name=name)
        msg.field.add(name="message", number=1, type=fdt.TYPE_BYTES, label=fdt.LABEL_OPTIONAL)
    svc = fdp.service.add(name=GRPC_SERVICE)
    svc.method.add(
        name="Echo",
        input_type=f".{GRPC_PACKAGE}.EchoRequest",
        output_type=f".{GRPC_PACKAGE}.EchoReply",
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    req = message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{GRPC_PACKAGE}.EchoRequest"))
    rep = message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{GRPC_PACKAGE}.EchoReply"))
    return req, rep


def run_loop(main: Callable[[], Coroutine[Any, Any, Any]], loop: str) -> Any:
    """Run main() on a fresh event loop of the requested kind."""
    if loop == "uvloop":
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    elif loop in ("asyncio", "n/a"):
        factory = None
    else:
        raise ValueError(f"unknown loop kind {loop!r}")

    async def checked() -> Any:
        running = loop_kind(asyncio.get_running_loop())
        if loop in LOOPS and running != loop:
            raise RuntimeError(f"wanted a {loop} loop, running on {running}")
        return await main()

    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(checked())


def pin_meshkit_loop(loop: str) -> None:
    """Make meshkit's own loops (SyncClient's background loop, Service.run()) the kind asked
    for: meshkit picks uvloop whenever it is installed unless MESHKIT_UVLOOP=0."""
    if loop in LOOPS:
        os.environ["MESHKIT_UVLOOP"] = "1" if loop == "uvloop" else "0"


def loop_kind(loop: asyncio.AbstractEventLoop) -> str:
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies (belt and braces)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    except Exception:
        return
    parent = os.environ.get("MESHKIT_BENCH_PARENT")
    if parent and os.getppid() != int(parent):
        os._exit(1)  # the parent is already gone


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (all threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    fields = data[data.rindex(b")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds spent busy by the whole machine (all CPUs, incl. steal), /proc/stat."""
    with open("/proc/stat", "rb") as f:
        fields = f.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def err_text(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0]}" if msg else type(exc).__name__
