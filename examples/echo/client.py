"""Call the echo service, async and sync.

With the service running (``meshkit run examples/echo/service.py:svc``)::

    python examples/echo/client.py hello                    # discovers echo in the registry
    python examples/echo/client.py hello --addr 127.0.0.1:9090
    python examples/echo/client.py hello --sync             # the blocking SyncClient

Discovery uses ``MESHKIT_REGISTRY`` (default ``local://``), the same registry the service
registered in.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import thriftpy2

from meshkit import Client, DeadlineExceeded, SyncClient

echo = thriftpy2.load(str(Path(__file__).with_name("echo.thrift")), module_name="echo_thrift")


async def main(message: str, addr: str | None) -> None:
    # addr=None: discover "echo" through the registry; addr="host:port": call it directly.
    async with Client(echo.Echo, "echo", addr=addr, timeout=1.0) as client:
        print("echo:   ", await client.echo(message))
        print("reverse:", await client.reverse(message))

        try:
            await client.reverse("")
        except echo.EchoError as exc:  # IDL exceptions arrive unchanged
            print("reverse(''): EchoError:", exc.reason)

        try:
            await client.call("slow", 500, timeout=0.1)  # per-call timeout
        except DeadlineExceeded as exc:
            print("slow(500) with a 0.1 s budget:", exc)

        await client.ping()  # oneway: returns once sent


def sync_main(message: str, addr: str | None) -> None:
    # For code without an event loop (scripts, threads, WSGI): same options, blocking calls.
    with SyncClient(echo.Echo, "echo", addr=addr, timeout=1.0) as client:
        print("echo (sync):   ", client.echo(message))
        print("reverse (sync):", client.reverse(message))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("message", nargs="?", default="hello, meshkit")
    parser.add_argument("--addr", help="host:port of an echo instance (skips discovery)")
    parser.add_argument("--sync", action="store_true", help="use the blocking SyncClient")
    args = parser.parse_args()
    if args.sync:
        sync_main(args.message, args.addr)
    else:
        asyncio.run(main(args.message, args.addr))
