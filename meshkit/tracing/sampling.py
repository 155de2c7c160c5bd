"""Head sampling by ratio, with room for tail keeping of errors and slow calls.

:func:`make_sampler` builds a parent-based sampler: a trace's root decides by trace id
ratio (``MESHKIT_TRACES_SAMPLE``), every later span follows its parent, so a trace is kept
or skipped whole and every meshkit hop agrees.

Tail keeping (``tail=True``, the default): spans the ratio skips are still *recorded*
(``RECORD_ONLY``: timed, attributed, but not marked sampled on the wire), and the export
processor (:class:`meshkit.tracing.export.ExportQueue`) exports those that ended in error
or ran longer than the slow threshold, marked ``meshkit.kept``. The error path of a skipped
trace therefore reaches the collector from every hop that saw the error, without any
coordination between services. meshkit's own RPC spans of a skipped trace cost little
more than not recording them: they are kept in outline (context, parent, start time) and
built in full only when they end in error or slow (:mod:`meshkit.tracing.tailspan`);
``tail=False`` makes skipped spans non-recording.
"""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry.context import Context
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, SpanKind, get_current_span
from opentelemetry.util.types import Attributes

__all__ = ["MeshkitSampler", "RecordOnly", "TailBiasedRatio", "make_sampler"]


def _parent_trace_state(parent_context: Context | None):  # type: ignore[no-untyped-def]
    return get_current_span(parent_context).get_span_context().trace_state


class RecordOnly(Sampler):
    """Record the span (so it can be kept later) without sampling it."""

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: object = None,
    ) -> SamplingResult:
        return SamplingResult(Decision.RECORD_ONLY, None, _parent_trace_state(parent_context))

    def get_description(self) -> str:
        return "RecordOnly"


class TailBiasedRatio(Sampler):
    """Sample a ``ratio`` of root traces; record the rest without sampling them."""

    def __init__(self, ratio: float) -> None:
        self.ratio = ratio
        self._head = TraceIdRatioBased(ratio)

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: object = None,
    ) -> SamplingResult:
        result = self._head.should_sample(parent_context, trace_id, name, kind, attributes, links)
        if result.decision is Decision.DROP:
            return SamplingResult(Decision.RECORD_ONLY, None, _parent_trace_state(parent_context))
        return result

    def get_description(self) -> str:
        return f"TailBiasedRatio{{{self.ratio}}}"


class MeshkitSampler(ParentBased):
    """The sampler :func:`make_sampler` builds; ``ratio`` and ``tail`` say what it does, so
    meshkit's span recorder can decide for a span with a parent without calling it."""

    def __init__(self, ratio: float, tail: bool) -> None:
        self.ratio = ratio
        self.tail = tail
        not_sampled: Sampler = RecordOnly() if tail else ALWAYS_OFF
        super().__init__(
            TailBiasedRatio(ratio) if tail else TraceIdRatioBased(ratio),
            remote_parent_sampled=ALWAYS_ON,
            remote_parent_not_sampled=not_sampled,
            local_parent_sampled=ALWAYS_ON,
            local_parent_not_sampled=not_sampled,
        )


def make_sampler(ratio: float = 1.0, *, tail: bool = True) -> MeshkitSampler:
    """Parent-based sampling with ``ratio`` at the root; see the module doc for ``tail``."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"expected a sampling ratio between 0 and 1, found {ratio}")
    return MeshkitSampler(ratio, tail)
