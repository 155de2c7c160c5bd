"""Message headers meshkit writes on retried and dead-lettered messages.

All values are UTF-8 text. A message in ``<topic>.retry.N`` or ``<topic>.dlq`` keeps
the original key, value and headers, plus:

``meshkit-original-topic``, ``-partition``, ``-offset``, ``-timestamp`` (ms)
    where the message was first consumed (kept across retry hops);
``meshkit-attempts``
    handler attempts so far, over all hops;
``meshkit-error``, ``meshkit-error-type``
    the last error (message, truncated to 1000 characters) and its class;
``meshkit-group``
    the consumer group that failed it;
``meshkit-failed-at``
    when it was moved (ms since the epoch);
``meshkit-retry-level``, ``meshkit-not-before``
    on retry topics only: which retry topic and when it may run (ms);
``meshkit-dead-letter-reason``
    on the DLQ only: ``poison`` (undecodable), ``rejected`` (the handler raised
    :class:`~meshkit.mq.DeadLetter`) or ``exhausted`` (retries used up).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

ORIGINAL_TOPIC = "meshkit-original-topic"
ORIGINAL_PARTITION = "meshkit-original-partition"
ORIGINAL_OFFSET = "meshkit-original-offset"
ORIGINAL_TIMESTAMP = "meshkit-original-timestamp"
ATTEMPTS = "meshkit-attempts"
ERROR = "meshkit-error"
ERROR_TYPE = "meshkit-error-type"
GROUP = "meshkit-group"
FAILED_AT = "meshkit-failed-at"
RETRY_LEVEL = "meshkit-retry-level"
NOT_BEFORE = "meshkit-not-before"
DEAD_LETTER_REASON = "meshkit-dead-letter-reason"
REPLAYED_AT = "meshkit-replayed-at"

#: Headers replaced (not duplicated) each time meshkit moves a message.
MESHKIT_HEADERS = frozenset(
    {
        ORIGINAL_TOPIC,
        ORIGINAL_PARTITION,
        ORIGINAL_OFFSET,
        ORIGINAL_TIMESTAMP,
        ATTEMPTS,
        ERROR,
        ERROR_TYPE,
        GROUP,
        FAILED_AT,
        RETRY_LEVEL,
        NOT_BEFORE,
        DEAD_LETTER_REASON,
        REPLAYED_AT,
    }
)

HeaderList = list[tuple[str, bytes]]

#: Headers as confluent-kafka hands them out (or takes them).
RawHeaders = Mapping[str, str | bytes | None] | Sequence[tuple[str, str | bytes | None]] | None


def _items(
    headers: RawHeaders | Iterable[tuple[str, bytes | str | None]],
) -> Iterable[tuple[str, str | bytes | None]]:
    if headers is None:
        return ()
    if isinstance(headers, Mapping):
        return headers.items()
    return headers


def header_map(headers: RawHeaders) -> dict[str, str]:
    """Headers as ``{name: text}`` (the last value wins for a repeated name)."""
    out: dict[str, str] = {}
    for name, value in _items(headers):
        if isinstance(value, bytes):
            out[name] = value.decode("utf-8", "replace")
        else:
            out[name] = value or ""
    return out


def replace_headers(
    headers: RawHeaders,
    updates: Mapping[str, str | None],
    *,
    drop: Iterable[str] = (),
) -> HeaderList:
    """``headers`` without the names in ``updates`` and ``drop``, then ``updates`` appended
    (``None`` values are left out)."""
    removed = set(updates) | set(drop)
    out: HeaderList = []
    for name, value in _items(headers):
        if name in removed:
            continue
        if value is None:
            out.append((name, b""))
        else:
            out.append((name, value if isinstance(value, bytes) else value.encode()))
    out.extend((name, value.encode()) for name, value in updates.items() if value is not None)
    return out
