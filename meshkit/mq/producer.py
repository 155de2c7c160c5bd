""":class:`Publisher`: an idempotent Kafka producer whose deliveries are awaited on asyncio.

confluent-kafka's ``Producer.produce`` only enqueues (it never blocks); delivery
reports arrive through ``poll()``, which a dedicated thread calls. Reports collected in
one ``poll()`` are handed to the event loop in one ``call_soon_threadsafe``, so the
loop is woken once per batch, not once per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from time import monotonic
from typing import Any, NamedTuple, cast

import structlog
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from opentelemetry.trace import Span
from prometheus_client import CollectorRegistry

from . import tracing
from .codec import Codec, RawCodec, codec_for_value
from .errors import ConfigError, PublishBufferFull, PublishError
from .metrics import ProducerMetrics
from .tracing import current_context, end_producer_span, recording, start_producer_span
from .url import bootstrap_servers

__all__ = ["Delivery", "Publisher"]


log = structlog.get_logger("meshkit.mq.producer")

#: message headers: a mapping or ``(name, value)`` pairs (names repeat in pairs); a value
#: is text (UTF-8), bytes (``bytearray``/``memoryview`` too) or ``None`` (a null header)
Headers = (
    Mapping[str, str | bytes | bytearray | memoryview | None]
    | Iterable[tuple[str, str | bytes | bytearray | memoryview | None]]
    | None
)

#: librdkafka settings meshkit uses unless the caller overrides them.
DEFAULT_CONFIG: dict[str, Any] = {
    "enable.idempotence": True,  # implies acks=all, bounded in-flight, no duplicates on retry
    "linger.ms": 5,
    "message.timeout.ms": 30_000,  # a delivery that cannot succeed fails within 30 s
    "queue.buffering.max.messages": 100_000,
    "queue.buffering.max.kbytes": 262_144,
}


class Delivery(NamedTuple):
    """Where the broker stored a published message.

    A named tuple rather than a frozen dataclass: one is made per delivery report, and
    a frozen dataclass costs twice as much to build.
    """

    topic: str
    partition: int
    offset: int


class _DeliveryFuture(asyncio.Future["Delivery"]):
    """The future of one publish, and its own delivery callback.

    librdkafka keeps one callable per message and calls it with the delivery report:
    the future itself is that callable (no closure and cells per message); it keeps
    the report and queues itself on its publisher's queue for the loop to resolve.
    """

    __slots__ = ("err", "msg", "reports", "span")

    reports: deque[_DeliveryFuture]
    span: Span | None
    err: KafkaError | None
    msg: Message

    def __call__(self, err: KafkaError | None, msg: Message) -> None:
        self.err = err
        self.msg = msg
        self.reports.append(self)


#: the loop serves delivery reports itself every 256 publishes (see ``_produce``)
_SELF_POLL_MASK = 255
_new_delivery = tuple.__new__  # Delivery(...) without the Python-level __new__ frame
_PURGED = frozenset({KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT})
_RAW = RawCodec()


def _key_bytes(key: Any) -> bytes | None:
    if key is None or isinstance(key, bytes):
        return key
    if isinstance(key, str):
        return key.encode()
    if isinstance(key, int) and not isinstance(key, bool):
        return str(key).encode()
    if isinstance(key, (bytearray, memoryview)):
        return bytes(key)
    raise TypeError(f"expected a str, bytes or int message key, found {type(key).__name__}")


def _header_list(headers: Headers) -> list[tuple[str, bytes | None]]:
    """``headers`` as librdkafka takes them; ``TypeError`` for a name that is not text
    or a value that is not text, bytes or ``None`` (``bytes(3)`` would be three NULs)."""
    if headers is None:
        return []
    items = headers.items() if isinstance(headers, Mapping) else headers
    out: list[tuple[str, bytes | None]] = []
    for name, value in items:
        if not isinstance(name, str):
            raise TypeError(f"expected a str header name, found {type(name).__name__}: {name!r}")
        if isinstance(value, str):
            out.append((name, value.encode()))
        elif value is None or type(value) is bytes:
            out.append((name, value))
        elif isinstance(value, (bytes, bytearray, memoryview)):
            out.append((name, bytes(value)))
        else:
            raise TypeError(
                f"expected a str, bytes or None value for header {name!r}, found "
                f"{type(value).__name__}: {value!r} (convert it, e.g. str(value))"
            )
    return out


class Publisher:
    """Publishes to Kafka with idempotence on, awaiting each delivery report.

    ``url``: ``kafka://host:port`` (default ``MESHKIT_MQ``); ``config``: librdkafka
    settings merged over :data:`DEFAULT_CONFIG` (``queue.buffering.max.messages`` bounds
    the buffer: a publish beyond it raises :class:`PublishBufferFull` at once).
    Start it with :meth:`start` (or implicitly on first publish); :meth:`close` flushes.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        config: Mapping[str, Any] | None = None,
        metrics_registry: CollectorRegistry | None = None,
        flush_timeout: float = 10.0,
    ) -> None:
        self.bootstrap = bootstrap_servers(url)
        self.config: dict[str, Any] = {
            **DEFAULT_CONFIG,
            **(config or {}),
            "bootstrap.servers": self.bootstrap,
        }
        if not self.config.get("enable.idempotence", True):
            log.warning("publisher idempotence disabled by configuration")
        self.flush_timeout = flush_timeout
        self.metrics = ProducerMetrics.get(metrics_registry)
        self.metrics.publishers.add(self)
        self._producer: Producer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._pending = 0
        self._idle = asyncio.Event()
        # Delivery reports: appended by whichever thread ran poll(), taken on the loop.
        self._reports: deque[_DeliveryFuture] = deque()
        self._resolve_scheduled = False
        self._produced = 0
        #: (topic, outcome) → deliveries reported, summed into /metrics at scrape time
        self.published_counts: dict[tuple[str, str], int] = {}
        self.metrics.published.adopt(self, self.published_counts)
        self._closed = False
        self._start_lock = threading.Lock()

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._producer is not None

    @property
    def pending(self) -> int:
        """Messages published and not yet acknowledged (or failed)."""
        return self._pending

    def start(self) -> None:
        """Create the producer and its poll thread (idempotent; needs a running loop)."""
        if self._closed:
            raise PublishError("the publisher is closed")
        with self._start_lock:
            if self._producer is not None:
                return
            self._loop = asyncio.get_running_loop()
            try:
                self._producer = Producer(self.config, logger=_RdkafkaLog())
            except KafkaException as exc:
                raise ConfigError(f"invalid producer configuration: {exc}") from exc
            self._thread = threading.Thread(
                target=self._poll_forever, name="meshkit-mq-producer", daemon=True
            )
            self._thread.start()

    async def close(self, timeout: float | None = None) -> int:
        """Flush (waiting up to ``timeout`` s), then stop; returns messages left undelivered.

        Publishes still waiting when the time is up fail with :class:`PublishError`.
        """
        if self._closed:
            return 0
        left = await self.flush(timeout)
        self._closed = True
        self._closing.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 5.0)
        await asyncio.sleep(0)  # let reports from the thread's last poll() resolve
        self._drain_reports()
        producer = self._producer
        self._producer = None  # the librdkafka handle goes with it (no reconnect attempts)
        if left and producer is not None:
            log.warning("publisher closed with undelivered messages", undelivered=left)
            # Purged messages get a delivery report now: their futures fail through
            # the usual path (as "closed before the broker acknowledged").
            with contextlib.suppress(KafkaException, NotImplementedError):
                producer.purge()
            for _ in range(20):  # purge queues the reports at once; serve them all
                with contextlib.suppress(KafkaException):
                    producer.poll(0)
                self._drain_reports()
                if not self._pending:
                    break
                await asyncio.sleep(0.05)
        return left

    async def flush(self, timeout: float | None = None) -> int:
        """Wait until every buffered message is acknowledged or failed, up to ``timeout`` s;
        returns how many are still waiting."""
        if self._producer is None:
            return 0
        timeout = self.flush_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while self._pending and time.monotonic() < deadline:
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), max(0.0, deadline - time.monotonic()))
        return self._pending

    # -- publishing ---------------------------------------------------------------------

    async def publish(
        self,
        topic: str,
        value: Any,
        *,
        key: str | bytes | int | None = None,
        headers: Headers = None,
        partition: int | None = None,
        codec: Codec | None = None,
    ) -> Delivery:
        """Publish ``value`` (encoded by ``codec``, or by its type: bytes raw, Thrift
        struct binary, else JSON) and wait for the broker's acknowledgement.

        Raises :class:`PublishBufferFull` (nothing enqueued) when the buffer is full and
        :class:`PublishError` when the broker does not take the message.
        """
        return await self.publish_nowait(
            topic, value, key=key, headers=headers, partition=partition, codec=codec
        )

    def publish_nowait(
        self,
        topic: str,
        value: Any,
        *,
        key: str | bytes | int | None = None,
        headers: Headers = None,
        partition: int | None = None,
        codec: Codec | None = None,
    ) -> asyncio.Future[Delivery]:
        """Enqueue and return a future for the delivery (for pipelining many publishes)."""
        if codec is None and type(value) is bytes:
            payload = value  # what the raw codec would hand back
        else:
            payload = (codec or codec_for_value(value)).encode(value)
        return self._produce(
            topic,
            payload,
            key if key is None or type(key) is bytes else _key_bytes(key),
            # None values go to librdkafka as null headers; the span code reads names only
            cast(list[tuple[str, bytes]], _header_list(headers)) if headers is not None else None,
            partition,
        )

    def produce_raw(
        self,
        topic: str,
        payload: bytes | None,
        *,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        partition: int | None = None,
    ) -> asyncio.Future[Delivery]:
        """Enqueue already-encoded bytes; the future resolves on the delivery report."""
        return self._produce(topic, payload, key, headers, partition)

    def _produce(
        self,
        topic: str,
        payload: bytes | None,
        key: bytes | None,
        headers: list[tuple[str, bytes]] | None,
        partition: int | None,
    ) -> asyncio.Future[Delivery]:
        producer = self._producer
        if producer is None:
            self.start()
            producer = self._producer
        assert producer is not None
        if self._closed:
            raise PublishError(f"cannot publish to {topic!r}: the publisher is closed")
        future = _DeliveryFuture(loop=self._loop)
        future.reports = self._reports
        # A span only when an SDK records or a context (span, baggage) is current.
        if current_context() or (
            tracing.recording_cached if monotonic() < tracing.recording_until else recording()
        ):
            if headers is None:
                headers = []
            span = future.span = start_producer_span(topic, key, headers)
        else:
            span = future.span = None
        try:
            # Positional arguments (topic, value, key, partition, on_delivery, -,
            # timestamp, headers): keyword parsing costs the binding about as much as
            # the produce itself. Partition -1: the partitioner picks.
            part = -1 if partition is None else partition
            if headers:
                producer.produce(
                    topic,
                    payload,
                    key,
                    part,
                    future,
                    None,
                    0,
                    cast(Any, headers),
                )
            else:
                producer.produce(topic, payload, key, part, future)
        except BufferError:
            end_producer_span(span, None, None, "buffer full")
            self.metrics.buffer_full.labels(topic).inc()
            raise PublishBufferFull(
                f"cannot publish to {topic!r}: the producer buffer is full "
                f"({len(producer)} messages waiting; queue.buffering.max.messages="
                f"{self.config.get('queue.buffering.max.messages')}, "
                f"queue.buffering.max.kbytes={self.config.get('queue.buffering.max.kbytes')}). "
                "The broker is slower than the publishers or unreachable; publish again "
                "later or shed load"
            ) from None
        except KafkaException as exc:
            end_producer_span(span, None, None, str(exc))
            raise PublishError(f"cannot publish to {topic!r}: {exc}") from exc
        self._pending += 1
        self._produced += 1
        if not self._produced & _SELF_POLL_MASK:
            # Serve delivery reports here now and then: while the loop publishes in a
            # tight loop, the poll thread would wait for the GIL on every callback.
            producer.poll(0)
            self._drain_reports()
        return future

    # -- delivery reports (poll thread → loop) --------------------------------------------

    def _poll_forever(self) -> None:
        producer = self._producer
        assert producer is not None and self._loop is not None
        loop = self._loop
        while True:
            closing = self._closing.is_set()
            producer.poll(0 if closing else 0.05)
            if self._reports and not self._resolve_scheduled:
                self._resolve_scheduled = True
                try:
                    loop.call_soon_threadsafe(self._drain_reports)
                except RuntimeError:  # the loop is closed: nobody is waiting any more
                    return
            if closing:
                return

    def _drain_reports(self) -> None:
        """Resolve the futures whose delivery reports arrived (on the loop)."""
        self._resolve_scheduled = False
        reports = self._reports
        n = len(reports)  # the poll thread may append more meanwhile: next time
        if not n:
            return
        self._pending -= n
        if self._pending == 0:
            self._idle.set()
        take = reports.popleft
        counts = self.published_counts
        ok_topic: str | None = None  # reports come in runs of one topic: count per run
        ok_run = 0
        for _ in range(n):
            future = take()
            msg = future.msg
            future.msg = None  # type: ignore[assignment]  # drop the report's Message
            topic = msg.topic() or "?"
            err = future.err
            if err is not None:
                counts[(topic, "error")] = counts.get((topic, "error"), 0) + 1
                end_producer_span(future.span, None, None, err.str())
                text = (
                    "the publisher closed before the broker acknowledged"
                    if err.code() in _PURGED
                    else f"broker did not take a message for {topic!r}: {err.str()}"
                )
                if not future.done():
                    future.set_exception(PublishError(text))
                continue
            if topic != ok_topic:
                if ok_run:
                    key = (ok_topic or "?", "ok")
                    counts[key] = counts.get(key, 0) + ok_run
                ok_topic, ok_run = topic, 0
            ok_run += 1
            partition, offset = msg.partition(), msg.offset()
            if future.span is not None:
                end_producer_span(future.span, partition, offset, None)
            try:  # noqa: SIM105 - a context manager per report costs more than try
                future.set_result(_new_delivery(Delivery, (topic, partition or 0, offset or 0)))
            except asyncio.InvalidStateError:
                pass  # cancelled by its caller: the message went out all the same
        if ok_run:
            key = (ok_topic or "?", "ok")
            counts[key] = counts.get(key, 0) + ok_run


class _RdkafkaLog:
    """librdkafka log lines through structlog (at most one line per message per 10 s)."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    def log(self, level: int, fmt: str, *args: Any) -> None:
        text = fmt % args if args else fmt
        now = time.monotonic()
        if now - self._last.get(text, -1e9) < 10.0:
            return
        self._last[text] = now
        if len(self._last) > 1000:
            self._last.clear()
        log.debug("librdkafka", message=text, level=level)
