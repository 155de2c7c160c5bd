"""What happens when a handler raises: in-place retries, retry topics, the dead-letter topic."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from .errors import ConfigError

__all__ = ["RetryPolicy", "dlq_topic", "retry_topic"]


def retry_topic(topic: str, level: int) -> str:
    """``<topic>.retry.<level>`` (levels start at 1)."""
    return f"{topic}.retry.{level}"


def dlq_topic(topic: str) -> str:
    """``<topic>.dlq``."""
    return f"{topic}.dlq"


@dataclass(frozen=True)
class RetryPolicy:
    """How a failing message is retried.

    1. ``attempts`` handler attempts in place (the partition's lane waits), sleeping
       ``backoff`` seconds (doubled each time, at most ``max_backoff``, with ±20 %
       jitter) between them: for transient errors (a dependency restarting).
    2. Then, for each delay in ``topic_delays``, the message moves to
       ``<topic>.retry.N`` and is handled again (``attempts`` times) no earlier than
       that many seconds later, without holding up the main topic.
    3. Then it moves to ``<topic>.dlq`` (when ``dead_letter`` is true; otherwise it is
       logged and dropped).

    A handler that raises :class:`~meshkit.mq.DeadLetter`, and a payload that does not
    decode, skip straight to step 3.
    """

    attempts: int = 3
    backoff: float = 0.1
    max_backoff: float = 5.0
    topic_delays: Sequence[float] = field(default=(5.0, 60.0))
    dead_letter: bool = True

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigError(f"expected RetryPolicy.attempts ≥ 1, found {self.attempts}")
        if self.backoff < 0 or self.max_backoff < 0:
            raise ConfigError(
                f"expected backoffs ≥ 0 s, found backoff={self.backoff} "
                f"max_backoff={self.max_backoff}"
            )
        delays = tuple(self.topic_delays)
        if any(d < 0 for d in delays):
            raise ConfigError(f"expected retry topic delays ≥ 0 s, found {list(delays)}")
        object.__setattr__(self, "topic_delays", delays)

    def backoff_for(self, attempt: int) -> float:
        """Sleep after in-place attempt number ``attempt`` (1-based) failed."""
        base = min(self.max_backoff, self.backoff * (2 ** (attempt - 1)))
        return base * random.uniform(0.8, 1.2)

    def retry_topics(self, topic: str) -> list[str]:
        return [retry_topic(topic, level) for level in range(1, len(self.topic_delays) + 1)]


#: No retries at all: the first failure goes to the dead-letter topic.
NO_RETRIES = RetryPolicy(attempts=1, topic_delays=())
