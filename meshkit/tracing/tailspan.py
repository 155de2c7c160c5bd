"""The outline of an unsampled span, kept only in case it errs or runs slow.

With tail keeping on (the default) and meshkit's export queue as the only span processor,
an unsampled span is exported only when it ends in error or runs longer than the slow
threshold: most of them never are. Until its end says which, meshkit's RPC span of an
unsampled trace is a :class:`TailSpan`: its context (carried on the wire as any other),
its parent, its kind and its start time, and nothing else is built. At its end the
tracer hook either forgets it (the usual case) or builds the full span from it,
attributes and all (:meth:`meshkit.tracing.fastspan.FastRecorder.build_kept`), and hands
that to the queue, which exports it marked ``meshkit.kept``.

To user code it is a non-recording span (``is_recording()`` is false, so instrumentation
skips work for it), yet what a handler sets on it anyway (attributes, events, status,
name) is noted and carried into the span if it is kept. Spans user code starts under it
are the SDK's, sampled as its children (recorded only, kept on error or when slow).

This module needs only ``opentelemetry-api``.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Mapping
from typing import Any

from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.util import types

__all__ = ["Notes", "TailSpan"]

#: attributes and events noted at most (the newest kept): the SDK's default span limits;
#: a kept span applies its provider's own limits when it is built
MAX_NOTED = 128


class Notes:
    """What user code set on a :class:`TailSpan`."""

    __slots__ = ("attributes", "events", "name", "status")

    def __init__(self) -> None:
        self.attributes: dict[str, Any] = {}
        self.events: collections.deque[tuple[str, types.Attributes, int]] = collections.deque(
            maxlen=MAX_NOTED
        )
        self.name: str | None = None
        self.status: Status | None = None


def exception_attributes(
    exception: BaseException, attributes: types.Attributes, escaped: bool
) -> dict[str, Any]:
    """The attributes of a span's ``exception`` event (OpenTelemetry's semantic conventions)."""
    event_attributes: dict[str, Any] = {
        "exception.type": type(exception).__qualname__,
        "exception.message": str(exception),
        "exception.escaped": str(escaped),
    }
    if attributes:
        event_attributes.update(attributes)
    return event_attributes


class TailSpan(NonRecordingSpan):
    """An unsampled meshkit span in outline (see the module documentation)."""

    _notes: Notes | None = None

    def __init__(
        self, context: SpanContext, parent: SpanContext | None, kind: SpanKind, start: int
    ) -> None:
        self._context = context
        self._parent = parent
        self._kind = kind
        self._start = start

    def _noted(self) -> Notes:
        notes = self._notes
        if notes is None:
            notes = self._notes = Notes()
        return notes

    def set_attributes(self, attributes: Mapping[str, types.AnyValue]) -> None:
        noted = self._noted().attributes
        noted.update(attributes)
        if len(noted) > MAX_NOTED:
            for key in list(noted)[: len(noted) - MAX_NOTED]:
                del noted[key]  # the oldest, as the SDK's bounded attributes

    def set_attribute(self, key: str, value: types.AnyValue) -> None:
        noted = self._noted().attributes
        noted[key] = value
        if len(noted) > MAX_NOTED:
            del noted[next(iter(noted))]  # the oldest

    def add_event(
        self,
        name: str,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
    ) -> None:
        self._noted().events.append((name, attributes, timestamp or time.time_ns()))

    def update_name(self, name: str) -> None:
        self._noted().name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if isinstance(status, StatusCode):
            status = Status(status, description)
        if status.status_code is StatusCode.UNSET:
            return  # changes nothing, as in the SDK
        notes = self._noted()
        if notes.status is None or notes.status.status_code is not StatusCode.OK:
            notes.status = status  # OK is final, as in the SDK

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        self.add_event("exception", exception_attributes(exception, attributes, escaped), timestamp)

    @property
    def erred(self) -> bool:
        """Whether user code set an error status on it."""
        notes = self._notes
        status = None if notes is None else notes.status
        return status is not None and status.status_code is StatusCode.ERROR
