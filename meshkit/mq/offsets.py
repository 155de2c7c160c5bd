"""Which offset of a partition may be committed: the end of the finished fetched batches.

Each ``consume()`` hands the worker a batch of messages; the messages of one partition
in it form an :class:`OffsetBatch` (offsets increasing, gaps allowed). Messages of a
partition may finish in any order (different keys run concurrently), so a batch only
counts how many of its messages are not finished yet. :class:`PartitionState` keeps
the partition's unfinished batches in fetch order; the commit point is the end (last
offset + 1) of the last batch that finished with every earlier batch finished too.

So the committed offset never passes an unfinished message: it lags behind the exact
point (one past the last contiguous finished offset) by at most the finished messages
of the oldest unfinished batch, which a restart would handle again. That costs one
counter decrement per message instead of per-offset bookkeeping, and gaps in offsets
(compaction, transaction markers) need no special case.
"""

from __future__ import annotations

from collections import deque
from typing import Any


class OffsetBatch:
    """Messages of one partition handed out together by one ``consume()``.

    ``left`` counts the messages not finished; ``end`` is one past the last offset
    (set once the batch is complete, before any of its messages run). ``fast`` is
    what the worker's runners check per message (see :class:`~meshkit.mq.Worker`);
    ``route`` is the worker's own data about the partition's topic.
    """

    __slots__ = ("end", "fast", "last", "left", "route", "state")

    def __init__(self, state: PartitionState, route: Any = None, fast: bool = False) -> None:
        self.state = state
        self.left = 0
        self.end = -1
        #: the last message added while the batch is being filled (its offset gives ``end``)
        self.last: Any = None
        self.route = route
        self.fast = fast


class PartitionState:
    """Unfinished batches of one assigned partition, and its commit point."""

    __slots__ = ("batches", "committed", "next_commit", "partition", "revoked", "topic")

    def __init__(self, topic: str, partition: int, committed: int | None = None) -> None:
        self.topic = topic
        self.partition = partition
        #: batches handed out and not finished, oldest first
        self.batches: deque[OffsetBatch] = deque()
        #: offset to commit next (the end of the last finished batch, all earlier finished)
        self.next_commit: int | None = None
        #: offset last committed (by this process, or found at assignment)
        self.committed = committed
        #: set when the partition was revoked: its queued messages are abandoned
        self.revoked = False

    def open(self, route: Any = None, fast: bool = False) -> OffsetBatch:
        """A new batch of this partition, after every batch handed out before it."""
        batch = OffsetBatch(self, route, fast)
        self.batches.append(batch)
        return batch

    def finish(self, batch: OffsetBatch) -> bool:
        """One message of ``batch`` finished (handled, retried elsewhere or dead-lettered).

        Returns ``True`` when that completed the batch (the commit point may have moved).
        The worker's runners inline this; it is here for the other paths and for tests.
        """
        batch.left -= 1
        if batch.left:
            return False
        self.completed()
        return True

    def completed(self) -> None:
        """A batch finished its last message: move the commit point past the finished
        batches at the head."""
        batches = self.batches
        while batches and not batches[0].left:
            self.next_commit = batches.popleft().end

    def revoke(self) -> None:
        """The partition is gone: its messages not started yet are abandoned."""
        self.revoked = True
        for batch in self.batches:
            batch.fast = False

    def commit_point(self) -> int | None:
        """The offset to commit now: ``None`` when nothing new finished since the last commit."""
        point = self.next_commit
        if point is None or point == self.committed:
            return None
        return point

    @property
    def in_flight(self) -> int:
        """Messages handed out and not finished."""
        return sum(b.left for b in self.batches)
