"""Kafka workers and publishers: at least once, ordered per key, retried, traced, measured.

::

    svc = Service("billing")

    @svc.subscribe("orders.created", model=OrderCreated)
    async def on_order(order: OrderCreated, ctx: MessageContext) -> None: ...

    await svc.publish("orders.created", OrderCreated(...), key=order.id)

The pieces work without a ``Service`` too: :class:`Publisher`, :class:`Worker`,
:class:`Subscription`. Needs ``confluent-kafka`` (``pip install 'meshkit[kafka]'``).
"""

from __future__ import annotations

try:
    import confluent_kafka  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError("meshkit.mq needs confluent-kafka: pip install 'meshkit[kafka]'") from exc

from .codec import Codec, JsonCodec, RawCodec, ThriftCodec
from .context import MessageContext
from .errors import (
    DeadLetter,
    DecodeError,
    HandlerCancelled,
    MqError,
    PublishBufferFull,
    PublishError,
)
from .producer import Delivery, Publisher
from .retry import NO_RETRIES, RetryPolicy, dlq_topic, retry_topic
from .subscription import Subscription
from .worker import Worker, ensure_topics

__all__ = [
    "NO_RETRIES",
    "Codec",
    "DeadLetter",
    "DecodeError",
    "Delivery",
    "HandlerCancelled",
    "JsonCodec",
    "MessageContext",
    "MqError",
    "PublishBufferFull",
    "PublishError",
    "Publisher",
    "RawCodec",
    "RetryPolicy",
    "Subscription",
    "ThriftCodec",
    "Worker",
    "dlq_topic",
    "ensure_topics",
    "retry_topic",
]
