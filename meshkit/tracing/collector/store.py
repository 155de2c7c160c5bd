"""The collector's span store: SQLite in WAL mode, one writer thread, many readers.

Writes are batched: :meth:`SpanStore.add` queues a request's spans (or refuses them when
the queue is full, so the caller can answer 503 and the exporter retries later) and the
writer thread inserts whatever is queued in one transaction. Readers use their own
connections (WAL lets them read while the writer writes). Retention runs in the writer:
spans older than ``max_age`` seconds go, and when the live data outgrows ``max_bytes`` the
oldest tenth goes, until it fits.
"""

from __future__ import annotations

import functools
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .jsontext import dumps
from .otlp import SpanRow

__all__ = ["SpanStore", "StoreFull"]

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS spans (
    trace_id TEXT NOT NULL,
    span_id TEXT NOT NULL,
    parent_id TEXT NOT NULL,
    service TEXT NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    start_ns INTEGER NOT NULL,
    duration_ns INTEGER NOT NULL,
    error INTEGER NOT NULL,
    status TEXT NOT NULL,
    peer_service TEXT,
    kept TEXT,
    attrs TEXT NOT NULL,
    events TEXT NOT NULL,
    links TEXT NOT NULL,
    resource TEXT NOT NULL,
    PRIMARY KEY (trace_id, span_id)
);
CREATE INDEX IF NOT EXISTS spans_start ON spans (start_ns);
CREATE INDEX IF NOT EXISTS spans_service ON spans (service, start_ns);
CREATE INDEX IF NOT EXISTS spans_operation ON spans (name, start_ns);
CREATE INDEX IF NOT EXISTS spans_duration ON spans (duration_ns);
CREATE INDEX IF NOT EXISTS spans_error ON spans (start_ns) WHERE error = 1;
CREATE TABLE IF NOT EXISTS links (
    trace_id TEXT NOT NULL,
    span_id TEXT NOT NULL,
    linked_trace_id TEXT NOT NULL,
    linked_span_id TEXT NOT NULL,
    start_ns INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS links_linked ON links (linked_trace_id);
CREATE INDEX IF NOT EXISTS links_trace ON links (trace_id);
CREATE INDEX IF NOT EXISTS links_start ON links (start_ns);
"""

_COLUMNS = 16
_ROWS_PER_INSERT = 512


@functools.lru_cache(maxsize=64)
def _insert_rows(rows: int) -> str:
    """``INSERT OR REPLACE INTO spans`` of ``rows`` rows (one statement)."""
    one = "(" + ",".join("?" * _COLUMNS) + ")"
    return "INSERT OR REPLACE INTO spans VALUES " + ",".join([one] * rows)


_INSERT_LINK = "INSERT INTO links VALUES (?,?,?,?,?)"
_dumps = dumps  # strict JSON: SQLite's json functions must be able to read every row


class StoreFull(Exception):
    """The write queue is full: the collector is behind; try again shortly."""


class _Flush:
    def __init__(self) -> None:
        self.done = threading.Event()


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=30000")
    # Index inserts land at random places (trace ids are random): a large page cache keeps
    # them in memory between commits.
    conn.execute("PRAGMA cache_size=-65536")
    conn.execute("PRAGMA temp_store=MEMORY")
    return conn


class _Checkpointer:
    """Copies the write-ahead log into the database file from a thread of its own.

    SQLite's automatic checkpoint runs inside the committing writer: the writer would stop
    inserting while pages are copied and the file is synced. Here the writer only counts
    what it wrote; every ``every_spans`` spans (and every few seconds) this thread runs a
    PASSIVE checkpoint on its own connection, which copies what it can without blocking
    the writer. Under a long burst a PASSIVE checkpoint may never find the log fully
    copied when the writer starts a transaction (the moment the log restarts from its
    beginning), so past ``max_wal_bytes`` it runs a RESTART checkpoint, which waits for
    the writer between two transactions and makes the next one reuse the log.
    """

    def __init__(
        self, path: str, *, every_spans: int = 8192, max_wal_bytes: int = 64 << 20
    ) -> None:
        self.path = path
        self.every_spans = every_spans
        self.max_wal_bytes = max_wal_bytes
        self.checkpoints = 0
        self._conn = _connect(path)
        self._pending = 0
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(
            target=self._run, name="meshkit-trace-checkpoint", daemon=True
        )
        self._thread.start()

    def wrote(self, spans: int) -> None:
        """The writer committed ``spans`` spans (called from the writer thread)."""
        self._pending += spans
        if self._pending >= self.every_spans:
            self._pending = 0
            self._wake.set()

    def _run(self) -> None:
        while not self._stopped:
            self._wake.wait(timeout=5.0)
            self._wake.clear()
            if self._stopped:
                return
            try:
                self.checkpoint()
            except sqlite3.Error:
                log.exception("trace store checkpoint failed")

    def checkpoint(self) -> None:
        try:
            wal = Path(self.path + "-wal").stat().st_size
        except OSError:
            wal = 0
        mode = "RESTART" if wal > self.max_wal_bytes else "PASSIVE"
        self._conn.execute(f"PRAGMA wal_checkpoint({mode})")
        self.checkpoints += 1

    def close(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=30)
        self._conn.close()


class SpanStore:
    """Spans in one SQLite file (``":memory:"`` is refused: readers need the file)."""

    def __init__(
        self,
        path: str | Path,
        *,
        max_age: float | None = 7 * 86400,
        max_bytes: int | None = 1 << 30,
        max_queued_requests: int = 1024,
        retention_every: float = 30.0,
    ) -> None:
        self.path = str(path)
        if self.path == ":memory:" or not self.path:
            raise ValueError("expected a file path for the span store, found an in-memory one")
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.max_age = max_age
        self.max_bytes = max_bytes
        self.retention_every = retention_every
        self._writer_conn = _connect(self.path)
        self._writer_conn.executescript(SCHEMA)
        # Checkpoints run in their own thread (see _Checkpointer); the writer's automatic
        # one stays as a backstop, far above the checkpointer's pace. A log that restarts
        # is cut back to journal_size_limit.
        self._writer_conn.execute("PRAGMA wal_autocheckpoint=32768")
        self._writer_conn.execute("PRAGMA journal_size_limit=67108864")
        self._rows_per_insert = max(
            1,
            min(
                _ROWS_PER_INSERT,
                self._writer_conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // _COLUMNS,
            ),
        )
        self._checkpointer = _Checkpointer(self.path)
        self._queue: queue.Queue[list[SpanRow] | _Flush | None] = queue.Queue(max_queued_requests)
        self._local = threading.local()
        self.spans_written = 0
        self.spans_deleted = 0
        self.spans_dropped = 0  # accepted, then refused by SQLite (see _write_or_split)
        self.requests_refused = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="meshkit-trace-store", daemon=True)
        self._thread.start()

    # -- writing ------------------------------------------------------------------

    def add(self, spans: list[SpanRow]) -> None:
        """Queue spans for the writer; raises :class:`StoreFull` instead of waiting."""
        if self._closed:
            raise StoreFull("the span store is closed")
        if not spans:
            return
        try:
            self._queue.put_nowait(spans)
        except queue.Full:
            self.requests_refused += 1
            raise StoreFull(
                f"the span store is {self._queue.maxsize} requests behind; retry later"
            ) from None

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything queued before this call is written."""
        marker = _Flush()
        self._queue.put(marker, timeout=timeout)
        return marker.done.wait(timeout)

    def _run(self) -> None:
        next_retention = time.monotonic() + self.retention_every
        while True:
            try:
                item = self._queue.get(timeout=1.0)
            except queue.Empty:
                item = None
                if self._closed:
                    return
            batch: list[SpanRow] = []
            markers: list[_Flush] = []
            stop = False
            while True:
                if isinstance(item, list):
                    batch.extend(item)
                elif isinstance(item, _Flush):
                    markers.append(item)
                if len(batch) >= 20000:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
            if batch:
                self._write_or_split(batch)
            for marker in markers:
                marker.done.set()
            if time.monotonic() >= next_retention:
                next_retention = time.monotonic() + self.retention_every
                try:
                    self.apply_retention()
                except Exception:
                    log.exception("trace retention failed")
            if stop or (self._closed and self._queue.empty()):
                return

    def _write_or_split(self, batch: Sequence[SpanRow]) -> None:
        """Write ``batch``; if SQLite refuses a row, only that row is lost.

        The batch holds spans of many requests, all already acknowledged. When the insert
        fails on the data (a value the binding cannot store), the halves are retried on
        their own, down to single spans, and only those that still fail are dropped (logged
        once per batch, counted in ``spans_dropped``). A failure of the database itself
        (disk full, I/O error: ``sqlite3.OperationalError``) would fail every half as well:
        the batch is dropped at once.
        """
        failed: list[tuple[SpanRow, BaseException]] = []
        written = self.spans_written
        try:
            try:
                self._write(batch)
            except sqlite3.OperationalError:
                raise
            except Exception as exc:
                if len(batch) == 1:
                    failed.append((batch[0], exc))
                else:
                    self._bisect(batch, failed)
        except Exception:
            lost = len(batch) - (self.spans_written - written)
            self.spans_dropped += lost
            log.exception("writing %d spans failed; %d of them are lost", len(batch), lost)
            return
        if failed:
            self.spans_dropped += len(failed)
            span, error = failed[0]
            log.error(
                "dropped %d of %d spans SQLite could not store (first: trace %s span %s: %s: %s)",
                len(failed),
                len(batch),
                span.trace_id,
                span.span_id,
                type(error).__name__,
                error,
            )

    def _bisect(
        self, batch: Sequence[SpanRow], failed: list[tuple[SpanRow, BaseException]]
    ) -> None:
        half = len(batch) // 2
        for part in (batch[:half], batch[half:]):
            try:
                self._write(part)
            except sqlite3.OperationalError:
                raise
            except Exception as exc:
                if len(part) == 1:
                    failed.append((part[0], exc))
                else:
                    self._bisect(part, failed)

    def _write(self, batch: Sequence[SpanRow]) -> None:
        # Rows go in as multi-row INSERTs of up to _ROWS_PER_INSERT rows: one statement
        # step per chunk instead of one per span. The sqlite3 module lets go of the GIL
        # around each step and must win it back after: per span, that hand-off waited on
        # the event loop (decoding the next request) far longer than the insert took.
        params: list[Any] = []
        extend = params.extend
        links = []
        resources: dict[int, str] = {}  # one JSON text per resource (shared by its spans)
        for s in batch:
            resource = resources.get(id(s.resource))
            if resource is None:
                resource = resources[id(s.resource)] = _dumps(s.resource)
            extend(
                (
                    s.trace_id,
                    s.span_id,
                    s.parent_id,
                    s.service,
                    s.name,
                    s.kind,
                    s.start_ns,
                    s.duration_ns,
                    1 if s.error else 0,
                    s.status,
                    s.peer_service,
                    s.kept,
                    s.attrs_json or _dumps(s.attrs),
                    _dumps(s.events) if s.events else "[]",
                    _dumps(s.links) if s.links else "[]",
                    resource,
                )
            )
            for link in s.links:
                links.append((s.trace_id, s.span_id, link["trace_id"], link["span_id"], s.start_ns))
        conn = self._writer_conn
        chunk = self._rows_per_insert * _COLUMNS
        conn.execute("BEGIN")
        try:
            for i in range(0, len(params), chunk):
                part = params[i : i + chunk]
                conn.execute(_insert_rows(len(part) // _COLUMNS), part)
            if links:
                conn.executemany(_INSERT_LINK, links)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self.spans_written += len(batch)
        self._checkpointer.wrote(len(batch))

    def apply_retention(self, now_ns: int | None = None) -> int:
        """Delete spans past ``max_age`` and the oldest while over ``max_bytes``."""
        conn = self._writer_conn
        deleted = 0
        now_ns = time.time_ns() if now_ns is None else now_ns
        if self.max_age is not None:
            cutoff = now_ns - int(self.max_age * 1e9)
            deleted += conn.execute("DELETE FROM spans WHERE start_ns < ?", (cutoff,)).rowcount
            conn.execute("DELETE FROM links WHERE start_ns < ?", (cutoff,))
        if self.max_bytes is not None:
            for _ in range(20):
                if self.live_bytes(conn) <= self.max_bytes:
                    break
                total = conn.execute("SELECT count(*) FROM spans").fetchone()[0]
                if total == 0:
                    break
                row = conn.execute(
                    "SELECT start_ns FROM spans ORDER BY start_ns LIMIT 1 OFFSET ?",
                    (max(1, total // 10),),
                ).fetchone()
                cutoff = row[0] if row else now_ns
                deleted += conn.execute("DELETE FROM spans WHERE start_ns <= ?", (cutoff,)).rowcount
                conn.execute("DELETE FROM links WHERE start_ns <= ?", (cutoff,))
        if deleted:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        self.spans_deleted += deleted
        return deleted

    @staticmethod
    def live_bytes(conn: sqlite3.Connection) -> int:
        """Bytes of the database in use (pages not on the free list)."""
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        return int((pages - free) * page_size)

    def close(self) -> None:
        """Write what is queued, stop the writer and close the database."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=30)
        self._checkpointer.close()
        try:  # leave the file whole and the log empty
            self._writer_conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            log.exception("trace store checkpoint at close failed")
        self._writer_conn.close()

    # -- reading ------------------------------------------------------------------

    def reader(self) -> sqlite3.Connection:
        """This thread's read connection."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.path)
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
        return conn

    def query(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        return self.reader().execute(sql, tuple(params)).fetchall()
