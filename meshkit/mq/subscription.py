"""One topic's handler, model/codec and retry policy, as ``@svc.subscribe`` declares it."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .codec import Codec, codec_for
from .errors import ConfigError
from .retry import RetryPolicy, dlq_topic

Handler = Callable[..., Any]


@dataclass
class Subscription:
    """``handler(value, ctx)`` (or ``handler(value)``) for messages of ``topic``.

    ``handler`` may be ``async def`` (runs on the event loop) or plain ``def`` (runs in
    a thread so it cannot block the loop). ``model``: the payload type (see
    :func:`~meshkit.mq.codec.codec_for`); ``codec`` overrides it.
    """

    topic: str
    handler: Handler
    model: Any = None
    codec: Codec | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    is_async: bool = field(init=False)
    wants_context: bool = field(init=False)

    def __post_init__(self) -> None:
        if not self.topic or any(c.isspace() for c in self.topic):
            raise ConfigError(f"expected a Kafka topic name, found {self.topic!r}")
        if not callable(self.handler):
            raise ConfigError(
                f"expected a callable handler for {self.topic!r}, found {self.handler!r}"
            )
        self.codec = codec_for(self.model, self.codec)
        self.is_async = inspect.iscoroutinefunction(self.handler) or inspect.iscoroutinefunction(
            getattr(self.handler, "__call__", None)  # noqa: B004 - async callable objects
        )
        try:
            params = [
                p
                for p in inspect.signature(self.handler).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
            ]
        except (TypeError, ValueError):
            params = []
        if not params:
            raise ConfigError(
                f"expected the handler for {self.topic!r} to take (message) or "
                "(message, ctx), it takes no positional argument"
            )
        self.wants_context = len(params) >= 2 or params[0].kind is params[0].VAR_POSITIONAL

    @property
    def topics(self) -> list[str]:
        """The topic and its retry topics: what the worker reads."""
        return [self.topic, *self.retry.retry_topics(self.topic)]

    @property
    def dlq(self) -> str:
        return dlq_topic(self.topic)
