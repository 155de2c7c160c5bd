"""W3C trace context (``traceparent``, ``tracestate``, ``baggage``) on every carrier meshkit uses.

RPC metadata and HTTP headers are string mappings; Kafka message headers are a
list of ``(str, bytes)`` pairs. These helpers inject the current OpenTelemetry
context into each kind and extract a context from it, through the globally
configured propagator (W3C trace context + baggage by default), so user
instrumentation and other OTel-instrumented peers read and write the same keys.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping, Sequence

from opentelemetry import propagate
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter

KafkaHeaders = list[tuple[str, bytes]]


def inject_mapping(carrier: MutableMapping[str, str], context: Context | None = None) -> None:
    """Write the current (or given) trace context into a string mapping (RPC or HTTP headers)."""
    propagate.inject(carrier, context=context)


def extract_mapping(carrier: Mapping[str, str]) -> Context:
    """The trace context carried by a string mapping (empty context when there is none;
    nothing of the current context)."""
    return propagate.extract(carrier, Context())


class _KafkaGetter(Getter[Sequence[tuple[str, bytes | str | None]]]):
    def get(self, carrier: Sequence[tuple[str, bytes | str | None]], key: str) -> list[str] | None:
        values = [_text(value) for name, value in carrier if name.lower() == key and value]
        return values or None

    def keys(self, carrier: Sequence[tuple[str, bytes | str | None]]) -> list[str]:
        return [name for name, _ in carrier]


def _text(value: bytes | str | None) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value or ""


_kafka_getter = _KafkaGetter()


def inject_kafka(headers: KafkaHeaders, context: Context | None = None) -> KafkaHeaders:
    """Append the current (or given) trace context to Kafka message headers; returns them.

    Existing propagation headers are replaced, so a re-published message carries
    the new producer's context and not a stale one.
    """
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    if not carrier:
        return headers
    names = {name.lower() for name in carrier}
    headers[:] = [(name, value) for name, value in headers if name.lower() not in names]
    headers.extend((name, value.encode()) for name, value in carrier.items())
    return headers


def extract_kafka(headers: Iterable[tuple[str, bytes | str | None]] | None) -> Context:
    """The trace context carried by Kafka message headers (as confluent-kafka returns
    them), and nothing of the current context."""
    return propagate.extract(list(headers or ()), Context(), getter=_kafka_getter)
