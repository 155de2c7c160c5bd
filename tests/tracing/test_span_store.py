"""The span store's writer: multi-row inserts and checkpoints in their own thread."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from tracing_support import otlp_json_request, otlp_json_span
from waiting import wait_until

from meshkit.tracing.collector import SpanStore
from meshkit.tracing.collector.otlp import decode_json

TRACE = "0af7651916cd43dd8448eb211c80319c"


def _spans(count: int, name: str = "op") -> list:
    now = time.time_ns()
    body = otlp_json_request(
        "svc",
        [
            otlp_json_span(TRACE, f"{i + 1:016x}", "", name, now + i, 10, attrs={"i": i})
            for i in range(count)
        ],
    )
    return decode_json(json.dumps(body).encode()).spans


def test_batches_larger_than_one_insert_statement_are_written_whole(tmp_path: Path) -> None:
    store = SpanStore(tmp_path / "s.db", retention_every=3600)
    store._rows_per_insert = 3  # 10 spans: statements of 3, 3, 3 and 1 rows
    try:
        store.add(_spans(10))
        assert store.flush()
        rows = store.query("SELECT span_id, attrs FROM spans ORDER BY span_id")
        assert [(r[0], json.loads(r[1])) for r in rows] == [
            (f"{i + 1:016x}", {"i": i}) for i in range(10)
        ]
        assert store.spans_written == 10
    finally:
        store.close()


async def test_checkpoints_run_in_their_own_thread_and_close_empties_the_log(
    tmp_path: Path,
) -> None:
    path = tmp_path / "c.db"
    store = SpanStore(path, retention_every=3600)
    checkpointer = store._checkpointer
    checkpointer.every_spans = 5
    try:
        store.add(_spans(10))
        assert store.flush()
        await wait_until(lambda: checkpointer.checkpoints >= 1, "a checkpoint")
        # past max_wal_bytes the checkpoint is a RESTART one (it waits for the writer)
        checkpointer.max_wal_bytes = 0
        checkpointer.checkpoint()
        store.add(_spans(10, name="again"))
        assert store.flush()
    finally:
        store.close()
    wal = Path(str(path) + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM spans").fetchone()[0] == 10  # replaced
        assert conn.execute("SELECT DISTINCT name FROM spans").fetchall() == [("again",)]
