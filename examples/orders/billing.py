"""The billing example worker: charges each ``orders.created`` message (see ``service.py``).

A Service with no IDL: it serves health and metrics (consumer lag per partition in
``/metrics``) and runs one Kafka worker. Failed charges are retried in place, then through
``orders.created.retry.1`` and into ``orders.created.dlq`` (``meshkit mq replay`` moves
them back); an undecodable message goes to the DLQ at once. Orders of one customer are
handled in order; different customers concurrently.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import structlog

from meshkit import Service
from meshkit.mq import MessageContext

TOPIC = "orders.created"


@dataclass
class OrderCreated:
    """Billing's view of the message (fields it does not know are an error: a poison
    message, dead-lettered with the reason)."""

    id: str
    customer: str
    amount_cents: int


log = structlog.get_logger("billing")

svc = Service("billing", version="1.0.0")

#: cents charged per customer (an in-memory stand-in for a payments ledger)
charged: defaultdict[str, int] = defaultdict(int)


@svc.subscribe(TOPIC, model=OrderCreated, concurrency=8)
async def charge(order: OrderCreated, ctx: MessageContext) -> None:
    charged[order.customer] += order.amount_cents
    log.info(
        "charged",
        order=order.id,
        customer=order.customer,
        amount_cents=order.amount_cents,
        customer_total_cents=charged[order.customer],
        partition=ctx.partition,
        offset=ctx.offset,
    )


if __name__ == "__main__":
    svc.run()
