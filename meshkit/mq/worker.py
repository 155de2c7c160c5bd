""":class:`Worker`: one Kafka consumer group member running handlers, at least once.

How it keeps its promises:

* **Never blocks the event loop.** Every call on the confluent-kafka ``Consumer`` runs
  on one dedicated thread (a single-thread executor), so the consumer is used from one
  thread only and the loop only awaits. Rebalance callbacks run on that thread inside
  ``consume()`` and wait for the loop through ``run_coroutine_threadsafe``.
* **At least once.** ``enable.auto.commit`` is off. The messages of one partition in one
  fetched batch form an :class:`~meshkit.mq.offsets.OffsetBatch` that counts down as
  they finish (handled, or moved to a retry topic or the DLQ and acknowledged by the
  broker); the commit point per partition is the end of the last batch finished with
  every earlier one (:class:`~meshkit.mq.offsets.PartitionState`): it never passes an
  unfinished message, and stays at most one batch behind the exact point. Committed
  every ``commit_interval`` seconds, on revoke and on stop.
* **Per-key order, bounded concurrency.** Messages wait in one queue per key (made
  only when a second message of the key arrives before the first finished); a key
  is handled by at most one of the ``concurrency`` runner tasks at a time, in fetch
  order, so messages with the same key are handled in order while different keys run
  concurrently, and a slow key holds up only itself. Keys take turns (one message,
  then the key goes to the back). Messages without a key have no order to keep. At
  most ``max_buffered`` messages are fetched and not finished; beyond that the assigned
  partitions are paused (the consumer keeps polling so it stays in the group) and
  resumed below half of it.
* **Cheap per message.** A batch fetched while nothing else is in flight is handled
  inline: one runner iterates it in fetch order (no queue entry or key bookkeeping per
  message; counts and offsets settled per run of one partition); when a handler
  suspends, a callback behind the runner's step marks its key busy and dispatches the
  rest of the batch as below. Otherwise a fetched batch is dispatched in one pass (the
  partition's batch, route and codec are looked up once per run of one partition, the
  tracing check once per batch) and runners take ready messages one after another
  without a loop hop while handlers do not suspend. The common case (context-free ``async def``
  handler, subscribed topic, no headers, no tracing SDK) runs inline in the runner
  task, one coroutine per message: the handler's, started inside its runner task so
  ``asyncio.current_task()``/``asyncio.timeout()`` in a handler see that task. Anything
  else, and every failure, goes through ``_handle_full`` (retries, retry topics, DLQ,
  spans, context). Counts and latency are plain numbers summed at scrape time.
* **Retries without stalling the partition.** See :class:`~meshkit.mq.RetryPolicy`. A
  message read from ``<topic>.retry.N`` before its time pauses that retry partition and
  seeks back to it; the partition resumes when the message is due.
* **Rebalance and stop.** On revoke, no new message of those partitions is fetched;
  the ones already fetched keep running for up to ``drain_timeout`` seconds, the rest
  are abandoned (the next owner gets them again); what finished is committed
  synchronously before the partitions go. :meth:`stop` does the same for all of them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from prometheus_client import CollectorRegistry

from . import headers as H
from .codec import RawCodec
from .context import MessageContext
from .errors import ConfigError, DeadLetter, DecodeError, HandlerCancelled, MqError
from .metrics import HANDLER_BUCKETS, ConsumerMetrics, HandlerStats, HandlerTable
from .offsets import OffsetBatch, PartitionState
from .producer import Publisher
from .retry import dlq_topic, retry_topic
from .subscription import Subscription
from .tracing import ConsumerSpan, recording
from .url import bootstrap_servers

__all__ = ["DEFAULT_CONSUMER_CONFIG", "Worker", "ensure_topics"]

log = structlog.get_logger("meshkit.mq.worker")

#: librdkafka consumer settings meshkit uses unless the caller overrides them.
DEFAULT_CONSUMER_CONFIG: dict[str, Any] = {
    "enable.auto.commit": False,
    "auto.offset.reset": "earliest",
    "enable.partition.eof": False,
    "session.timeout.ms": 10_000,
    "heartbeat.interval.ms": 1_000,
    "max.poll.interval.ms": 300_000,
    # librdkafka waits this long before fetching again once its local queue is over
    # queued.min.messages; its default (1000 ms) idles a consumer that empties the
    # queue faster than that (a broker may answer one fetch with 50k messages).
    "fetch.queue.backoff.ms": 10,
}

_TPKey = tuple[str, int]


def ensure_topics(
    bootstrap: str,
    topics: Mapping[str, int],
    *,
    replication: int = 1,
    timeout: float = 10.0,
    config: Mapping[str, Any] | None = None,
) -> list[str]:
    """Create the topics of ``{name: partitions}`` that do not exist (blocking).

    Returns the names created. A topic created concurrently by someone else is fine.
    """
    admin = AdminClient({"bootstrap.servers": bootstrap, **(config or {})})
    existing = set(admin.list_topics(timeout=timeout).topics)
    missing = [
        NewTopic(name, num_partitions=n, replication_factor=replication)
        for name, n in topics.items()
        if name not in existing
    ]
    if not missing:
        return []
    created = []
    for name, future in admin.create_topics(missing, operation_timeout=timeout).items():
        try:
            future.result(timeout)
            created.append(name)
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            raise MqError(f"could not create topic {name!r}: {exc}") from exc
    return created


def _topic_partitions(bootstrap: str, topic: str, timeout: float = 10.0) -> int | None:
    admin = AdminClient({"bootstrap.servers": bootstrap}, logger=_quiet_logger)
    meta = admin.list_topics(topic=topic, timeout=timeout).topics.get(topic)
    if meta is None or meta.error is not None or not meta.partitions:
        return None
    return len(meta.partitions)


#: a message ready to run: its key (``None`` for none), the message, its offset batch
_Entry = tuple[bytes | None, Message, OffsetBatch]


class _Route:
    """What the runners need about one topic read, looked up once per fetched batch."""

    __slots__ = ("buckets", "decode", "fast", "handler", "level", "stats", "sub")

    def __init__(self, sub: Subscription, level: int, stats: HandlerStats) -> None:
        self.sub = sub
        self.level = level
        self.stats = stats
        self.buckets = stats.buckets
        self.handler = sub.handler
        #: ``None`` for the raw codec (inlined by the runners)
        self.decode = None if type(sub.codec) is RawCodec else cast(Any, sub.codec).decode
        #: the first attempt may take the runners' short path (see ``Worker._run``)
        self.fast = level == 0 and sub.is_async and not sub.wants_context


class _Runnable:
    """Work for the runners: at most one message per key is ready at a time.

    The worker's dispatch and runners use these containers directly (the per-message
    steps are inlined there); this class only holds them.
    """

    __slots__ = ("by_key", "idle", "ready")

    def __init__(self) -> None:
        #: key → messages queued behind the one ready or being handled (``None``: nothing
        #: queued, the common case, so no deque is made); a key is present exactly while
        #: one of its messages is ready or being handled
        self.by_key: dict[bytes, deque[_Entry] | None] = {}
        #: messages whose turn is coming (one per key, unkeyed ones freely), in order
        self.ready: deque[_Entry] = deque()
        #: runners waiting for work
        self.idle: deque[asyncio.Future[None]] = deque()

    def wake(self) -> None:
        """Wake as many idle runners as there are ready messages."""
        idle, n = self.idle, len(self.ready)
        while idle and n:
            waiter = idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                n -= 1


class _Inline:
    """A fetched batch a runner handles in one pass, in fetch order (see ``Worker._run_inline``).

    Started only while nothing else is in flight, so no key can be busy and no earlier
    batch of any partition is unfinished. ``it`` is shared: when the runner's handler
    suspends, a watch scheduled behind its step takes what the iterator has not handed out
    yet and dispatches it the usual way, and the runner finishes its one message as
    any runner does.
    """

    __slots__ = ("demoted", "done", "handed_off", "it", "key", "messages", "rest_count")

    def __init__(self, messages: list[Message]) -> None:
        self.messages = messages
        self.it = iter(messages)
        self.done = False
        #: the rest went to the usual dispatch while a handler was suspended
        self.demoted = False
        #: how many messages that was, how many the runner no longer counts as in flight,
        #: and the key of the one it was handling
        self.rest_count = 0
        self.handed_off = 0
        self.key: bytes | None = None


class Worker:
    """A consumer group member that runs the handlers of ``subscriptions``.

    ``group``: the consumer group (one Kafka consumer per worker); ``url``:
    ``kafka://host:port`` (default ``MESHKIT_MQ``); ``concurrency``: handlers running at
    once (each on a different key); ``max_buffered``: messages fetched and not finished
    before partitions are paused; ``batch_size``: messages per ``consume()`` (a commit
    trails the exact point by at most one such batch of a partition while a message of
    it runs); ``drain_timeout``: seconds to let fetched messages finish on revoke and
    stop; ``config``: librdkafka settings over :data:`DEFAULT_CONSUMER_CONFIG`;
    ``publisher``: used for retry topics and the DLQ (one is created when omitted);
    ``create_topics``: create missing topics at start (the topic with ``partitions``
    partitions, its retry topics and DLQ with as many as the topic has).
    """

    def __init__(
        self,
        group: str,
        subscriptions: Sequence[Subscription],
        *,
        url: str | None = None,
        concurrency: int = 16,
        max_buffered: int = 1000,
        batch_size: int = 500,
        drain_timeout: float = 10.0,
        commit_interval: float = 1.0,
        poll_timeout: float = 0.1,
        config: Mapping[str, Any] | None = None,
        publisher: Publisher | None = None,
        create_topics: bool = True,
        partitions: int = 3,
        metrics_registry: CollectorRegistry | None = None,
    ) -> None:
        if not group:
            raise ConfigError("expected a consumer group name, found an empty one")
        if not subscriptions:
            raise ConfigError(f"expected at least one subscription for group {group!r}")
        if concurrency < 1 or max_buffered < 1 or batch_size < 1:
            raise ConfigError(
                "expected concurrency, max_buffered and batch_size ≥ 1, found "
                f"{concurrency}, {max_buffered}, {batch_size}"
            )
        self.group = group
        self.bootstrap = bootstrap_servers(url)
        self.url = url
        self.subscriptions = {s.topic: s for s in subscriptions}
        if len(self.subscriptions) != len(subscriptions):
            raise ConfigError(f"expected one handler per topic in group {group!r}")
        # Every topic read → (subscription, retry level).
        self._routes: dict[str, tuple[Subscription, int]] = {}
        for sub in subscriptions:
            for level, topic in enumerate(sub.topics):
                if topic in self._routes:
                    raise ConfigError(f"topic {topic!r} is subscribed twice in group {group!r}")
                self._routes[topic] = (sub, level)
        self.concurrency = concurrency
        self.max_buffered = max_buffered
        self.batch_size = batch_size
        self.drain_timeout = drain_timeout
        self.commit_interval = commit_interval
        self.poll_timeout = poll_timeout
        self.config: dict[str, Any] = {
            **DEFAULT_CONSUMER_CONFIG,
            **(config or {}),
            "bootstrap.servers": self.bootstrap,
            "group.id": group,
        }
        if self.config.get("enable.auto.commit") not in (False, "false"):
            raise ConfigError("a meshkit worker commits itself: enable.auto.commit must be false")
        #: incremental rebalances: an assignment adds to the partitions kept
        self._cooperative = "cooperative" in str(
            self.config.get("partition.assignment.strategy", "")
        )
        self.create_topics = create_topics
        self.partitions = partitions
        self._publisher = publisher
        self._owns_publisher = publisher is None
        self.metrics = ConsumerMetrics.get(metrics_registry)
        self.metrics.track_in_flight(self)
        #: handled/failed counts and latency per (group, topic), summed at scrape time
        self.handler_stats: HandlerTable = {}
        #: subscribed topic → its entry in handler_stats (shown as 0 before any message)
        self._stats: dict[str, HandlerStats] = {
            sub.topic: self.handler_stats.setdefault((group, sub.topic), HandlerStats())
            for sub in subscriptions
        }
        self.metrics.handlers.adopt(self, self.handler_stats)
        self._route_info = {
            topic: _Route(sub, level, self._stats[sub.topic])
            for topic, (sub, level) in self._routes.items()
        }

        self._loop: asyncio.AbstractEventLoop | None = None
        self._io: concurrent.futures.ThreadPoolExecutor | None = None
        self._consumer: Consumer | None = None
        self._states: dict[_TPKey, PartitionState] = {}
        self._assigned: set[_TPKey] = set()
        self._held: dict[_TPKey, float] = {}  # retry partitions paused until (loop time)
        self._paused_all = False
        self._work = _Runnable()
        self._inline: _Inline | None = None  # a batch waiting for a runner
        self._runners: list[asyncio.Task[None]] = []
        self.in_flight = 0  # read by the in-flight gauge at scrape time
        self._capacity = asyncio.Event()
        self._wants_capacity = False  # the consume loop waits for _capacity
        self._progress = asyncio.Event()  # set each time a batch of a partition finishes
        self._background: set[asyncio.Future[Any]] = set()
        self._stopping = False
        self._consume_task: asyncio.Task[None] | None = None
        self._commit_task: asyncio.Task[None] | None = None
        self._started = False
        self._start_lock = asyncio.Lock()
        self.last_error: str | None = None

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def topics(self) -> list[str]:
        """Every topic the worker reads (the subscribed ones and their retry topics)."""
        return list(self._routes)

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        assert self._loop is not None and self._io is not None
        if kwargs:
            return await self._loop.run_in_executor(self._io, lambda: fn(*args, **kwargs))
        return await self._loop.run_in_executor(self._io, fn, *args)

    async def start(self) -> None:
        """Create missing topics, join the group and start handling messages.

        Raises :class:`MqError` when the broker cannot be reached to create the topics
        (nothing is left running: ``start()`` may be called again later).
        """
        async with self._start_lock:
            if self._started:
                return
            try:
                await self._connect()
            except BaseException as exc:
                await self._undo_start()
                if isinstance(exc, KafkaException):
                    raise MqError(
                        f"worker {self.group!r} could not start: the Kafka broker at "
                        f"{self.bootstrap} did not answer ({exc}); is MESHKIT_MQ right "
                        "and the broker up?"
                    ) from exc
                raise
            self._started = True
        self._runners = [self._start_runner() for _ in range(self.concurrency)]
        self._consume_task = asyncio.create_task(self._consume_loop())
        self._commit_task = asyncio.create_task(self._commit_loop())
        log.info(
            "worker started",
            group=self.group,
            topics=self.topics,
            concurrency=self.concurrency,
            max_buffered=self.max_buffered,
        )

    async def _connect(self) -> None:
        """The part of :meth:`start` that may fail: topics, publisher, consumer."""
        self._loop = asyncio.get_running_loop()
        self._io = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f"meshkit-mq-{self.group}"
        )
        if self.create_topics:
            await self._call(self._ensure_topics)
        if self._publisher is None:
            self._publisher = Publisher(self.url)
        self._publisher.start()
        try:
            self._consumer = await self._call(Consumer, self.config, logger=_quiet_logger)
        except KafkaException as exc:
            raise ConfigError(f"invalid consumer configuration for {self.group!r}: {exc}") from exc
        await self._call(
            self._consumer.subscribe,
            self.topics,
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )

    async def _undo_start(self) -> None:
        """A failed :meth:`start`: close what it opened (the consumer, an own publisher,
        the io thread) so that nothing runs and a later ``start()`` begins afresh."""
        consumer, self._consumer = self._consumer, None
        if consumer is not None and self._io is not None:
            with contextlib.suppress(Exception):
                await self._call(consumer.close)
        if self._owns_publisher and self._publisher is not None:
            publisher, self._publisher = self._publisher, None
            with contextlib.suppress(Exception):
                await publisher.close(timeout=1.0)
        io, self._io = self._io, None
        if io is not None:  # idle by now: its thread ends at once
            await asyncio.to_thread(io.shutdown, True)

    def _start_runner(self) -> asyncio.Task[None]:
        task = asyncio.create_task(self._run())
        task.add_done_callback(self._runner_ended)
        return task

    def _runner_ended(self, task: asyncio.Task[None]) -> None:
        """A runner task ended. The next message of its last key, made ready on the way
        out, goes to an idle runner; outside :meth:`stop` a runner can only have died of
        a bug: logged and replaced, so the worker keeps its concurrency."""
        self._work.wake()
        if self._stopping:
            return
        error = "cancelled" if task.cancelled() else repr(task.exception())
        self.last_error = f"a runner ended: {error}"
        log.error("runner ended unexpectedly, starting another", group=self.group, error=error)
        if task in self._runners:
            self._runners[self._runners.index(task)] = self._start_runner()

    def _ensure_topics(self) -> None:
        wanted: dict[str, int] = {}
        for sub in self.subscriptions.values():
            n = _topic_partitions(self.bootstrap, sub.topic) or self.partitions
            wanted[sub.topic] = n
            for topic in sub.retry.retry_topics(sub.topic):
                wanted[topic] = n
            if sub.retry.dead_letter:
                wanted[sub.dlq] = n
        created = ensure_topics(self.bootstrap, wanted, config={"logger": _quiet_logger})
        if created:
            log.info("topics created", group=self.group, topics=created)

    async def stop(self, timeout: float | None = None) -> bool:
        """Stop fetching, let fetched messages finish (up to ``timeout`` s, default
        ``drain_timeout``), commit what finished and leave the group.

        Returns ``True`` when every fetched message finished in time.
        """
        if not self._started or self._stopping:
            return True
        self._stopping = True
        timeout = self.drain_timeout if timeout is None else timeout
        if self._consume_task is not None:
            await self._consume_task
        if self._commit_task is not None:
            self._commit_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._commit_task
        states = list(self._states.values())
        self._states.clear()
        finished = await self._drain(states, timeout)
        offsets = self._commit_offsets(states)
        if offsets and self._consumer is not None:
            await self._call(self._commit_sync, offsets)
        for runner in self._runners:
            runner.cancel()
        await asyncio.gather(*self._runners, return_exceptions=True)
        if self._consumer is not None:
            await self._call(self._consumer.close)
        if self._io is not None:
            self._io.shutdown(wait=False)
        if self._owns_publisher and self._publisher is not None:
            await self._publisher.close()
        for key in list(self._assigned):
            self._forget_lag(key)
        log.info("worker stopped", group=self.group, finished=finished, abandoned=self.in_flight)
        return finished

    async def _drain(self, states: Iterable[PartitionState], timeout: float) -> bool:
        """Wait until ``states`` have nothing in flight or ``timeout`` passes; then abandon."""
        states = list(states)
        deadline = time.monotonic() + timeout
        while any(s.batches for s in states) and time.monotonic() < deadline:
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), deadline - time.monotonic())
        finished = not any(s.batches for s in states)
        for s in states:
            s.revoke()
        return finished

    def info(self) -> dict[str, Any]:
        """What ``/info`` shows about this worker."""
        return {
            "group": self.group,
            "topics": self.topics,
            "assigned": sorted(f"{t}[{p}]" for t, p in self._assigned),
            "in_flight": self.in_flight,
            "paused": self._paused_all,
            "held_retry_partitions": sorted(f"{t}[{p}]" for t, p in self._held),
            "last_error": self.last_error,
        }

    # -- fetching (loop side) -------------------------------------------------------------

    async def _consume_loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        #: the next batch, asked for before the last one was handed out (there was room)
        pending: asyncio.Future[list[Message]] | None = None
        try:
            while not self._stopping:
                try:
                    if pending is not None:
                        fetching, pending = pending, None  # a failed fetch is not awaited twice
                        messages = await fetching
                    else:
                        room = self.max_buffered - self.in_flight
                        if room <= 0:
                            if not self._paused_all:
                                await self._call(self._pause_all)
                            self._capacity.clear()
                            self._wants_capacity = True
                            with contextlib.suppress(TimeoutError):
                                await asyncio.wait_for(self._capacity.wait(), 0.5)
                            self._wants_capacity = False
                            # Keep polling while paused: group membership and rebalances need it.
                            messages = await self._call(consumer.consume, self.batch_size, 0)
                        else:
                            if self._paused_all:
                                await self._call(self._resume_all)
                            messages = await self._call(
                                consumer.consume, min(room, self.batch_size), self.poll_timeout
                            )
                    if messages:
                        # Ask for the next batch now if it fits: the consumer thread fetches
                        # it while the runners handle this one.
                        room = self.max_buffered - self.in_flight - len(messages)
                        if room > 0 and not self._paused_all and not self._stopping:
                            pending = self._prefetch(min(room, self.batch_size))
                        if self._inline is not None:
                            self._unstart_inline()
                        if not self.in_flight and not recording():
                            self._start_inline(messages)
                        else:
                            self._dispatch(messages)
                        # Let the runners take the batch before anything else of this loop.
                        await asyncio.sleep(0)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # keep consuming: a broker hiccup must not kill it
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    log.warning("consume failed", group=self.group, error=self.last_error)
                    await asyncio.sleep(0.5)
        finally:
            if pending is not None:  # stopping: never handed out, so never committed
                with contextlib.suppress(Exception):
                    await pending

    def _prefetch(self, n: int) -> asyncio.Future[list[Message]]:
        assert self._loop is not None and self._io is not None and self._consumer is not None
        return self._loop.run_in_executor(self._io, self._consumer.consume, n, self.poll_timeout)

    def _dispatch(self, messages: list[Message]) -> None:
        """Hand a fetched batch to the runners: one :class:`OffsetBatch` per partition in
        it, each message queued behind its key's or made ready."""
        held_now: list[tuple[Message, float]] = []
        now_ms = 0.0
        opened: dict[_TPKey, OffsetBatch | None] = {}
        fast = not recording()  # rechecked per batch: a tracing SDK installed later counts
        work = self._work
        by_key, ready_append = work.by_key, work.ready.append
        last_topic: str | None = None
        last_partition: int | None = None
        batch: OffsetBatch | None = None
        retry = False
        for msg in messages:
            if msg.error() is not None:
                self._consumer_error(msg)
                continue
            topic, partition = msg.topic(), msg.partition()
            # A fetch brings runs of one partition: look the batch up only when it changes.
            if partition != last_partition or topic != last_topic:
                tp = (topic, partition)
                try:
                    batch = opened[tp]  # type: ignore[index]
                except KeyError:
                    batch = opened[tp] = self._open_batch(tp, fast)  # type: ignore[index,arg-type]
                last_topic, last_partition = topic, partition
                retry = batch is not None and batch.route.level > 0
            if batch is None:
                continue  # not ours, or held for a retry not yet due
            if retry:
                if not now_ms:
                    now_ms = time.time() * 1000
                due = _not_before(msg)
                if due is not None and due > now_ms:
                    # Held at once: no later message of the partition is handed out now
                    # (they are read again after the seek).
                    tp = (topic, partition)
                    self._held[tp] = due  # type: ignore[index]
                    self._close_held_batch(batch)
                    opened[tp] = batch = None  # type: ignore[index]
                    held_now.append((msg, due))
                    continue
            batch.left += 1
            batch.last = msg
            key = msg.key()
            if key is not None:
                if key in by_key:  # the key is ready or being handled: wait behind it
                    queue = by_key[key]
                    if queue is None:
                        by_key[key] = deque(((key, msg, batch),))
                    else:
                        queue.append((key, msg, batch))
                    continue
                by_key[key] = None
            ready_append((key, msg, batch))
        added = 0
        for batch in opened.values():
            if batch is None:
                continue
            if batch.left:
                batch.end = batch.last.offset() + 1
                batch.last = None
                added += batch.left
            else:  # opened, then its only messages were held: it is the newest one
                batch.state.batches.pop()
        # Runners only run after this returns, so counting once per batch is exact.
        self.in_flight += added
        work.wake()
        if held_now:
            self._spawn(self._hold(held_now))

    def _close_held_batch(self, batch: OffsetBatch) -> None:
        """Close the batch of a retry partition whose next message in this fetch is held
        (not due): the messages before it are its whole batch, so it ends at the held
        one and they count as in flight now (runners run only after ``_dispatch``
        returns, so this is exact); an empty one (the held message came first) is
        dropped: it is the partition's newest, opened in this dispatch."""
        if batch.left:
            batch.end = batch.last.offset() + 1
            batch.last = None
            self.in_flight += batch.left
        else:
            popped = batch.state.batches.pop()
            assert popped is batch

    def _start_inline(self, messages: list[Message]) -> None:
        """Hand a whole fetched batch to one runner (nothing else is in flight)."""
        self._inline = _Inline(messages)
        self.in_flight += len(messages)
        idle = self._work.idle
        while idle:  # else a runner already woken takes it before the consume loop resumes
            waiter = idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break

    def _unstart_inline(self) -> None:
        """A batch handed to the runners inline that none has taken yet goes the usual
        way (before any later batch, so batches of a partition stay in fetch order)."""
        pending, self._inline = self._inline, None
        if pending is not None:
            self.in_flight -= len(pending.messages)
            self._dispatch(pending.messages)

    async def _run_inline(self, inline: _Inline) -> None:
        """Handle a fetched batch in this runner, message after message, in fetch order.

        Nothing else is in flight when it starts, so no key is busy and no earlier batch
        of any partition is unfinished. The common message (no headers, the handler
        returns without failing) costs a few method calls, the handler's coroutine and
        one clock read: latency is measured from the previous message's end, so it
        includes the runner's own step for the message. Counts, the latency sum and
        offsets are settled once per run of one partition, from the iterator's position
        (a run's messages minus those that took another path). Anything else goes
        through :meth:`_handle_full` here, in order. A partition this path does not take
        (a retry topic, not assigned, held) and everything after it go to the usual
        dispatch. When a handler suspends, a watch (a callback scheduled behind this
        step) counts what finished, marks its key busy and dispatches the rest the usual
        way, so other keys go on while this runner finishes its message like any runner.
        """
        assert self._loop is not None
        routes, states, assigned, held = self._route_info, self._states, self._assigned, self._held
        clock = time.perf_counter
        bounds = HANDLER_BUCKETS
        first_bound = bounds[0]
        messages = inline.messages
        n = len(messages)
        it: Any = inline.it
        remaining = it.__length_hint__  # a list iterator: how many it has not handed out
        topic: str | None = None
        partition: int | None = None
        handler: Any = None
        decode: Any = None
        buckets: list[int] = []
        rest: list[Message] = []
        # The run of one partition being handled (read by settle() and watch()).
        batch: OffsetBatch | None = None
        route: _Route | None = None
        run_start = 0  # index of its first message
        others = 0  # its messages finished another way (full path, consumer errors)
        slow = 0  # its handled messages slower than the first bucket (counted already)
        lost = 0  # its messages given up (partition revoked): the batch stays open
        gaps = 0.0  # its time spent on the full path (observed there)
        run_t0 = prev = clock()  # prev: when the last message finished

        def taken() -> int:
            """Messages this runner took from the batch so far."""
            return n - remaining() - inline.rest_count

        def settle(in_hand: int, unfinished: int = 0) -> None:
            """Close the current run. ``in_hand``: the last message taken is not counted
            in it (1), either because it starts the next run or an error (a partition
            boundary: ``unfinished`` 0), or because its handler did not finish (an
            exception out of the step: ``unfinished`` 1, which keeps the batch open)."""
            nonlocal batch
            assert batch is not None and route is not None
            pos = taken() - in_hand
            processed = pos - run_start - others
            end = cast(int, messages[pos - 1].offset()) + 1 if pos > run_start else batch.end
            self._settle(
                route,
                batch,
                end,
                processed,
                processed - slow,
                prev - run_t0 - gaps,
                lost + unfinished,
            )
            batch = None

        def watch() -> None:
            # Right behind this step: if it ended inside a handler, hand the rest over.
            nonlocal run_start, others, slow, gaps, run_t0
            if inline.done:
                return
            if batch is not None:  # what finished before the handler suspended counts now
                assert route is not None
                pos = taken() - 1
                processed = pos - run_start - others
                stats = route.stats
                stats.processed += processed
                stats.buckets[0] += processed - slow
                stats.total += prev - run_t0 - gaps
                run_start, others, slow, gaps, run_t0 = pos, 0, 0, 0.0, prev
            self._demote_inline(inline)

        async def full_path(msg: Message, error: Exception | None) -> None:
            """A message of the run that takes the full path (headers, poison, failure),
            handled here in order; its time counts as a gap in the run's latency sum."""
            nonlocal lost, others, gaps, prev
            assert batch is not None
            if not await self._handle_full(msg, batch.state, error):
                lost += 1
            others += 1
            now = clock()
            gaps += now - prev
            prev = now

        self._loop.call_soon(watch)
        finished = False
        try:
            for msg in it:
                if msg.error() is not None:
                    if batch is not None:
                        settle(1)
                    partition = None  # the next message starts a run
                    self._consumer_error(msg)
                    continue
                if msg.partition() != partition or msg.topic() != topic:
                    if batch is not None:
                        settle(1)
                    topic, partition = msg.topic(), msg.partition()
                    tp = (topic, partition)
                    route = routes.get(topic)  # type: ignore[arg-type]
                    if route is None or not route.fast or tp in held or tp not in assigned:
                        rest = [msg, *it]
                        break
                    state = states.get(tp)  # type: ignore[arg-type]
                    if state is None:
                        state = states[tp] = PartitionState(*tp)  # type: ignore[arg-type]
                    batch = state.open(route, True)
                    batch.left = 1  # never completes while its run is being handled
                    handler, decode, buckets = route.handler, route.decode, route.buckets
                    run_start, others, slow, lost, gaps, run_t0 = taken() - 1, 0, 0, 0, 0.0, prev
                if msg.headers():
                    await full_path(msg, None)
                    continue
                value = msg.value()
                if decode is not None:
                    try:
                        value = decode(value)
                    except Exception:  # poison: the full path dead-letters it
                        await full_path(msg, None)
                        continue
                elif value is None:
                    value = b""  # RawCodec.decode
                try:
                    await handler(value)
                except BaseException as caught:
                    if (exc := _handler_failure(caught)) is None:
                        raise
                    now = clock()
                    stats = route.stats  # type: ignore[union-attr]
                    stats.observe(now - prev)
                    stats.failed += 1
                    await full_path(msg, exc)
                    continue
                now = clock()
                if now - prev > first_bound:
                    slow += 1
                    buckets[bisect_left(bounds, now - prev)] += 1
                prev = now
            finished = True
        finally:
            inline.done = True
            if batch is not None:
                if finished:
                    settle(0)
                else:  # an exception out of a handler's step (cancelled): not done
                    settle(1, 1)
            in_flight = self.in_flight - (n - inline.handed_off)
            self.in_flight = in_flight
            if inline.demoted:
                key = inline.key
                if key is not None:  # marked busy by _demote_inline: release it
                    by_key = self._work.by_key
                    queue = by_key[key]
                    if queue:
                        self._work.ready.append(queue.popleft())
                        self._work.wake()
                    else:
                        del by_key[key]
            if self._wants_capacity and in_flight <= self.max_buffered // 2:
                self._capacity.set()
        if rest:
            self._dispatch(rest)

    def _settle(
        self,
        route: _Route,
        batch: OffsetBatch,
        end: int,
        processed: int,
        first: int,
        total: float,
        lost: int,
    ) -> None:
        """The end of an inline run of one partition: counts, latency sum, offsets."""
        stats = route.stats
        stats.processed += processed
        stats.buckets[0] += first
        stats.total += total
        batch.end = end
        batch.left = lost  # a message given up (partition revoked) keeps the batch open
        if not lost:
            batch.state.completed()
            self._progress.set()

    def _demote_inline(self, inline: _Inline) -> None:
        """The runner of ``inline`` is suspended in a handler: its key is marked busy and
        the messages not handed out yet go to the usual dispatch (behind the runner's
        batch, so the commit point still waits for its message)."""
        rest = list(inline.it)
        messages = inline.messages
        current = messages[len(messages) - len(rest) - 1]  # the runner's message
        inline.demoted = True
        key = current.key()
        inline.key = key
        if key is not None:
            self._work.by_key[key] = None
        inline.rest_count = len(rest)
        inline.handed_off = len(messages) - 1  # all but the runner's message, done or not
        self.in_flight -= len(messages) - 1
        if rest:
            self._dispatch(rest)

    def _open_batch(self, tp: _TPKey, fast: bool) -> OffsetBatch | None:
        """The batch for ``tp``'s messages in this fetch, or ``None`` to skip them."""
        if tp in self._held:
            return None  # waits for a retry that is not due: read again after the seek
        if tp not in self._assigned:
            return None  # fetched just before a revoke; the new owner reads it again
        route = self._route_info.get(tp[0])
        if route is None:
            return None
        state = self._states.get(tp)
        if state is None:
            state = self._states[tp] = PartitionState(*tp)
        return state.open(route, fast and route.fast)

    def _consumer_error(self, msg: Message) -> None:
        err = msg.error()
        assert err is not None
        if err.code() != KafkaError._PARTITION_EOF:
            self.last_error = err.str()
            log.warning("consumer error", group=self.group, error=err.str())

    async def _hold(self, held: list[tuple[Message, float]]) -> None:
        """Pause retry partitions whose next message is not due and seek back to it."""
        assert self._loop is not None
        tps = [TopicPartition(*_where(m)) for m, _ in held]

        def pause_and_seek() -> None:
            assert self._consumer is not None
            live = [tp for tp in tps if (tp.topic, tp.partition) in self._assigned]
            if not live:
                return
            self._consumer.pause(live)
            for tp in live:
                try:
                    self._consumer.seek(tp)
                except KafkaException as exc:  # revoked in between: the new owner reads it
                    log.debug("seek failed", topic=tp.topic, partition=tp.partition, error=str(exc))

        await self._call(pause_and_seek)
        now_ms = time.time() * 1000
        for msg, due in held:
            topic, partition, _ = _where(msg)
            key = (topic, partition)
            self._loop.call_later(max(0.0, (due - now_ms) / 1000), self._release, key, due)

    def _release(self, key: _TPKey, due: float) -> None:
        if self._held.get(key) != due or self._stopping:
            return
        del self._held[key]
        if self._paused_all:
            return  # resumed with the others when there is room

        def resume() -> None:
            if key in self._assigned and self._consumer is not None and not self._paused_all:
                self._consumer.resume([TopicPartition(*key)])

        self._spawn(self._call(resume))

    def _spawn(self, aw: Any) -> None:
        task = asyncio.ensure_future(aw)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- io-thread helpers -----------------------------------------------------------------

    def _pause_all(self) -> None:
        assert self._consumer is not None
        tps = [TopicPartition(t, p) for t, p in self._assigned]
        if tps:
            self._consumer.pause(tps)
        self._paused_all = True

    def _resume_all(self) -> None:
        assert self._consumer is not None
        tps = [TopicPartition(t, p) for t, p in self._assigned if (t, p) not in self._held]
        if tps:
            self._consumer.resume(tps)
        self._paused_all = False

    def _commit_sync(self, offsets: list[TopicPartition]) -> None:
        assert self._consumer is not None
        try:
            result = self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            self.last_error = f"commit failed: {exc}"
            log.warning("commit failed", group=self.group, error=str(exc))
            return
        for tp in result or offsets:
            if tp.error is not None:
                log.warning(
                    "commit failed", group=self.group, topic=tp.topic, partition=tp.partition,
                    error=str(tp.error),
                )  # fmt: skip
                continue
            state = self._states.get((tp.topic, tp.partition))
            if state is not None and (state.committed is None or tp.offset > state.committed):
                state.committed = tp.offset

    # -- rebalance callbacks (io thread, inside consume()) -----------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = {(tp.topic, tp.partition) for tp in partitions}
        self._assigned |= keys
        if self._paused_all and partitions:
            self._assign_paused(consumer, partitions)
        for key in list(self._held):
            if key not in self._assigned:
                del self._held[key]
        self.metrics.rebalances.labels(self.group, "assign").inc()
        committed: dict[_TPKey, int] = {}
        try:
            for tp in consumer.committed(partitions, timeout=5.0):
                if tp.offset >= 0:
                    committed[(tp.topic, tp.partition)] = tp.offset
        except KafkaException as exc:
            log.debug("reading committed offsets failed", group=self.group, error=str(exc))
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._assigned_on_loop, keys, committed)
        log.info("partitions assigned", group=self.group, partitions=_names(partitions))

    def _assign_paused(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Assign ``partitions`` paused: the worker's buffer is full (``_paused_all``).

        An eager rebalance revoked (and resumed) everything before, but an incremental
        one (cooperative-sticky) keeps the other partitions paused, so the new ones must
        be paused as well for :meth:`_resume_all` to bring them all back when there is
        room. The assignment is made here (the client does not repeat it) so that the
        pause applies before anything of them is fetched.
        """
        if self._cooperative:
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)
        consumer.pause(partitions)

    def _assigned_on_loop(self, keys: set[_TPKey], committed: dict[_TPKey, int]) -> None:
        for key in keys:
            if key not in self._states and key in self._assigned:
                self._states[key] = PartitionState(*key, committed=committed.get(key))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._revoke(consumer, partitions, commit=True)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._revoke(consumer, partitions, commit=False)

    def _revoke(self, consumer: Consumer, partitions: list[TopicPartition], commit: bool) -> None:
        keys = {(tp.topic, tp.partition) for tp in partitions}
        self._assigned -= keys
        for key in keys:
            self._held.pop(key, None)
        # librdkafka keeps an application pause across assignments: a partition paused
        # now (full buffer, a retry not yet due) would come back paused and never flow.
        try:
            consumer.resume(partitions)
        except KafkaException as exc:
            log.debug("resume on revoke failed", group=self.group, error=str(exc))
        self.metrics.rebalances.labels(self.group, "revoke" if commit else "lost").inc()
        assert self._loop is not None
        timeout = 0.0 if self._stopping else self.drain_timeout
        try:
            future = asyncio.run_coroutine_threadsafe(
                self._release_partitions(keys, timeout), self._loop
            )
            offsets = future.result(timeout + 5.0)
        except (concurrent.futures.TimeoutError, RuntimeError) as exc:
            log.warning("revoke: could not drain", group=self.group, error=repr(exc))
            return
        if commit and offsets:
            try:
                consumer.commit(offsets=offsets, asynchronous=False)
            except KafkaException as exc:
                log.warning("revoke: commit failed", group=self.group, error=str(exc))
        log.info(
            "partitions revoked" if commit else "partitions lost",
            group=self.group,
            partitions=_names(partitions),
            committed={f"{tp.topic}[{tp.partition}]": tp.offset for tp in offsets},
        )

    async def _release_partitions(self, keys: set[_TPKey], timeout: float) -> list[TopicPartition]:
        states = [self._states.pop(key) for key in keys if key in self._states]
        await self._drain(states, timeout)
        for key in keys:
            self._forget_lag(key)
        return self._commit_offsets(states)

    # -- committing ------------------------------------------------------------------------

    @staticmethod
    def _commit_offsets(states: Iterable[PartitionState]) -> list[TopicPartition]:
        offsets = []
        for s in states:
            point = s.commit_point()
            if point is not None:
                offsets.append(TopicPartition(s.topic, s.partition, point))
        return offsets

    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(self.commit_interval)
            try:
                offsets = self._commit_offsets(self._states.values())
                if offsets:
                    await self._call(self._commit_sync, offsets)
                await self._update_lag()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("commit loop failed", group=self.group, error=repr(exc))

    async def _update_lag(self) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        keys = list(self._assigned)

        def watermarks() -> list[tuple[int, int] | None]:
            out: list[tuple[int, int] | None] = []
            for key in keys:
                try:
                    # Cached: from fetch responses, no broker round trip.
                    out.append(consumer.get_watermark_offsets(TopicPartition(*key), cached=True))
                except KafkaException:
                    out.append(None)
            return out

        marks = await self._call(watermarks)
        for key, mark in zip(keys, marks, strict=True):
            if mark is None:
                continue
            low, high = mark
            if high < 0:
                continue
            state = self._states.get(key)
            base = None
            if state is not None:
                base = state.committed if state.committed is not None else state.next_commit
            if base is None:
                base = low if low >= 0 else None
            if base is None:
                continue
            self.metrics.lag.labels(self.group, key[0], str(key[1])).set(max(0, high - base))

    def _forget_lag(self, key: _TPKey) -> None:
        with contextlib.suppress(KeyError):
            self.metrics.lag.remove(self.group, key[0], str(key[1]))

    # -- handling (runners) ----------------------------------------------------------------

    async def _run(self) -> None:
        """One runner: takes the next ready message and handles it, until none is ready.

        The common case runs inline here (one coroutine frame per message: the
        handler's): the batch allows the short path (an ``async def`` handler without
        context, read from the subscribed topic, no tracing SDK, partition not revoked)
        and the message has no headers. Its first attempt runs here; anything else, and
        any failure, goes through :meth:`_handle_full`. Handlers that do not suspend
        run back to back in one step of this task.
        """
        assert self._loop is not None
        create_future = self._loop.create_future
        work = self._work
        ready, by_key, idle = work.ready, work.by_key, work.idle
        popleft, ready_append = ready.popleft, ready.append
        capacity, progress = self._capacity, self._progress
        resume_below = self.max_buffered // 2
        clock = time.perf_counter
        bounds = HANDLER_BUCKETS
        first_bound = bounds[0]
        undecoded = _UNDECODED
        while True:
            if not ready:
                inline = self._inline
                if inline is not None:
                    self._inline = None
                    await self._run_inline(inline)
                    continue
                waiter = create_future()
                idle.append(waiter)
                await waiter
                continue
            key, msg, batch = popleft()
            try:
                done = False
                if batch.fast and not msg.headers():
                    route = batch.route
                    decode = route.decode
                    value = msg.value()
                    if decode is not None:
                        try:
                            value = decode(value)
                        except Exception:  # poison: dead-lettered there
                            value = undecoded
                    elif value is None:
                        value = b""  # RawCodec.decode
                    if value is undecoded:
                        done = await self._handle_full(msg, batch.state, None)
                    else:
                        start = clock()
                        try:
                            await route.handler(value)
                        except BaseException as caught:
                            if (exc := _handler_failure(caught)) is None:
                                raise
                            elapsed = clock() - start
                            stats = route.stats
                            stats.buckets[bisect_left(bounds, elapsed)] += 1
                            stats.total += elapsed
                            stats.failed += 1
                            done = await self._handle_full(msg, batch.state, exc)
                        else:
                            elapsed = clock() - start
                            if elapsed <= first_bound:  # the common case: skip the search
                                route.buckets[0] += 1
                            else:
                                route.buckets[bisect_left(bounds, elapsed)] += 1
                            stats = route.stats
                            stats.total += elapsed
                            stats.processed += 1
                            done = True
                elif not batch.state.revoked:
                    done = await self._handle_full(msg, batch.state, None)
                if done:
                    left = batch.left - 1
                    batch.left = left
                    if not left:
                        batch.state.completed()
                        progress.set()
            finally:
                if key is not None:  # the key's next message (if any) goes to the back
                    queue = by_key[key]
                    if queue:
                        ready_append(queue.popleft())
                    else:
                        del by_key[key]
                in_flight = self.in_flight - 1
                self.in_flight = in_flight
                if self._wants_capacity and in_flight <= resume_below:
                    capacity.set()

    async def _handle_full(
        self, msg: Message, state: PartitionState, first_error: Exception | None
    ) -> bool:
        """Run the handler with retries; ``True`` when the message is done with
        (handled, moved to a retry topic or the DLQ). ``first_error`` is how the first
        attempt (made by :meth:`_run`'s short path, already counted) failed, or ``None``
        when none was made."""
        topic: str = msg.topic()  # type: ignore[assignment]
        partition: int = msg.partition()  # type: ignore[assignment]
        offset: int = msg.offset()  # type: ignore[assignment]
        sub, level = self._routes[topic]
        raw_headers = msg.headers()
        text_headers = H.header_map(raw_headers) if raw_headers else {}
        prior = _int(text_headers.get(H.ATTEMPTS), 0) if level else 0
        stats = self._stats[sub.topic]
        try:
            assert sub.codec is not None
            value = sub.codec.decode(msg.value())
        except DecodeError as exc:
            return await self._dead_letter(msg, state, sub, exc, prior, "poison")
        except Exception as exc:  # a custom codec failing in its own way is poison too
            return await self._dead_letter(
                msg, state, sub, DecodeError(f"{type(exc).__name__}: {exc}"), prior, "poison"
            )
        policy = sub.retry
        error: BaseException | None = None
        for attempt in range(1, policy.attempts + 1):
            if attempt == 1 and first_error is not None:
                if isinstance(first_error, DeadLetter):
                    return await self._dead_letter(
                        msg, state, sub, first_error, prior + 1, "rejected"
                    )
                error = first_error
                self._log_failure(topic, partition, offset, prior + attempt, first_error)
                if attempt < policy.attempts:
                    self.metrics.retried.labels(self.group, sub.topic, "inplace").inc()
                    await asyncio.sleep(policy.backoff_for(attempt))
                continue
            if state.revoked:
                return False
            ctx = (
                MessageContext(
                    topic=topic,
                    partition=partition,
                    offset=offset,
                    key=msg.key(),
                    headers=text_headers,
                    timestamp=_timestamp(msg),
                    group=self.group,
                    original_topic=sub.topic,
                    attempt=prior + attempt,
                    retry_level=level,
                    raw=msg.value(),
                )
                if sub.wants_context
                else None
            )
            span = (
                ConsumerSpan(topic, self.group, partition, offset, msg.key(), raw_headers)
                if raw_headers or recording()
                else _NO_SPAN
            )
            start = time.perf_counter()
            try:
                if sub.is_async:
                    if sub.wants_context:
                        await sub.handler(value, ctx)
                    else:
                        await sub.handler(value)
                else:
                    assert self._loop is not None
                    args = (value, ctx) if sub.wants_context else (value,)
                    # In the handler's thread too, the consumer span is current.
                    context = contextvars.copy_context()
                    await self._loop.run_in_executor(None, context.run, sub.handler, *args)
            except DeadLetter as exc:
                span.end(exc)
                stats.observe(time.perf_counter() - start)
                stats.failed += 1
                return await self._dead_letter(msg, state, sub, exc, prior + attempt, "rejected")
            except BaseException as caught:
                span.end(caught)
                if (failure := _handler_failure(caught)) is None:
                    raise
                stats.observe(time.perf_counter() - start)
                stats.failed += 1
                error = failure
                self._log_failure(topic, partition, offset, prior + attempt, failure)
                if attempt < policy.attempts:
                    self.metrics.retried.labels(self.group, sub.topic, "inplace").inc()
                    await asyncio.sleep(policy.backoff_for(attempt))
                continue
            span.end(None)
            stats.observe(time.perf_counter() - start)
            stats.processed += 1
            return True
        assert error is not None
        attempts = prior + policy.attempts
        if level < len(policy.topic_delays):
            return await self._to_retry_topic(msg, state, sub, level + 1, error, attempts)
        return await self._dead_letter(msg, state, sub, error, attempts, "exhausted")

    def _log_failure(
        self, topic: str, partition: int, offset: int, attempt: int, exc: BaseException
    ) -> None:
        log.warning(
            "handler failed",
            group=self.group,
            topic=topic,
            partition=partition,
            offset=offset,
            attempt=attempt,
            error=f"{type(exc).__name__}: {exc}",
        )

    def _moved_headers(
        self, msg: Message, sub: Subscription, error: BaseException, attempts: int
    ) -> dict[str, str | None]:
        old = H.header_map(msg.headers())
        first = H.ORIGINAL_TOPIC not in old
        timestamp = _timestamp(msg)
        return {
            H.ORIGINAL_TOPIC: sub.topic if first else old[H.ORIGINAL_TOPIC],
            H.ORIGINAL_PARTITION: str(msg.partition()) if first else old.get(H.ORIGINAL_PARTITION),
            H.ORIGINAL_OFFSET: str(msg.offset()) if first else old.get(H.ORIGINAL_OFFSET),
            H.ORIGINAL_TIMESTAMP: (str(timestamp) if timestamp is not None else None)
            if first
            else old.get(H.ORIGINAL_TIMESTAMP),
            H.ATTEMPTS: str(attempts),
            H.ERROR: str(error)[:1000],
            H.ERROR_TYPE: f"{type(error).__module__}.{type(error).__qualname__}",
            H.GROUP: self.group,
            H.FAILED_AT: str(int(time.time() * 1000)),
        }

    async def _to_retry_topic(
        self,
        msg: Message,
        state: PartitionState,
        sub: Subscription,
        level: int,
        error: BaseException,
        attempts: int,
    ) -> bool:
        delay = sub.retry.topic_delays[level - 1]
        updates = self._moved_headers(msg, sub, error, attempts)
        updates[H.RETRY_LEVEL] = str(level)
        updates[H.NOT_BEFORE] = str(int(time.time() * 1000 + delay * 1000))
        headers = H.replace_headers(msg.headers(), updates, drop=(H.DEAD_LETTER_REASON,))
        target = retry_topic(sub.topic, level)
        if not await self._move(msg, target, headers, state):
            return False
        self.metrics.retried.labels(self.group, sub.topic, "topic").inc()
        log.info(
            "message moved to retry topic",
            group=self.group,
            topic=msg.topic(),
            partition=msg.partition(),
            offset=msg.offset(),
            retry_topic=target,
            delay_s=delay,
            attempts=attempts,
        )
        return True

    async def _dead_letter(
        self,
        msg: Message,
        state: PartitionState,
        sub: Subscription,
        error: BaseException,
        attempts: int,
        reason: str,
    ) -> bool:
        if not sub.retry.dead_letter:
            log.error(
                "message dropped (dead_letter disabled)",
                group=self.group, topic=msg.topic(), partition=msg.partition(),
                offset=msg.offset(), reason=reason, error=str(error),
            )  # fmt: skip
            self.metrics.dead_lettered.labels(self.group, sub.topic, reason).inc()
            return True
        updates = self._moved_headers(msg, sub, error, attempts)
        updates[H.DEAD_LETTER_REASON] = reason
        headers = H.replace_headers(msg.headers(), updates, drop=(H.RETRY_LEVEL, H.NOT_BEFORE))
        target = dlq_topic(sub.topic)
        if not await self._move(msg, target, headers, state):
            return False
        self.metrics.dead_lettered.labels(self.group, sub.topic, reason).inc()
        log.error(
            "message dead-lettered",
            group=self.group,
            topic=msg.topic(),
            partition=msg.partition(),
            offset=msg.offset(),
            dlq=target,
            reason=reason,
            attempts=attempts,
            error=f"{type(error).__name__}: {error}",
        )
        return True

    async def _move(
        self, msg: Message, target: str, headers: list[tuple[str, bytes]], state: PartitionState
    ) -> bool:
        """Publish a copy to ``target`` and wait for the broker; retry until it works or
        the partition is gone (then the message is left for the next owner)."""
        assert self._publisher is not None
        delay = 0.1
        while True:
            try:
                await self._publisher.produce_raw(
                    target, msg.value(), key=msg.key(), headers=headers
                )
                return True
            except MqError as exc:
                self.last_error = f"moving a message to {target}: {exc}"
                log.warning("moving a message failed, will retry", target=target, error=str(exc))
            if self._stopping or state.revoked:
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def _handler_failure(exc: BaseException) -> Exception | None:
    """How an exception out of a handler counts: an ``Exception`` is a failure; so is a
    ``CancelledError`` while this task is not being cancelled (the handler awaited
    something cancelled elsewhere), as a :class:`HandlerCancelled`; ``None``: not the
    handler's failure (the runner itself is cancelled, ``KeyboardInterrupt``), re-raise.
    """
    if isinstance(exc, Exception):
        return exc
    if isinstance(exc, asyncio.CancelledError):
        task = asyncio.current_task()
        if task is not None and not task.cancelling():
            failure = HandlerCancelled(
                "the handler raised CancelledError without being cancelled "
                f"(it awaited something cancelled elsewhere): {exc!r}"
            )
            failure.__cause__ = exc
            return failure
    return None


#: marks a value the codec could not decode (the full path dead-letters the message)
_UNDECODED: Any = object()


class _NoSpan:
    """Stands in for a ConsumerSpan when there is nothing to trace (no SDK, no context)."""

    __slots__ = ()

    def end(self, error: BaseException | None) -> None:
        pass


_NO_SPAN = _NoSpan()


def _where(msg: Message) -> tuple[str, int, int]:
    """Topic, partition and offset of a consumed message (never ``None`` for one)."""
    return cast(str, msg.topic()), cast(int, msg.partition()), cast(int, msg.offset())


def _not_before(msg: Message) -> float | None:
    value = H.header_map(msg.headers()).get(H.NOT_BEFORE)
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _timestamp(msg: Message) -> int | None:
    kind, ts = msg.timestamp()
    return ts if kind != 0 and ts >= 0 else None  # 0 = TIMESTAMP_NOT_AVAILABLE


def _int(text: str | None, default: int) -> int:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default


def _names(partitions: Iterable[TopicPartition]) -> list[str]:
    return sorted(f"{tp.topic}[{tp.partition}]" for tp in partitions)


class _QuietLogger:
    """librdkafka's log lines at debug level (it is chatty about reconnects)."""

    def log(self, level: int, fmt: str, *args: Any) -> None:
        log.debug("librdkafka", message=fmt % args if args else fmt, level=level)


_quiet_logger = _QuietLogger()
