"""A worker process for the crash test: handles ``{"id": N, "key": K, "seq": S}`` messages
and appends ``id key seq`` to a file with one unbuffered write per message (so a SIGKILL
loses nothing that was handled). ``python worker_proc.py URL TOPIC GROUP OUT``."""

from __future__ import annotations

import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kafka_broker import CLIENT_SETTINGS

from meshkit.mq import MessageContext, Subscription, Worker


async def main(url: str, topic: str, group: str, out: str) -> None:
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    async def handle(msg: dict[str, int], ctx: MessageContext) -> None:
        await asyncio.sleep(0.001)
        os.write(fd, f"{msg['id']} {msg['key']} {msg['seq']}\n".encode())

    worker = Worker(
        group,
        [Subscription(topic, handle)],
        url=url,
        config=CLIENT_SETTINGS,
        concurrency=8,
        max_buffered=200,
        commit_interval=0.2,
    )
    await worker.start()
    os.write(fd, b"")  # opened: the parent can watch the file
    await asyncio.Event().wait()  # until killed


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
