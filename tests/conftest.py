"""Shared fixtures: the echo IDL, an implementation, and running services."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from echo_support import ECHO_IDL, ROOT, EchoImpl, echo_thrift  # noqa: F401
from etcd_server import EtcdServer
from kafka_broker import KafkaBroker
from prometheus_client import CollectorRegistry


@pytest.fixture
def echo_module() -> Any:
    return echo_thrift


@pytest.fixture
def metrics_registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def registry_url(tmp_path: Path) -> str:
    """A private local:// registry directory for one test."""
    return f"local://{tmp_path / 'registry'}"


@pytest.fixture
async def echo_service(metrics_registry: CollectorRegistry) -> AsyncIterator[Any]:
    """A started echo Service (no registry) with its implementation at ``.implementation``."""
    from meshkit import Service

    svc = Service("echo", echo_thrift.Echo, registry=None, metrics_registry=metrics_registry)
    svc.implement(EchoImpl())
    await svc.start(port=0, health_port=0)
    try:
        yield svc
    finally:
        await svc.stop(drain_timeout=1.0)


# -- real etcd servers (tests/etcd_server.py); a server that does not start fails the test


@pytest.fixture
def etcd() -> Iterator[EtcdServer]:
    """A running etcd of this test's own (``.url`` is ``etcd://127.0.0.1:PORT``)."""
    server = EtcdServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def etcd_session() -> Iterator[EtcdServer]:
    """A running etcd shared by every test of the session: do not stop or restart it."""
    server = EtcdServer(name="meshkit-session")
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def broker() -> Iterator[KafkaBroker]:
    """A real tansu broker per test module (``tests/kafka_broker.py``); tests use fresh
    topic names and group ids. A broker that cannot start fails the tests."""
    server = KafkaBroker()
    try:
        server.start()
        yield server
    finally:
        server.close()
