"""etcd plumbing shared by the registry and the config store: aetcd import, endpoints, errors.

Both backends talk to etcd through ``aetcd`` (asyncio-native gRPC). This module holds
what they have in common: the optional import, endpoint parsing and formatting, the
gRPC channel options, which exceptions mean "connection lost", and channel readiness.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from typing import Any

from .errors import ConfigError

try:  # the optional "etcd" extra
    import aetcd
    import aetcd.exceptions
    import grpc
except ImportError as _exc:  # pragma: no cover - depends on the environment
    aetcd = None
    IMPORT_ERROR: ImportError | None = _exc
else:
    IMPORT_ERROR = None


DEFAULT_PORT = 2379
DEFAULT_CONNECT_TIMEOUT = 2.0
DEFAULT_REQUEST_TIMEOUT = 5.0

# gRPC channel options: a subchannel of our own per client (the process-wide pool would hand
# a new client a subchannel still backing off from an old client's failures), reconnect
# quickly after an etcd restart, and notice a silently dead peer under a long-lived watch
# stream (etcd accepts pings every 5 s or slower).
CHANNEL_OPTIONS: dict[str, Any] = {
    "grpc.use_local_subchannel_pool": 1,
    "grpc.initial_reconnect_backoff_ms": 200,
    "grpc.min_reconnect_backoff_ms": 200,
    "grpc.max_reconnect_backoff_ms": 2000,
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.http2.max_pings_without_data": 0,
}


def connection_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [TimeoutError, OSError, ConnectionError]
    if aetcd is not None:
        errors += [
            aetcd.exceptions.ConnectionFailedError,
            aetcd.exceptions.ConnectionTimeoutError,
            aetcd.exceptions.WatchTimeoutError,
            aetcd.exceptions.InternalError,  # e.g. "Internal error from Core" as a link dies
            grpc.RpcError,
            grpc.aio.UsageError,
        ]
    return tuple(errors)


CONNECTION_ERRORS = connection_errors()
ETCD_ERRORS: tuple[type[BaseException], ...] = CONNECTION_ERRORS + (
    (aetcd.exceptions.ClientError,) if aetcd is not None else ()
)


def positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"expected {name} to be a positive number, found {value!r}")
    if value <= 0:
        raise ConfigError(f"expected {name} to be a positive number, found {value!r}")
    return float(value)


def parse_endpoint(text: str, where: str) -> tuple[str, int]:
    text = text.strip()
    if not text:
        raise ConfigError(f"expected host:port endpoints separated by commas, found {where!r}")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not host or (rest and not rest.startswith(":")):
            raise ConfigError(f"expected [ipv6]:port, found {text!r} in {where!r}")
        port_text = rest[1:]
    else:
        host, _, port_text = text.partition(":")
        if not host or ":" in port_text:
            raise ConfigError(f"expected host:port, found {text!r} in {where!r}")
    if not port_text:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"expected a port between 1 and 65535, found {text!r} in {where!r}")
    return host, int(port_text)


def format_endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def error_text(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 300 else text[:300] + "…"


async def wait_ready(channel: Any, timeout: float) -> None:
    """Wait until ``channel`` is READY; fail fast on TRANSIENT_FAILURE (e.g. refused)."""
    ready = grpc.ChannelConnectivity.READY
    failed = (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN)
    async with asyncio.timeout(timeout):
        state = channel.get_state(try_to_connect=True)
        while state is not ready:
            if state in failed:
                raise ConnectionError(f"gRPC channel is {state.name}")
            await channel.wait_for_state_change(state)
            state = channel.get_state(try_to_connect=True)


async def close_client(client: Any) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(5.0):
            await client.close()


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait for it to end, cancelling again if it swallowed the request.

    ``asyncio.wait_for`` on Python 3.11 returns the result instead of raising when the
    awaited operation completes just as its task is cancelled (fixed in 3.12); aetcd uses
    it to create watches, so one cancellation is not always enough.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.5)
    if not task.cancelled():
        with contextlib.suppress(Exception):
            task.result()
