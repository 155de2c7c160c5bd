"""Which offset of a partition may be committed: the first one not yet finished.

Messages of one partition are handed out in offset order but may finish in any order
(different keys run concurrently). :class:`PartitionState` remembers the offsets handed
out and not finished; the commit point is one past the last offset finished with every
earlier one finished too. So the committed offset never passes an unfinished message,
and gaps in offsets (compaction, transaction markers) need no special case.
"""

from __future__ import annotations

from collections import deque


class PartitionState:
    """Offsets in flight for one assigned partition, and its commit point."""

    __slots__ = ("committed", "done", "next_commit", "partition", "pending", "revoked", "topic")

    def __init__(self, topic: str, partition: int, committed: int | None = None) -> None:
        self.topic = topic
        self.partition = partition
        self.pending: deque[int] = deque()
        self.done: set[int] = set()
        #: offset to commit next (one past the last contiguous finished offset)
        self.next_commit: int | None = None
        #: offset last committed (by this process, or found at assignment)
        self.committed = committed
        #: set when the partition was revoked: its queued messages are abandoned
        self.revoked = False

    def add(self, offset: int) -> None:
        """A message at ``offset`` was handed out (offsets arrive in increasing order)."""
        self.pending.append(offset)

    def finish(self, offset: int) -> None:
        """The message at ``offset`` is finished (handled, retried elsewhere or dead-lettered)."""
        pending = self.pending
        if pending and pending[0] == offset:
            pending.popleft()
            last = offset
            done = self.done
            while pending and pending[0] in done:
                last = pending.popleft()
                done.discard(last)
            self.next_commit = last + 1
        else:
            self.done.add(offset)

    def commit_point(self) -> int | None:
        """The offset to commit now: ``None`` when nothing new finished since the last commit."""
        point = self.next_commit
        if point is None or point == self.committed:
            return None
        return point

    @property
    def in_flight(self) -> int:
        return len(self.pending)
