"""Fixtures for the registry tests, beside the real etcd servers of ``tests/conftest.py``:

* ``etcd``: a fresh etcd for one test (tests that stop, kill or restart it use this);
* ``etcd_session``: one etcd shared by the session; a test using it must keep to its own
  key prefix (``etcd_prefix`` gives a unique one).

A missing binary or an etcd that does not start fails the test with the reason; it never
skips.
"""

from __future__ import annotations

import secrets

import pytest


@pytest.fixture
def etcd_prefix() -> str:
    """A key prefix no other test uses, for tests on ``etcd_session``."""
    return f"/meshkit-test/{secrets.token_hex(4)}"
