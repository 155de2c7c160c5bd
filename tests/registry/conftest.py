"""Fixtures for the registry tests: real etcd servers (see ``tests/etcd_server.py``).

* ``etcd``: a fresh etcd for one test (tests that stop, kill or restart it use this);
* ``etcd_session``: one etcd shared by the session; a test using it must keep to its own
  key prefix (``etcd_prefix`` gives a unique one).

A missing binary or an etcd that does not start fails the test with the reason; it never
skips.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
from etcd_server import EtcdServer


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


@pytest.fixture
def etcd_prefix() -> str:
    """A key prefix no other test uses, for tests on ``etcd_session``."""
    return f"/meshkit-test/{secrets.token_hex(4)}"
