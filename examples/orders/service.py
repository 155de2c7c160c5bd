"""The orders example service: ``place(customer, amount_cents)`` publishes ``orders.created``.

An RPC service that hands work to a Kafka worker (``billing.py``). Start a broker, then
billing, then orders, and place an order (from the repository root)::

    meshkit mq broker &                                    # kafka://127.0.0.1:9092
    export MESHKIT_MQ=kafka://127.0.0.1:9092
    meshkit run examples/orders/billing.py:svc --health-port 9181 &
    meshkit run examples/orders/service.py:svc --port 9190 --health-port 9191 &
    meshkit call orders place --idl examples/orders/orders.thrift \\
        --arg customer=ann --arg amount_cents=1250

The reply comes once the broker has acknowledged the message (``svc.publish`` awaits it),
so an order that was answered is never lost; billing's log shows it charged. The message
is keyed by customer: billing handles one customer's orders in the order they were placed.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import thriftpy2

from meshkit import Service

HERE = Path(__file__).resolve().parent
orders = thriftpy2.load(str(HERE / "orders.thrift"), module_name="orders_thrift")

TOPIC = "orders.created"

svc = Service("orders", orders.Orders, version="1.0.0")


@dataclass
class OrderCreated:
    """The message billing consumes (JSON on the wire)."""

    id: str
    customer: str
    amount_cents: int


@svc.implement
class Orders:
    async def place(self, customer: str, amount_cents: int) -> str:
        if not customer or amount_cents <= 0:
            raise orders.InvalidOrder(
                message=f"expected a customer and a positive amount, found {customer!r} "
                f"and {amount_cents}"
            )
        order = OrderCreated(uuid.uuid4().hex[:12], customer, amount_cents)
        await svc.publish(TOPIC, order, key=customer)  # JSON
        return order.id


if __name__ == "__main__":
    svc.run()
