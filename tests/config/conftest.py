"""Fixtures for the config tests: real etcd servers, private local:// stores.

* ``etcd``: a fresh etcd for one test (tests that stop, kill or restart it use this);
* ``etcd_session``: one etcd shared by the session; tests keep to their own key prefix;
* ``store_url``: a private store URL for each backend: ``local``, ``etcd`` and ``consul``
  (the Consul KV HTTP double of ``consul_kv_double.py``, or the real agent named by
  ``MESHKIT_CONSUL_ADDR``; marked ``consul_contract``).

A missing binary or an etcd that does not start fails the test with the reason.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import structlog
from consul_kv_double import ConsulKVDouble
from etcd_server import EtcdServer

from meshkit.config import ConfigStore, store_from_url


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The CLI configures logging for its process; give later tests theirs back."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        structlog.configure(**saved)
        root.handlers[:] = handlers
        root.setLevel(level)


BACKENDS = ["local", "etcd", pytest.param("consul", marks=pytest.mark.consul_contract)]


def etcd_url(server: EtcdServer) -> str:
    return f"{server.url}?prefix=/meshkit-test/{secrets.token_hex(4)}"


@pytest.fixture(params=BACKENDS)
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A private config store URL on each backend."""
    if request.param == "local":
        yield f"local://{tmp_path / 'config'}"
    elif request.param == "etcd":
        yield etcd_url(request.getfixturevalue("etcd_session"))
    else:
        prefix = f"meshkit-test/{secrets.token_hex(4)}"
        if real := os.environ.get("MESHKIT_CONSUL_ADDR"):
            yield f"consul://{real}?prefix={prefix}"
            return
        async with ConsulKVDouble() as double:
            yield f"consul://{double.address}?prefix={prefix}&wait=5"


@pytest.fixture
async def consul_kv() -> AsyncIterator[ConsulKVDouble]:
    async with ConsulKVDouble() as double:
        yield double


@pytest.fixture
def local_url(tmp_path: Path) -> str:
    return f"local://{tmp_path / 'config'}"


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[ConfigStore]:
    s = store_from_url(store_url)
    try:
        yield s
    finally:
        await s.close()
