"""A workers-only meshkit service for the SIGTERM test, run with ``meshkit run``.

Reads ``MQ_TEST_TOPIC``, ``MQ_TEST_GROUP`` and ``MQ_TEST_OUT`` (a file that gets one
``id key seq`` line per handled message, one unbuffered write each).
"""

from __future__ import annotations

import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kafka_broker import CLIENT_SETTINGS

from meshkit import Service
from meshkit.mq import MessageContext

svc = Service("billing")
_fd = os.open(os.environ["MQ_TEST_OUT"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


@svc.subscribe(
    os.environ["MQ_TEST_TOPIC"],
    group=os.environ["MQ_TEST_GROUP"],
    config=CLIENT_SETTINGS,
    concurrency=8,
    max_buffered=100,
    commit_interval=0.2,
)
async def bill(order: dict[str, int], ctx: MessageContext) -> None:
    await asyncio.sleep(0.002)
    os.write(_fd, f"{order['id']} {order['key']} {order['seq']}\n".encode())
