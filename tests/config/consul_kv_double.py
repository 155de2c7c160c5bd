"""An in-process HTTP double of the Consul KV endpoints :mod:`meshkit.config.consul` uses.

Like ``tests/consul_double.py`` (the agent/health double of the registry), it exists
because no Consul binary is installable here; tests marked ``consul_contract`` run against
it unless ``MESHKIT_CONSUL_ADDR`` names a real agent. Behaviours reproduced, from the
Consul HTTP API docs (api-docs/kv, api-docs/txn, features/blocking) and the state store:

* ``GET /v1/kv/<key>``: ``[{"Key", "Value" (base64, null when empty), "Flags",
  "LockIndex", "CreateIndex", "ModifyIndex"}]``; 404 (empty body) when missing.
  ``?recurse`` (bare or a Go ``ParseBool`` value) returns every key with that prefix, 404
  when none. ``X-Consul-Index`` on every answer, 200 or 404: for a prefix, the highest
  ``ModifyIndex`` of its keys and of its tombstones (deleted keys), else the KV table's
  index (``max(1, …)``: the index is never 0).
* Blocking queries: ``?index=N`` (N > 0) waits until that index exceeds N or ``wait``
  (default 5 m, at most 10 m, plus up to ``wait/16`` jitter) passes; 400 ``Invalid index``
  or ``Invalid wait time`` for bad values.
* ``PUT /v1/kv/<key>`` (body: the raw value) → ``true``; ``?cas=0`` only if absent,
  ``?cas=N`` only if ``ModifyIndex == N`` (else ``false``). ``DELETE /v1/kv/<key>`` → ``true``.
* ``PUT /v1/txn``: a JSON list of ``{"KV": {"Verb", "Key", "Value", "Index"}}`` with verbs
  ``set``, ``cas``, ``delete``, ``check-index``, ``check-not-exists``, ``get``; at most 64
  operations (413 otherwise… Consul answers 413 "Transaction contains too many
  operations"); all applied at one raft index, or none: 409 ``{"Results": null, "Errors":
  [{"OpIndex", "What"}]}`` when a check fails; 400 for an unknown verb or malformed body.
* ACLs (``acl_token=``): a request without the token gets 403 ``Permission denied``.
* Every other method is a 405. Fault injection: :meth:`stop`/:meth:`start` take the
  listener down and up on the same port; :meth:`set_index` moves the raft index
  backwards (as after a snapshot restore). :attr:`requests` counts requests by path.

Not reproduced: sessions/locks, ``?keys``, ``?separator``, ``?raw``, ``Flags`` updates,
consistency modes, namespaces and datacenters.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

from aiohttp import web

MAX_WAIT = 600.0
DEFAULT_WAIT = 300.0
MAX_TXN_OPS = 64
_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_BOOLS = _TRUE | {"0", "f", "F", "FALSE", "false", "False"}


@dataclass
class _Key:
    value: bytes
    create_index: int
    modify_index: int

    def to_json(self, key: str) -> dict[str, Any]:
        return {
            "Key": key,
            "Value": base64.b64encode(self.value).decode() if self.value else None,
            "Flags": 0,
            "LockIndex": 0,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


def _parse_wait(text: str) -> float | None:
    units = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    for suffix in ("ms", "s", "m", "h"):
        if text.endswith(suffix) and text[: -len(suffix)].replace(".", "", 1).isdigit():
            return float(text[: -len(suffix)]) * units[suffix]
    return float(text) if text.isdigit() else None


class ConsulKVDouble:
    """The double; ``async with ConsulKVDouble() as consul: consul.address``."""

    def __init__(self, *, acl_token: str | None = None) -> None:
        self.acl_token = acl_token
        self.index = 1
        self.kv: dict[str, _Key] = {}
        self.tombstones: dict[str, int] = {}
        self.requests: Counter[str] = Counter()
        self.port = 0
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/v1/kv/{key:.*}", self._kv)
        app.router.add_route("*", "/v1/txn", self._txn)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()
        if not self.port:
            server = self._site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = self._site = None

    async def __aenter__(self) -> ConsulKVDouble:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def set_index(self, index: int) -> None:
        self.index = index
        self._wake()

    # -- state --------------------------------------------------------------------------

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _prefix_index(self, prefix: str, recurse: bool) -> int:
        def under(key: str) -> bool:
            return key.startswith(prefix) if recurse else key == prefix

        found = [k.modify_index for key, k in self.kv.items() if under(key)]
        found += [i for key, i in self.tombstones.items() if under(key)]
        return max(1, max(found) if found else self.index)

    def _write(self, key: str, value: bytes, index: int) -> None:
        old = self.kv.get(key)
        self.kv[key] = _Key(value, old.create_index if old else index, index)
        self.tombstones.pop(key, None)

    def _delete(self, key: str, index: int) -> None:
        if self.kv.pop(key, None) is not None:
            self.tombstones[key] = index

    # -- handlers -----------------------------------------------------------------------

    def _denied(self, request: web.Request) -> web.Response | None:
        if self.acl_token is None:
            return None
        if request.headers.get("X-Consul-Token") != self.acl_token:
            return web.Response(status=403, text="Permission denied")
        return None

    async def _kv(self, request: web.Request) -> web.StreamResponse:
        self.requests[request.path] += 1
        if (denied := self._denied(request)) is not None:
            return denied
        key = request.match_info["key"]
        if request.method == "GET":
            return await self._get(request, key)
        if request.method == "PUT":
            body = await request.read()
            cas = request.query.get("cas")
            if cas is not None:
                if not cas.isdigit():
                    return web.Response(status=400, text="Invalid CAS index")
                current = self.kv.get(key)
                expected = int(cas)
                if (current.modify_index if current else 0) != expected:
                    return web.json_response(False)
            self.index += 1
            self._write(key, body, self.index)
            self._wake()
            return web.json_response(True)
        if request.method == "DELETE":
            self.index += 1
            self._delete(key, self.index)
            self._wake()
            return web.json_response(True)
        return web.Response(status=405)

    async def _get(self, request: web.Request, key: str) -> web.StreamResponse:
        raw_recurse = request.query.get("recurse")
        if raw_recurse is not None and raw_recurse not in _BOOLS and raw_recurse != "":
            return web.Response(status=400, text="Invalid value for ?recurse")
        recurse = raw_recurse is not None and (raw_recurse == "" or raw_recurse in _TRUE)
        if "index" in request.query:
            text = request.query["index"]
            if not text.isdigit():
                return web.Response(status=400, text="Invalid index")
            wait_text = request.query.get("wait")
            wait = DEFAULT_WAIT if wait_text is None else _parse_wait(wait_text)
            if wait is None:
                return web.Response(status=400, text="Invalid wait time")
            wait = min(wait, MAX_WAIT)
            wait += random.uniform(0, wait / 16)
            target = int(text)
            deadline = asyncio.get_running_loop().time() + wait
            while target > 0 and self._prefix_index(key, recurse) <= target:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                changed = self._changed
                try:
                    await asyncio.wait_for(changed.wait(), remaining)
                except TimeoutError:
                    break
        index = self._prefix_index(key, recurse)
        headers = {
            "X-Consul-Index": str(index),
            "X-Consul-KnownLeader": "true",
            "X-Consul-LastContact": "0",
        }
        if recurse:
            items = [k.to_json(name) for name, k in sorted(self.kv.items()) if name.startswith(key)]
        else:
            items = [self.kv[key].to_json(key)] if key in self.kv else []
        if not items:
            return web.Response(status=404, headers=headers)
        return web.json_response(items, headers=headers)

    async def _txn(self, request: web.Request) -> web.StreamResponse:
        self.requests[request.path] += 1
        if request.method != "PUT":
            return web.Response(status=405)
        if (denied := self._denied(request)) is not None:
            return denied
        try:
            ops = json.loads(await request.read())
            if not isinstance(ops, list):
                raise ValueError("expected a list")
        except ValueError as exc:
            return web.Response(status=400, text=f"Failed to parse body: {exc}")
        if len(ops) > MAX_TXN_OPS:
            return web.Response(
                status=413,
                text=f"Transaction contains too many operations ({len(ops)} > {MAX_TXN_OPS})",
            )
        errors = []
        staged = dict(self.kv)
        for i, op in enumerate(ops):
            kv = op.get("KV") if isinstance(op, dict) else None
            if not isinstance(kv, dict) or "Verb" not in kv or "Key" not in kv:
                return web.Response(status=400, text=f"Failed to parse body: operation {i}")
            verb, key = kv["Verb"], kv["Key"]
            current = staged.get(key)
            have = current.modify_index if current else 0
            if verb == "check-not-exists" and current is not None:
                errors.append({"OpIndex": i, "What": f'key "{key}" exists'})
            elif verb in ("check-index", "cas") and (
                (current.modify_index if current else 0) != int(kv.get("Index", 0))
            ):
                errors.append(
                    {
                        "OpIndex": i,
                        "What": f"current modify index {have} != {kv.get('Index')}",
                    }
                )
            elif verb not in ("set", "cas", "delete", "check-index", "check-not-exists", "get"):
                return web.Response(status=400, text=f'Invalid verb "{verb}"')
        if errors:
            return web.json_response({"Results": None, "Errors": errors}, status=409)
        self.index += 1
        results = []
        for op in ops:
            kv = op["KV"]
            if kv["Verb"] in ("set", "cas"):
                value = base64.b64decode(kv.get("Value") or "")
                self._write(kv["Key"], value, self.index)
                results.append({"KV": {**self.kv[kv["Key"]].to_json(kv["Key"]), "Value": None}})
            elif kv["Verb"] == "delete":
                self._delete(kv["Key"], self.index)
        self._wake()
        return web.json_response(
            {"Results": results, "Errors": None}, headers={"X-Consul-Index": str(self.index)}
        )
