"""What a handler learns about the message it handles."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class MessageContext:
    """Where a message came from and how often it was tried.

    ``topic``/``partition``/``offset`` are where it was read now (a retry topic for a
    retried message); ``original_topic`` is the topic it was first published to.
    ``attempt`` counts handler attempts over every hop, starting at 1. ``headers`` are the
    message headers as text (last value wins). ``timestamp`` is the broker timestamp in
    milliseconds (``None`` when the broker gave none). Treat it as read-only.
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    headers: dict[str, str]
    timestamp: int | None
    group: str
    original_topic: str
    attempt: int = 1
    retry_level: int = 0
    raw: bytes | None = field(default=None, repr=False)

    @property
    def key_text(self) -> str | None:
        """The key decoded as UTF-8 (``None`` for a message without a key)."""
        return None if self.key is None else self.key.decode("utf-8", "replace")
