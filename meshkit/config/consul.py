"""The Consul KV config store backend (``consul://host:8500[?prefix=meshkit/config]``).

Plain HTTP on aiohttp, like the Consul registry (:mod:`meshkit.registry.consul`): the
KV store needs four endpoints.

* ``GET /v1/kv/<key>`` and ``GET /v1/kv/<prefix>?recurse`` (404: nothing there); the
  answer's ``X-Consul-Index`` is the listing's revision, each entry's ``ModifyIndex`` its
  modification revision;
* ``PUT /v1/txn``: a transaction of ``check-index`` / ``check-not-exists`` then ``set`` /
  ``delete`` operations, applied at one raft index (409 when a check fails);
* watches are **blocking queries** on the prefix (``?recurse&index=N&wait=30s``).

A blocking query returns the whole prefix, not the changes, so :meth:`ConsulKV.watch`
diffs it against the previous listing it knows for that prefix (the one
:meth:`~ConsulKV.scan` read at ``start_revision - 1``, or its own previous answer). When it
has no such baseline, or the index went backwards (an agent restored from a snapshot),
it raises :class:`~meshkit.config.kv.Compacted` and the caller reads again. Changes that
happen between two answers arrive together, as in any Consul watch: Consul keeps no
history, so a watcher that was away sees the latest version of each key, never an older
one after a newer one. Queries are spaced by at least 50 ms and backed off after errors.

The ACL token (``?token=`` or ``$CONSUL_HTTP_TOKEN``) travels only in ``X-Consul-Token``
and never appears in URLs, logs or errors.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import aiohttp
import structlog

from .._redact import redact_url
from ..errors import ConfigError, Unavailable
from .kv import KV, Compacted, Delete, Entry, Event, Listing, Put, validate_key, validate_prefix

__all__ = ["DEFAULT_PREFIX", "ConsulKV"]

_log = structlog.get_logger("meshkit.config")

DEFAULT_PREFIX = "meshkit/config"
DEFAULT_WAIT = 30.0
DEFAULT_REQUEST_TIMEOUT = 5.0
ENV_TOKEN = "CONSUL_HTTP_TOKEN"
_MIN_QUERY_GAP = 0.05
_URL_PARAMS = ("prefix", "token", "wait", "request_timeout")


class ConsulKV(KV):
    """Config key-value store on Consul KV; see the module documentation."""

    def __init__(
        self,
        address: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        token: str | None = None,
        wait: float = DEFAULT_WAIT,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    ) -> None:
        host, sep, port_text = address.rpartition(":")
        if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ConfigError(f"expected consul://host:port, found {address!r}")
        self.host, self.port = host.strip("[]"), int(port_text)
        prefix = prefix.strip("/")
        if not prefix:
            raise ConfigError("expected a non-empty Consul key prefix")
        validate_key(prefix)
        self.prefix = prefix + "/"
        for name, value in (("wait", wait), ("request_timeout", request_timeout)):
            if not isinstance(value, int | float) or not 0 < value <= 600:
                raise ConfigError(f"expected {name} between 0 and 600 seconds, found {value!r}")
        self.wait = float(wait)
        self.request_timeout = float(request_timeout)
        self._token = token if token is not None else os.environ.get(ENV_TOKEN) or None
        self.url = f"consul://{address}"
        self._base = f"http://{address}"
        self._session: aiohttp.ClientSession | None = None
        #: prefix -> (index, entries): the last listing seen, the baseline of a watch.
        self._seen: dict[str, tuple[int, dict[str, Entry]]] = {}
        self._closed = False
        self._closed_event = asyncio.Event()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> ConsulKV:
        """``consul://host:port`` with optional ``?prefix=&token=&wait=&request_timeout=``."""
        parts = urlsplit(url)
        if parts.scheme != "consul" or not parts.netloc or "@" in parts.netloc:
            raise ConfigError(f"expected consul://host:port, found {redact_url(url)!r}")
        if parts.path not in ("", "/"):
            raise ConfigError(
                f"expected consul://host:port[?prefix=…], found a path in {redact_url(url)!r}"
            )
        params: dict[str, Any] = {}
        for name, values in parse_qs(parts.query, keep_blank_values=True).items():
            if name not in _URL_PARAMS:
                raise ConfigError(
                    f"expected consul:// parameters {', '.join(_URL_PARAMS)}, found {name!r}"
                )
            if name in ("prefix", "token"):
                params[name] = values[-1]
                continue
            try:
                params[name] = float(values[-1])
            except ValueError:
                raise ConfigError(f"expected {name} to be a number, found {values[-1]!r}") from None
        params.update(options)
        return cls(parts.netloc, **params)

    # -- HTTP -----------------------------------------------------------------------------

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"X-Consul-Token": self._token} if self._token else {}
            self._session = aiohttp.ClientSession(headers=headers)
        return self._session

    def _scrub(self, text: str) -> str:
        return text.replace(self._token, "<redacted>") if self._token else text

    async def _request(
        self,
        method: str,
        path: str,
        what: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        timeout: float | None = None,
    ) -> tuple[int, bytes, Mapping[str, str]]:
        if self._closed:
            raise Unavailable(f"config store {self.url} is closed")
        limit = aiohttp.ClientTimeout(total=timeout or self.request_timeout)
        try:
            async with self._http().request(
                method, self._base + path, params=params, json=body, timeout=limit
            ) as resp:
                return resp.status, await resp.read(), resp.headers
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            reason = self._scrub(str(exc) or type(exc).__name__)
            raise Unavailable(
                f"cannot reach the Consul agent at {self.host}:{self.port} to {what}: {reason}"
            ) from exc

    def _fail(self, status: int, body: bytes, what: str) -> Unavailable:
        text = self._scrub(body.decode("utf-8", "replace").strip()[:300])
        if status == 403:
            return Unavailable(
                f"Consul denied the request to {what} (ACL): {text}; set a token with "
                "key:read/write on the prefix (?token= or $CONSUL_HTTP_TOKEN)"
            )
        return Unavailable(f"Consul answered HTTP {status} to {what}: {text}")

    def _path(self, key: str) -> str:
        return "/v1/kv/" + quote(self.prefix + key, safe="/")

    async def _list(self, prefix: str, index: int | None = None) -> tuple[int, dict[str, Entry]]:
        what = f"read {self.prefix + prefix!r}"
        params = {"recurse": "true"}
        timeout = None
        if index is not None:
            params.update(index=str(index), wait=f"{self.wait:g}s")
            timeout = self.wait + self.wait / 16 + self.request_timeout
        status, body, headers = await self._request(
            "GET", self._path(prefix), what, params=params, timeout=timeout
        )
        if status not in (200, 404):
            raise self._fail(status, body, what)
        try:
            new_index = int(headers.get("X-Consul-Index", ""))
            items = json.loads(body) if status == 200 else []
            entries = {}
            cut = len(self.prefix)
            for item in items or []:
                raw = item.get("Value")
                value = base64.b64decode(raw).decode() if raw else ""
                key = item["Key"][cut:]
                entries[key] = Entry(key, value, int(item["ModifyIndex"]))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise Unavailable(f"Consul sent an unreadable answer to {what}: {exc}") from None
        return new_index, entries

    # -- the KV interface -----------------------------------------------------------------

    async def get(self, key: str) -> Entry | None:
        validate_key(key)
        what = f"read {self.prefix + key!r}"
        status, body, _ = await self._request("GET", self._path(key), what)
        if status == 404:
            return None
        if status != 200:
            raise self._fail(status, body, what)
        try:
            item = json.loads(body)[0]
            raw = item.get("Value")
            return Entry(
                key, base64.b64decode(raw).decode() if raw else "", int(item["ModifyIndex"])
            )
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise Unavailable(f"Consul sent an unreadable answer to {what}: {exc}") from None

    async def scan(self, prefix: str) -> Listing:
        validate_prefix(prefix)
        index, entries = await self._list(prefix)
        self._seen[prefix] = (index, entries)
        return Listing(entries, index)

    async def txn(self, compares: Sequence[tuple[str, int]], ops: Sequence[Put | Delete]) -> bool:
        body: list[dict[str, Any]] = []
        for key, expected in compares:
            full = self.prefix + validate_key(key)
            if expected == 0:
                body.append({"KV": {"Verb": "check-not-exists", "Key": full}})
            else:
                body.append({"KV": {"Verb": "check-index", "Key": full, "Index": expected}})
        for op in ops:
            full = self.prefix + validate_key(op.key)
            if isinstance(op, Put):
                value = base64.b64encode(op.value.encode()).decode()
                body.append({"KV": {"Verb": "set", "Key": full, "Value": value}})
            else:
                body.append({"KV": {"Verb": "delete", "Key": full}})
        what = "apply a config transaction"
        status, data, _ = await self._request("PUT", "/v1/txn", what, body=body)
        if status == 200:
            return True
        if status == 409:
            try:
                errors = json.loads(data).get("Errors") or []
                if errors and all(int(e.get("OpIndex", -1)) < len(compares) for e in errors):
                    return False  # a comparison failed: someone else wrote first
            except (ValueError, AttributeError, TypeError):
                pass
        raise self._fail(status, data, what)

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[list[Event]]:
        validate_prefix(prefix)
        seen = self._seen.get(prefix)
        if seen is None or seen[0] != start_revision - 1:
            raise Compacted(f"no Consul listing of {prefix!r} at index {start_revision - 1}")
        index, entries = seen
        loop = asyncio.get_running_loop()
        while not self._closed:
            started = loop.time()
            new_index, new_entries = await self._list(prefix, max(index, 1))
            if new_index < index:
                self._seen.pop(prefix, None)
                raise Compacted(f"the Consul index went backwards ({index} -> {new_index})")
            events = _diff(entries, new_entries, new_index)
            index, entries = new_index, new_entries
            self._seen[prefix] = (index, entries)
            if events:
                yield events
            gap = _MIN_QUERY_GAP - (loop.time() - started)
            if gap > 0:
                await asyncio.sleep(gap)

    async def close(self) -> None:
        self._closed = True
        self._closed_event.set()
        if self._session is not None:
            await self._session.close()


def _diff(old: Mapping[str, Entry], new: Mapping[str, Entry], index: int) -> list[Event]:
    events = [
        Event("put", key, entry.value, entry.mod_revision)
        for key, entry in new.items()
        if key not in old or old[key].mod_revision != entry.mod_revision
    ]
    events += [Event("delete", key, None, index) for key in old if key not in new]
    events.sort(key=lambda e: e.revision)
    return events
