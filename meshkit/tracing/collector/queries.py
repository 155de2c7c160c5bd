"""What the viewer's JSON API answers: search, one trace, dependencies, comparison.

Every function takes a :class:`~.store.SpanStore` and plain parameters and returns plain
JSON-able data, so the API, the tests and other tools share one implementation. Times in
answers are microseconds relative to the trace start (``start_us``, ``duration_us``) plus
the trace's absolute start as a string of Unix nanoseconds (too large for a JS number).
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import jsontext
from .store import SpanStore

__all__ = [
    "QueryError",
    "SearchQuery",
    "compare",
    "critical_path",
    "dependencies",
    "get_trace",
    "get_trace_json",
    "search",
    "self_times",
    "services",
]

MAX_LIMIT = 1000


class QueryError(ValueError):
    """A query parameter is invalid (the API answers 400 with the message)."""


@dataclass(frozen=True, slots=True)
class SearchQuery:
    """Search filters; every one optional. Times in Unix ms, durations in ms."""

    service: str = ""
    operation: str = ""
    tags: Mapping[str, str] | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    errors_only: bool = False
    start_ms: float | None = None
    end_ms: float | None = None
    limit: int = 50

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> SearchQuery:
        """Parse the API's query string (``tags`` as ``k=v`` pairs, space- or comma-separated;
        ``lookback`` seconds as an alternative to ``start_ms``)."""
        tags: dict[str, str] = {}
        for item in params.get("tags", "").replace(",", " ").split():
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise QueryError(f"expected tags as key=value, found {item!r}")
            tags[key] = value
        start_ms = _num(params, "start_ms")
        lookback = _num(params, "lookback", MAX_MS / 1000)  # seconds
        if start_ms is None and lookback is not None:
            start_ms = max(0.0, time.time() * 1000 - lookback * 1000)
        limit = _num(params, "limit")
        return cls(
            service=params.get("service", ""),
            operation=params.get("operation", ""),
            tags=tags or None,
            min_ms=_num(params, "min_ms"),
            max_ms=_num(params, "max_ms"),
            errors_only=params.get("errors", "") in ("1", "true", "on", "yes"),
            start_ms=start_ms,
            end_ms=_num(params, "end_ms"),
            limit=int(limit) if limit is not None else 50,
        )


# Times and durations in ms become ns in SQLite's signed 64-bit INTEGER (up to 9.2e18):
# 9e12 ms is the year 2255, and a duration of 285 years.
MAX_MS = 9e12


def _num(params: Mapping[str, str], name: str, maximum: float = MAX_MS) -> float | None:
    """The query parameter ``name`` as a number in [0, maximum], or None when absent."""
    raw = params.get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0 <= value <= maximum:  # NaN fails too
        raise QueryError(f"expected {name} to be a number from 0 to {maximum:g}, found {raw!r}")
    return value


def services(store: SpanStore) -> list[dict[str, Any]]:
    """Every service with its operations."""
    rows = store.query("SELECT DISTINCT service, name FROM spans ORDER BY service, name")
    out: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        out[row["service"]].append(row["name"])
    return [{"service": s, "operations": ops} for s, ops in out.items()]


def search(store: SpanStore, q: SearchQuery) -> list[dict[str, Any]]:
    """Traces with at least one span matching every filter, newest first."""
    if not 1 <= q.limit <= MAX_LIMIT:
        raise QueryError(f"expected limit between 1 and {MAX_LIMIT}, found {q.limit}")
    where: list[str] = []
    params: list[Any] = []
    if q.service:
        where.append("service = ?")
        params.append(q.service)
    if q.operation:
        where.append("name = ?")
        params.append(q.operation)
    for key, value in (q.tags or {}).items():
        where.append("CAST(json_extract(attrs, ?) AS TEXT) = ?")
        params += ['$."' + key.replace('"', '""') + '"', value]
    if q.min_ms is not None:
        where.append("duration_ns >= ?")
        params.append(int(q.min_ms * 1e6))
    if q.max_ms is not None:
        where.append("duration_ns <= ?")
        params.append(int(q.max_ms * 1e6))
    if q.errors_only:
        where.append("error = 1")
    if q.start_ms is not None:
        where.append("start_ns >= ?")
        params.append(int(q.start_ms * 1e6))
    if q.end_ms is not None:
        where.append("start_ns <= ?")
        params.append(int(q.end_ms * 1e6))
    sql = "SELECT trace_id, max(start_ns) AS last FROM spans"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " GROUP BY trace_id ORDER BY last DESC LIMIT ?"
    ids = [row["trace_id"] for row in store.query(sql, [*params, q.limit])]
    return summaries(store, ids)


def summaries(store: SpanStore, trace_ids: Sequence[str]) -> list[dict[str, Any]]:
    """Duration, span count, services, errors and root of each trace, in the given order."""
    if not trace_ids:
        return []
    marks = ",".join("?" * len(trace_ids))
    rows = store.query(
        "SELECT trace_id, min(start_ns) AS start, max(start_ns + duration_ns) AS end, "
        "count(*) AS spans, sum(error) AS errors, group_concat(DISTINCT service) AS services "
        f"FROM spans WHERE trace_id IN ({marks}) GROUP BY trace_id",
        trace_ids,
    )
    roots = store.query(
        "SELECT trace_id, service, name, min(start_ns) FROM spans "
        f"WHERE trace_id IN ({marks}) GROUP BY trace_id",
        trace_ids,
    )
    root_of = {r["trace_id"]: (r["service"], r["name"]) for r in roots}
    by_id = {}
    for r in rows:
        service, name = root_of.get(r["trace_id"], ("", ""))
        by_id[r["trace_id"]] = {
            "trace_id": r["trace_id"],
            "root_service": service,
            "root_operation": name,
            "start_ms": r["start"] / 1e6,
            "duration_ms": (r["end"] - r["start"]) / 1e6,
            "spans": r["spans"],
            "errors": r["errors"],
            "services": sorted((r["services"] or "").split(",")),
        }
    return [by_id[t] for t in trace_ids if t in by_id]


# -- one trace ----------------------------------------------------------------------


def _children(spans: Sequence[dict[str, Any]]) -> tuple[list[str], dict[str, list[str]]]:
    ids = {s["span_id"] for s in spans}
    roots: list[str] = []
    kids: dict[str, list[str]] = defaultdict(list)
    for s in spans:
        parent = s["parent_id"]
        if parent and parent in ids and parent != s["span_id"]:
            kids[parent].append(s["span_id"])
        else:
            roots.append(s["span_id"])
    return roots, kids


def critical_path(spans: Sequence[dict[str, Any]]) -> list[str]:
    """Span ids on the critical path: the chain of last-finishing work, root first.

    From the root, walk back from its end: the child that finished last before the
    cursor is on the path (and recursively its own critical children); the cursor then
    moves to that child's start. Spans with missing parents start their own root; the
    longest root is used. When there is no root at all (the parents form a cycle: a
    broken or hostile exporter), the walk starts from the earliest span and never visits
    a span twice.
    """
    if not spans:
        return []
    start = {s["span_id"]: s["start_ns"] for s in spans}
    end = {s["span_id"]: s["start_ns"] + s["duration_ns"] for s in spans}
    roots, kids = _children(spans)
    path: list[str] = []
    if roots:
        root = max(roots, key=lambda sid: end[sid] - start[sid])
    else:
        root = min(start, key=start.__getitem__)
    stack: list[tuple[str, int]] = [(root, end[root])]
    on_path: set[str] = set()
    while stack:
        sid, cut = stack.pop()
        if sid in on_path:
            continue  # only in a cycle
        on_path.add(sid)
        path.append(sid)
        begin = start[sid]
        cursor = min(end[sid], cut)
        chosen: list[tuple[str, int]] = []
        children = kids.get(sid)
        if children:
            for child in sorted(children, key=end.__getitem__, reverse=True):
                if cursor <= begin:
                    break
                if start[child] >= cursor or child in on_path:
                    continue  # starts after the cursor: not what the parent waited on last
                chosen.append((child, cursor))
                cursor = start[child]
        # Depth first, earliest chosen child first, so the path reads in time order.
        stack.extend(chosen)
    return path


def self_times(spans: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Per span: its duration minus the time covered by its children (ns)."""
    start = {s["span_id"]: s["start_ns"] for s in spans}
    end = {s["span_id"]: s["start_ns"] + s["duration_ns"] for s in spans}
    _, kids = _children(spans)
    out: dict[str, int] = {}
    for sid, s0 in start.items():
        s1 = end[sid]
        children = kids.get(sid)
        if not children:
            out[sid] = s1 - s0
            continue
        covered = 0
        cur_s = cur_e = None
        for a, b in sorted((max(s0, start[c]), min(s1, end[c])) for c in children):
            if b <= a:
                continue
            if cur_e is None or a > cur_e:
                if cur_e is not None and cur_s is not None:
                    covered += cur_e - cur_s
                cur_s, cur_e = a, b
            elif b > cur_e:
                cur_e = b
        if cur_e is not None and cur_s is not None:
            covered += cur_e - cur_s
        out[sid] = max(0, s1 - s0 - covered)
    return out


def _load(store: SpanStore, trace_id: str) -> list[dict[str, Any]]:
    rows = store.query(
        "SELECT span_id, parent_id, service, name, kind, start_ns, duration_ns, error, status, "
        "kept, json_extract(attrs, '$.\"meshkit.deadline_ms\"') AS deadline, attrs, events, "
        "links, resource FROM spans WHERE trace_id = ? ORDER BY start_ns",
        [trace_id],
    )
    return [dict(r) for r in rows]


def get_trace(store: SpanStore, trace_id: str) -> dict[str, Any] | None:
    """One trace with its spans, critical path, per-service self time and MQ links.

    Each span has ``attrs``, ``events`` and ``links``; its ``resource`` is an index into
    the answer's ``resources`` list (a process's resource is shared by all its spans).
    """
    text = get_trace_json(store, trace_id)
    if text is None:
        return None
    trace = json.loads(text)
    for span, attrs, events, links in zip(
        trace["spans"], trace.pop("attrs"), trace.pop("events"), trace.pop("links"), strict=True
    ):
        span.update(attrs=attrs, events=events, links=links)
    return trace


def get_trace_json(store: SpanStore, trace_id: str) -> str | None:
    """The API's form of :func:`get_trace`: span attributes, events and links come as
    lists parallel to ``spans`` (``attrs[i]`` belongs to ``spans[i]``), spliced in from
    the stored JSON without parsing it, so a 10k-span trace is answered quickly."""
    trace_id = trace_id.lower()
    rows = _load(store, trace_id)
    if not rows:
        return None
    t0 = min(r["start_ns"] for r in rows)
    t1 = max(r["start_ns"] + r["duration_ns"] for r in rows)
    path = critical_path(rows)
    selfs = self_times(rows)
    breakdown: dict[str, list[float]] = {}
    resources: dict[str, int] = {}
    heads = []
    events_json = []
    for r in rows:
        sid = r["span_id"]
        self_us = selfs[sid] / 1000
        entry = breakdown.get(r["service"])
        if entry is None:
            entry = breakdown[r["service"]] = [0.0, 0]
        entry[0] += self_us
        entry[1] += 1
        events = r["events"]
        if events != "[]":
            events = jsontext.dumps(
                [
                    {"name": e.get("name", ""), "attrs": e.get("attrs", {}),
                     "at_us": (int(e.get("time_ns") or t0) - t0) / 1000}
                    for e in json.loads(events)
                ]
            )  # fmt: skip
        events_json.append(events)
        deadline = r["deadline"]
        heads.append(
            {
                "span_id": sid,
                "parent_id": r["parent_id"],
                "service": r["service"],
                "name": r["name"],
                "kind": r["kind"],
                "start_us": (r["start_ns"] - t0) / 1000,
                "duration_us": r["duration_ns"] / 1000,
                "self_us": self_us,
                "error": bool(r["error"]),
                "status": r["status"],
                "kept": r["kept"],
                "deadline_ms": deadline if isinstance(deadline, (int, float)) else None,
                "resource": resources.setdefault(r["resource"], len(resources)),
            }
        )
    linked_from = [
        dict(r)
        for r in store.query(
            "SELECT trace_id, span_id, linked_span_id FROM links "
            "WHERE linked_trace_id = ? AND trace_id != ? LIMIT 200",
            [trace_id, trace_id],
        )
    ]
    by_time = sorted(breakdown.items(), key=lambda kv: -kv[1][0])
    summary = {
        "trace_id": trace_id,
        "start_ns": str(t0),
        "duration_us": (t1 - t0) / 1000,
        "span_count": len(rows),
        "services": [{"service": k, "self_us": v[0], "spans": v[1]} for k, v in by_time],
        "critical_path": path,
        "linked_from": linked_from,
        "spans": heads,
    }
    head = jsontext.dumps(summary)
    return (
        f"{head[:-1]},"
        f'"resources":[{",".join(resources)}],'
        f'"attrs":[{",".join(r["attrs"] for r in rows)}],'
        f'"events":[{",".join(events_json)}],'
        f'"links":[{",".join(r["links"] for r in rows)}]}}'
    )


# -- dependencies ---------------------------------------------------------------------


def dependencies(
    store: SpanStore, *, window_s: float = 3600, end_ms: float | None = None
) -> dict[str, Any]:
    """Caller → callee edges from CLIENT/PRODUCER spans: calls/s, error rate, p50/p99."""
    if not 0 < window_s <= 30 * 86400:
        raise QueryError(f"expected a window between 0 and 30 days (s), found {window_s}")
    if end_ms is not None and not 0 <= end_ms <= MAX_MS:
        raise QueryError(f"expected end_ms to be a number from 0 to {MAX_MS:g}, found {end_ms}")
    end_ns = int((end_ms if end_ms is not None else time.time() * 1000) * 1e6)
    start_ns = end_ns - int(window_s * 1e9)
    rows = store.query(
        "SELECT service, peer_service, duration_ns, error FROM spans "
        "WHERE start_ns >= ? AND start_ns <= ? AND peer_service IS NOT NULL",
        [start_ns, end_ns],
    )
    edges: dict[tuple[str, str], list[tuple[int, int]]] = defaultdict(list)
    for r in rows:
        edges[(r["service"], r["peer_service"])].append((r["duration_ns"], r["error"]))
    out = []
    for (caller, callee), calls in sorted(edges.items()):
        durations = sorted(d for d, _ in calls)
        n = len(durations)
        errors = sum(e for _, e in calls)
        out.append(
            {
                "caller": caller,
                "callee": callee,
                "calls": n,
                "calls_per_s": n / window_s,
                "errors": errors,
                "error_rate": errors / n,
                "p50_ms": durations[max(0, math.ceil(0.5 * n) - 1)] / 1e6,
                "p99_ms": durations[max(0, math.ceil(0.99 * n) - 1)] / 1e6,
            }
        )
    nodes = sorted({str(e["caller"]) for e in out} | {str(e["callee"]) for e in out})
    return {"window_s": window_s, "end_ms": end_ns / 1e6, "nodes": nodes, "edges": out}


# -- compare --------------------------------------------------------------------------


def _keyed(spans: Sequence[dict[str, Any]]) -> list[tuple[tuple[str, ...], dict[str, Any], int]]:
    """(structural key, span, depth) in tree order; the key is the path of
    ``service:name#n`` from the root (n counts same-named siblings)."""
    by_id = {s["span_id"]: s for s in spans}
    roots, kids = _children(spans)
    out: list[tuple[tuple[str, ...], dict[str, Any], int]] = []

    def label_children(ids: Sequence[str]) -> list[tuple[str, str]]:
        seen: dict[str, int] = defaultdict(int)
        labelled = []
        for sid in sorted(ids, key=lambda i: by_id[i]["start_ns"]):
            s = by_id[sid]
            base = f"{s['service']}:{s['name']}"
            labelled.append((f"{base}#{seen[base]}", sid))
            seen[base] += 1
        return labelled

    stack: list[tuple[tuple[str, ...], str, int]] = [
        ((label,), sid, 0) for label, sid in reversed(label_children(roots))
    ]
    while stack:
        key, sid, depth = stack.pop()
        out.append((key, by_id[sid], depth))
        for label, child in reversed(label_children(kids.get(sid, ()))):
            stack.append(((*key, label), child, depth + 1))
    return out


def compare(store: SpanStore, a: str, b: str) -> dict[str, Any] | None:
    """Structural diff of two traces: spans matched by their path of service:operation."""
    spans_a, spans_b = _load(store, a.lower()), _load(store, b.lower())
    if not spans_a or not spans_b:
        return None
    keyed_a, keyed_b = _keyed(spans_a), _keyed(spans_b)
    index_b = {key: span for key, span, _ in keyed_b}
    rows = []
    seen = set()
    for key, span, depth in keyed_a:
        other = index_b.get(key)
        seen.add(key)
        a_us = span["duration_ns"] / 1000
        b_us = other["duration_ns"] / 1000 if other else None
        rows.append(
            {
                "key": " > ".join(key),
                "depth": depth,
                "service": span["service"],
                "name": span["name"],
                "a_us": a_us,
                "b_us": b_us,
                "delta_us": (b_us - a_us) if b_us is not None else None,
                "a_error": bool(span["error"]),
                "b_error": bool(other["error"]) if other else None,
                "in": "both" if other else "a",
            }
        )
    for key, span, depth in keyed_b:
        if key in seen:
            continue
        rows.append(
            {
                "key": " > ".join(key),
                "depth": depth,
                "service": span["service"],
                "name": span["name"],
                "a_us": None,
                "b_us": span["duration_ns"] / 1000,
                "delta_us": None,
                "a_error": None,
                "b_error": bool(span["error"]),
                "in": "b",
            }
        )
    sa, sb = summaries(store, [a.lower(), b.lower()])
    return {"a": sa, "b": sb, "rows": rows}


def stats(store: SpanStore) -> dict[str, Any]:
    """Counts for ``/api/stats``: spans stored, written, deleted, refused, bytes."""
    conn = store.reader()
    return {
        "spans": conn.execute("SELECT count(*) FROM spans").fetchone()[0],
        "spans_written": store.spans_written,
        "spans_deleted": store.spans_deleted,
        "spans_dropped": store.spans_dropped,
        "requests_refused": store.requests_refused,
        "live_bytes": store.live_bytes(conn),
        "max_bytes": store.max_bytes,
        "max_age_s": store.max_age,
        "path": store.path,
    }
