"""Fixtures for the MQ tests, beside the module-scoped `broker` of tests/conftest.py (a real
tansu broker per test module, from ``tests/kafka_broker.py``).

Tests share the module's broker but each uses fresh topic names and group ids, which
also keeps clear of tansu's stuck-group bug. A broker that cannot start fails the tests.
"""

from __future__ import annotations

import pytest
from kafka_broker import CLIENT_SETTINGS, KafkaBroker, fresh


@pytest.fixture
def topic(broker: KafkaBroker) -> str:
    """A fresh topic with 3 partitions."""
    return broker.create_topic(fresh("t"), 3)


@pytest.fixture
def group() -> str:
    return fresh("g")


@pytest.fixture
def client_settings() -> dict[str, object]:
    return dict(CLIENT_SETTINGS)
