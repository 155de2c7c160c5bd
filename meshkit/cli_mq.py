"""``meshkit mq``: the Kafka side of the command line.

::

    meshkit mq broker                      # the bundled Kafka-protocol broker, for development
    meshkit mq replay orders.created       # move orders.created.dlq back to orders.created

Exit codes: 0 success; 1 the broker or the replay failed; 2 a usage error.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

import click

__all__ = ["mq"]


class _Failure(click.ClickException):
    exit_code = 1


class _Usage(click.ClickException):
    exit_code = 2


@click.group()
def mq() -> None:
    """Kafka workers' tools: a development broker, dead-letter replay."""


@mq.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", type=click.IntRange(1, 65535), default=9092, show_default=True, help="Port."
)
def broker(host: str, port: int) -> None:
    """Run the bundled Kafka-protocol broker (tansu, memory storage) until Ctrl-C.

    For development and the demo only: nothing survives a restart. Point services at it
    with MESHKIT_MQ=kafka://HOST:PORT.
    """
    from .mq.broker import BrokerError, DevBroker

    # Handlers first: a SIGTERM that arrives as soon as the ready lines are out must
    # still stop the broker the orderly way.
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    server: DevBroker | None = None
    try:
        try:
            server = DevBroker(host=host, port=port, log_path=None, die_with_parent=True)
            server.start()
        except BrokerError as exc:
            raise _Failure(str(exc)) from None
        click.echo(
            f"tansu broker listening on {server.bootstrap} (memory storage: nothing is kept)"
        )
        click.echo(f"use it with: export MESHKIT_MQ={server.url}")
        while not stop.wait(0.5):
            if not server.running:
                raise _Failure("the broker exited unexpectedly")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if server is not None:
            server.close()
    click.echo("broker stopped")


@mq.command()
@click.argument("topic")
@click.option("--url", metavar="URL", help="kafka://host:port (default: MESHKIT_MQ).")
@click.option("--dlq", metavar="TOPIC", help="Dead-letter topic to read (default: TOPIC.dlq).")
@click.option(
    "--to", "to", metavar="TOPIC", help="Publish here instead of each message's original topic."
)
@click.option("--limit", type=click.IntRange(min=1), help="Replay at most this many messages.")
@click.option("--dry-run", is_flag=True, help="Read and count, publish and commit nothing.")
def replay(
    topic: str, url: str | None, dlq: str | None, to: str | None, limit: int | None, dry_run: bool
) -> None:
    """Move dead-lettered messages of TOPIC back to where they came from.

    Reads TOPIC.dlq from where the previous replay stopped, republishes each message
    (key, value and headers, minus meshkit's failure headers, plus meshkit-replayed-at)
    and commits only what the broker acknowledged. Safe to run again.
    """
    from .errors import ConfigError, MeshkitError
    from .mq.replay import replay_dlq

    def progress(target: str, partition: int, offset: int) -> None:
        click.echo(f"  {dlq or topic + '.dlq'}[{partition}]@{offset} -> {target}", err=True)

    try:
        result = replay_dlq(
            topic, url=url, dlq=dlq, to=to, limit=limit, dry_run=dry_run, on_message=progress
        )
    except ConfigError as exc:
        raise _Usage(exc.message) from None
    except MeshkitError as exc:
        raise _Failure(exc.message) from None
    verb = "would replay" if dry_run else "replayed"
    targets = ", ".join(f"{n} to {t}" for t, n in sorted(result.by_topic.items())) or "nothing"
    click.echo(f"{verb} {result.replayed} message(s) from {result.dlq}: {targets}")
    sys.stdout.flush()
