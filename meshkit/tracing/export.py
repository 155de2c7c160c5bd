"""Span export off the hot path: a bounded queue drained by one background thread.

:class:`ExportQueue` is the span processor meshkit installs. A finished span costs the
caller one ``deque.append``; a daemon thread hands batches to the exporter (OTLP/HTTP
protobuf by default). When the queue is full the span is **dropped and counted**, never
waited for: an unreachable collector must not slow a service down.

It differs from the SDK's ``BatchSpanProcessor`` in two ways that matter here: every drop
is counted in Prometheus (``meshkit_traces_spans_dropped_total{reason}``), and it exports
spans the head sampler did not sample when they erred or were slow (*tail keeping*, see
:mod:`meshkit.tracing.sampling`), marked ``meshkit.kept=error|slow``.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import StatusCode
from prometheus_client import CollectorRegistry, Counter

from .._metrics import PerRegistry

__all__ = ["ExportMetrics", "ExportQueue"]

log = logging.getLogger(__name__)

#: Attribute set on a span exported only because it erred or was slow.
KEPT_ATTRIBUTE = "meshkit.kept"

#: Span classes whose ``context`` property returns their ``_context`` field, read directly
#: on the hot path (``meshkit.tracing.fastspan`` adds its ``FastSpan``).
DIRECT_CONTEXT: set[type] = {
    cls for cls in (ReadableSpan, Span, getattr(sdk_trace, "_Span", None)) if isinstance(cls, type)
}


class ExportMetrics(PerRegistry):
    """``meshkit_traces_spans_{exported,dropped}_total`` in one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.exported = Counter(
            "meshkit_traces_spans_exported",
            "Spans handed to the trace exporter successfully",
            registry=registry,
        )
        self.dropped = Counter(
            "meshkit_traces_spans_dropped",
            "Spans dropped instead of exported, by reason (queue_full, export_failed, shutdown)",
            ["reason"],
            registry=registry,
        )
        self.tail_kept = Counter(
            "meshkit_traces_spans_tail_kept",
            "Spans the head sampler skipped but that were exported because they erred or were slow",
            ["reason"],
            registry=registry,
        )


def _marked(span: ReadableSpan, reason: str) -> ReadableSpan:
    """A copy of ``span`` carrying ``meshkit.kept=reason`` (ended spans are read-only)."""
    return ReadableSpan(
        name=span.name,
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes={**(span.attributes or {}), KEPT_ATTRIBUTE: reason},
        events=span.events,
        links=span.links,
        kind=span.kind,
        status=span.status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


class ExportQueue(SpanProcessor):
    """Queue finished spans and export them in batches from a background thread.

    ``max_queue``: spans waiting at most (more are dropped and counted).
    ``max_batch``: spans per export call. ``delay``: seconds between exports when the
    queue is not filling up. ``slow_after``: seconds after which an unsampled span is
    kept anyway (``None``: never); unsampled spans with an error status are always kept
    when ``keep_errors``. ``shutdown_timeout``: seconds :meth:`shutdown` takes at most
    (:meth:`force_flush` keeps to its own ``timeout_millis``). Only spans the sampler
    *recorded* reach this processor, so tail keeping needs the record-only sampler of
    :mod:`meshkit.tracing.sampling`.
    """

    def __init__(
        self,
        exporter: SpanExporter,
        *,
        max_queue: int = 8192,
        max_batch: int = 512,
        delay: float = 0.5,
        slow_after: float | None = 1.0,
        keep_errors: bool = True,
        metrics_registry: CollectorRegistry | None = None,
        shutdown_timeout: float = 5.0,
    ) -> None:
        if max_queue < 1 or max_batch < 1:
            raise ValueError(
                f"expected max_queue ≥ 1 and max_batch ≥ 1, found {max_queue} and {max_batch}"
            )
        self.exporter = exporter
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.delay = delay
        self.slow_after_ns = None if slow_after is None else int(slow_after * 1e9)
        self.keep_errors = keep_errors
        self.shutdown_timeout = shutdown_timeout
        metrics = ExportMetrics.get(metrics_registry)
        self._exported = metrics.exported
        self._dropped_full = metrics.dropped.labels("queue_full")
        self._dropped_failed = metrics.dropped.labels("export_failed")
        self._dropped_shutdown = metrics.dropped.labels("shutdown")
        self._kept = metrics.tail_kept
        self._queue: collections.deque[ReadableSpan] = collections.deque()
        self._wake = threading.Event()
        self._export_lock = threading.Lock()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._start_thread()
        if hasattr(os, "register_at_fork"):
            ref = weakref.WeakMethod(self._after_fork)
            os.register_at_fork(after_in_child=lambda: (m := ref()) is not None and m())

    def _start_thread(self) -> None:
        self._thread = threading.Thread(target=self._run, name="meshkit-trace-export", daemon=True)
        self._thread.start()

    def _after_fork(self) -> None:
        # The thread does not survive a fork; the queued spans belong to the parent.
        self._queue.clear()
        self._wake = threading.Event()
        self._export_lock = threading.Lock()
        if not self._stopped:
            self._start_thread()

    # -- hot path -------------------------------------------------------------

    def on_start(self, span: Span, parent_context: object = None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        # SpanContext.trace_flags.sampled, without 2 calls (3 with the context property)
        context: Any = span._context if span.__class__ in DIRECT_CONTEXT else span.context
        if not context[3] & 1:
            reason = self._tail_reason(span)
            if reason is None:
                return
            span = _marked(span, reason)
        else:
            reason = None
        queue = self._queue
        if len(queue) >= self.max_queue or self._stopped:
            (self._dropped_shutdown if self._stopped else self._dropped_full).inc()
            return
        queue.append(span)
        if reason is not None:  # counted once queued: a dropped span was not kept
            self._kept.labels(reason).inc()
        if len(queue) == self.max_batch:
            self._wake.set()

    def _tail_reason(self, span: ReadableSpan) -> str | None:
        if self.keep_errors and span.status.status_code is StatusCode.ERROR:
            return "error"
        slow = self.slow_after_ns
        if (
            slow is not None
            and span.end_time is not None
            and span.start_time is not None
            and span.end_time - span.start_time >= slow
        ):
            return "slow"
        return None

    # -- background -----------------------------------------------------------

    @property
    def queued(self) -> int:
        """Spans waiting for export."""
        return len(self._queue)

    def _run(self) -> None:
        while not self._stopped:
            # woken by a full batch: export full batches only (the spans that arrived
            # while one was sent wait for the next); every ``delay``: everything
            full = self._wake.wait(self.delay)
            self._wake.clear()
            self._drain(full_only=full)

    def _drain(self, *, full_only: bool = False, deadline: float | None = None) -> bool:
        """Export queued batches; ``False`` when ``deadline`` (``time.monotonic()``)
        passed first, with spans left in the queue."""
        # Sending a batch costs about a millisecond of CPU whatever its size (HTTP), and
        # under load spans keep arriving while one is sent: draining to empty would send
        # a trickle of tiny batches, several times the CPU per span of full ones.
        if deadline is None:
            self._export_lock.acquire()
        elif not self._export_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return False  # the thread is sending a batch that outlasts the deadline
        try:
            queue = self._queue
            least = self.max_batch if full_only else 1
            while len(queue) >= least:
                if deadline is None:
                    if self._stopped:
                        break  # shutdown drains what is left, within its bound
                    left = None
                else:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                batch: list[ReadableSpan] = []
                while queue and len(batch) < self.max_batch:
                    batch.append(queue.popleft())
                self._export(batch, left)
            return True
        finally:
            self._export_lock.release()

    def _export(self, batch: Sequence[ReadableSpan], timeout: float | None = None) -> None:
        try:
            export_within = getattr(self.exporter, "export_within", None)
            if timeout is not None and export_within is not None:
                result = export_within(batch, timeout)  # its retries end by the deadline
            else:
                result = self.exporter.export(batch)
        except Exception:
            log.exception("trace export failed; %d spans dropped", len(batch))
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            self._exported.inc(len(batch))
        else:
            self._dropped_failed.inc(len(batch))

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Export everything queued now (in the calling thread), for ``timeout_millis``
        at most: ``True`` when done. Spans left at the deadline stay queued for the
        background thread (nothing is lost) and ``False`` is returned."""
        deadline = time.monotonic() + timeout_millis / 1000
        return self._drain(deadline=deadline) and not self._queue

    def shutdown(self, timeout_millis: int | None = None) -> None:
        """Export what is queued, stop the thread and shut the exporter down, within
        ``timeout_millis`` (default :attr:`shutdown_timeout`); spans still queued at the
        deadline are dropped and counted (``reason="shutdown"``)."""
        if self._stopped:
            return
        if timeout_millis is None:
            timeout_millis = int(self.shutdown_timeout * 1000)
        deadline = time.monotonic() + timeout_millis / 1000
        self._stopped = True
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if not self._drain(deadline=deadline):
            left = len(self._queue)
            self._queue.clear()
            if left:
                log.warning("trace export shut down with %d spans unsent (time out)", left)
                self._dropped_shutdown.inc(left)
        self.exporter.shutdown()
