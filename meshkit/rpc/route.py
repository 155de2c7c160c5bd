"""Gray-release routing: send chosen traffic to chosen instances, the rest to the stable pool.

A :class:`RoutingTable` is an endpoint selector for the pick stage (see
:mod:`meshkit.rpc.pick`). It holds an ordered list of :class:`RouteRule`. For each
attempt the first rule that *matches the call* and whose *target* has an instance in
the current snapshot wins, and the call goes to the instances of that target; calls
that no rule takes go to the *stable pool*. Routing never fails a call by itself (unless
asked to, with ``fallback_to_stable=False``): when a rule's target has no instance the
call falls back to the stable pool, and when the stable pool is empty it goes to every
endpoint. What happened is recorded on the call as ``ctx.extras["route"]`` (for tracing
and access logs):

* ``"<rule name>"`` — the rule matched; the call goes to its target;
* ``"stable"`` — no rule matched; the call goes to the stable pool;
* ``"fallback:no-target:<rule>"`` — the rule matched but no instance has its target tags;
  the call goes to the stable pool;
* ``"fallback:tried:<rule>"`` — the rule matched but this call (a retry) already tried
  every instance of its target; the call goes to the stable pool;
* ``"fallback:no-stable"`` — no rule matched and the stable pool is empty; the call goes
  to every endpoint;
* ``"fallback:no-target:<rule>,no-stable"``, ``"fallback:tried:<rule>,no-stable"`` — a
  fallback to a stable pool that is empty: the call goes to every endpoint.

(When several matching rules are unavailable, the first of them is named.)

**Matching a call.** A rule matches when *all* of its conditions hold (a rule without
conditions matches every call):

* ``methods`` — the IDL method called is one of these;
* ``caller`` — the calling service (``ctx.caller``, the client's ``caller=``, sent as
  ``meshkit-caller``) is one of these;
* ``headers`` — for each key, the request header (call metadata, e.g. ``user-id``,
  ``device``, ``region``) is present and equals the string, or is one of the list of
  strings, or fully matches the regular expression ``{"re": "..."}`` (``re.fullmatch``);
  header names are compared exactly;
* ``percent`` (0 to 100, default 100) — only this share of the calls that pass the other
  conditions match. With ``hash_key`` (a header name such as ``"user-id"``) the choice is
  sticky: ``md5(salt + ":" + value)``, first 4 bytes big-endian, is below
  ``percent / 100 * 2**32``, where ``salt`` defaults to the rule's name. So a given user
  always lands on the same side, in every client process; raising ``percent`` only adds
  users; and two rules with different salts split users independently (set the same
  ``salt`` on rules, or in the tables of several services, to pick the same users). A call
  without that header (or a rule without ``hash_key``) is drawn at random.

Percent is the share of the traffic *reaching* the rule: rules are tried in order, so a
10 % rule after another 10 % rule on the same calls gets 10 % of the remaining 90 %.

**Targets and the stable pool.** A target is a tag selector: an endpoint is in it when
each of its tags equals the given string (``{"canary": "true"}``, ``{"version":
"2.0.0"}``, ``{"zone": "b"}``). An endpoint's tags are those of its instance record plus
``version``. The stable pool is the endpoints matching ``stable`` (a tag selector) when
given; by default (``stable=None``) it is the endpoints that *no rule's target selects*
(with a canary rule: the non-canary instances) — so with rules targeting everyday tags
such as ``zone``, give ``stable`` explicitly.

**Rules are data.** :meth:`RoutingTable.from_dict` reads, and :meth:`RoutingTable.to_dict`
writes, a JSON-safe form (validated; a mistake raises :class:`~meshkit.errors.InvalidArgument`
naming the rule and field, what was expected and what was found)::

    {
      "stable": {"canary": "false"},          # optional; null/absent: not targeted by any rule
      "fallback_to_stable": true,             # optional (default true)
      "rules": [                              # tried in order; the first that applies wins
        {
          "name": "beta-users",               # required; unique; not "stable"/"fallback:…"
          "target": {"canary": "true"},       # required; non-empty; string values
          "methods": ["echo", "reverse"],     # optional; null/absent: any method
          "caller": ["web", "gateway"],       # optional; null/absent: any caller
          "headers": {                        # optional; all must hold
            "user-id": ["42", "43"],          #   one of these values
            "region": "eu",                   #   exactly this value
            "device": {"re": "ios|android"}   #   fully matches this regular expression
          },
          "percent": 10,                      # optional, 0..100 (default 100)
          "hash_key": "user-id",              # optional: sticky by this header's value
          "salt": "beta"                      # optional: the hash salt (default: name)
        }
      ]
    }

:meth:`RoutingTable.update` installs new rules with one reference swap, so calls in
flight see either the old table or the new one, never a mix (live reload from config).

**Cost.** The target and stable partitions are computed once per snapshot (the resolver
returns the same tuple object until discovery changes, which is how a snapshot is
recognised) and returned as the same tuples each time, so balancers' caches keep hitting.
A call then costs one pass over the rules' conditions: a few set and dict lookups per
rule, plus one md5 for a sticky percent rule. Place the table first among the selectors
(or after selectors that return the same object for the same snapshot); a selector before
it that builds a new list per call makes it re-partition on every call.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import EllipsisType, MappingProxyType
from typing import Any, NoReturn

from ..errors import InvalidArgument, NoInstances
from .context import CallContext
from .endpoint import Endpoint

__all__ = ["ROUTE_KEY", "Regex", "RouteRule", "RoutingTable"]

#: The key of ``ctx.extras`` where the routing decision of the attempt is recorded.
ROUTE_KEY = "route"

STABLE = "stable"
FALLBACK = "fallback:"

_RULE_KEYS = ("name", "target", "methods", "caller", "headers", "percent", "hash_key", "salt")
_TABLE_KEYS = ("rules", "stable", "fallback_to_stable")
_SPAN = 1 << 32


def _show(value: object) -> str:
    """``found`` text for an error: the type and a bounded repr."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(value).__name__} {text}"


def _fail(where: str, what: str, expected: str, found: object) -> NoReturn:
    raise InvalidArgument(f"{where}: {what}: expected {expected}, found {_show(found)}")


def _tag_selector(where: str, what: str, value: object) -> Mapping[str, str]:
    """Validate a tag selector (non-empty mapping of non-empty str → str); a read-only copy."""
    if not isinstance(value, Mapping):
        _fail(where, what, 'a mapping of tag to value, such as {"canary": "true"}', value)
    if not value:
        _fail(where, what, "at least one tag", value)
    for key, tag_value in value.items():
        if not isinstance(key, str) or not key:
            _fail(where, f"{what} key", "a non-empty tag name (string)", key)
        if not isinstance(tag_value, str):
            _fail(
                where,
                f"{what}[{key!r}]",
                'a string (tags are strings: write "true", "2.0.0")',
                tag_value,
            )
    return MappingProxyType(dict(value))


def _names(where: str, what: str, value: object) -> frozenset[str] | None:
    """Validate an optional non-empty collection of non-empty strings."""
    if value is None:
        return None
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        _fail(where, what, "a list of names (or null for any)", value)
    names = list(value)
    if not names:
        _fail(where, what, "at least one name (or null for any)", value)
    for name in names:
        if not isinstance(name, str) or not name:
            _fail(where, f"{what} item", "a non-empty string", name)
    return frozenset(names)


def _having(endpoints: Sequence[Endpoint], selector: Mapping[str, str]) -> tuple[Endpoint, ...]:
    """The endpoints whose tags include every item of ``selector``."""
    if len(selector) == 1:
        ((key, value),) = selector.items()
        return tuple(e for e in endpoints if e.tags.get(key) == value)
    items = tuple(selector.items())
    return tuple(e for e in endpoints if all(e.tags.get(k) == v for k, v in items))


def _bucket(salt: str, value: str) -> int:
    """The sticky hash of a key: first 4 bytes of ``md5(salt:value)``, big-endian."""
    digest = hashlib.md5(f"{salt}:{value}".encode(), usedforsecurity=False).digest()
    return int.from_bytes(digest[:4], "big")


# ------------------------------------------------------------------ rules


@dataclass(frozen=True, slots=True)
class Regex:
    """A header condition that holds when the whole header value matches ``pattern``.

    In the dict form it is written ``{"re": "<pattern>"}``.
    """

    pattern: str
    compiled: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str):
            raise InvalidArgument(
                f"expected a regular expression (string), found {_show(self.pattern)}"
            )
        try:
            compiled = re.compile(self.pattern)
        except re.error as exc:
            raise InvalidArgument(
                f"expected a valid regular expression, found {self.pattern!r} ({exc})"
            ) from None
        object.__setattr__(self, "compiled", compiled)


#: A header condition: an exact value, any of several values, or a regular expression.
HeaderCondition = str | tuple[str, ...] | Regex


@dataclass(frozen=True, slots=True)
class RouteRule:
    """One routing rule: calls matching all its conditions go to the ``target`` instances.

    ``target`` is a tag selector (``{"canary": "true"}``). Conditions, all optional:
    ``methods`` and ``caller`` (collections of names; ``None`` = any), ``headers``
    (header name → exact string, a list of strings, a :class:`Regex` or
    ``{"re": pattern}``), ``percent`` (the share, 0 to 100, of the otherwise matching calls;
    sticky per value of the ``hash_key`` header, hashed with ``salt``, default the
    name). See the module documentation for the exact semantics.

    Arguments are validated and normalised (name collections to frozensets, lists of
    header values to tuples, ``{"re": ...}`` to :class:`Regex`, mappings to read-only
    copies); a bad one raises :class:`~meshkit.errors.InvalidArgument`.
    """

    name: str
    target: Mapping[str, str] = field(hash=False)
    methods: Collection[str] | None = None
    caller: Collection[str] | None = None
    headers: Mapping[str, Any] = field(default_factory=dict, hash=False)
    percent: float = 100
    hash_key: str | None = None
    salt: str | None = None
    # compiled form of the conditions, for matches()
    _checks: tuple[tuple[str, Callable[[str], object]], ...] = field(
        init=False, repr=False, compare=False, hash=False, default=()
    )
    _threshold: int = field(init=False, repr=False, compare=False, hash=False, default=_SPAN)
    _salt: str = field(init=False, repr=False, compare=False, hash=False, default="")

    def __post_init__(self) -> None:
        name = self.name
        if not isinstance(name, str) or not name.strip():
            _fail("route rule", "name", "a non-empty string", name)
        if name == STABLE or name.startswith(FALLBACK):
            _fail(
                "route rule",
                "name",
                f"a name other than {STABLE!r} or {FALLBACK}… (they are route records)",
                name,
            )
        where = f"route rule {name!r}"
        setattr_ = object.__setattr__
        setattr_(self, "target", _tag_selector(where, "target", self.target))
        setattr_(self, "methods", _names(where, "methods", self.methods))
        setattr_(self, "caller", _names(where, "caller", self.caller))
        headers, checks = self._compile_headers(where, self.headers)
        setattr_(self, "headers", headers)
        setattr_(self, "_checks", checks)
        percent = self.percent
        if (
            isinstance(percent, bool)
            or not isinstance(percent, int | float)
            or not math.isfinite(percent)
            or not 0 <= percent <= 100
        ):
            _fail(where, "percent", "a number from 0 to 100", percent)
        setattr_(self, "_threshold", math.floor(percent / 100 * _SPAN))
        if self.hash_key is not None and (not isinstance(self.hash_key, str) or not self.hash_key):
            _fail(where, "hash_key", "a header name (non-empty string) or null", self.hash_key)
        if self.salt is not None and not isinstance(self.salt, str):
            _fail(where, "salt", "a string or null (default: the rule's name)", self.salt)
        setattr_(self, "_salt", name if self.salt is None else self.salt)

    @staticmethod
    def _compile_headers(
        where: str, headers: object
    ) -> tuple[Mapping[str, HeaderCondition], tuple[tuple[str, Callable[[str], object]], ...]]:
        if not isinstance(headers, Mapping):
            _fail(where, "headers", "a mapping of header name to condition", headers)
        normal: dict[str, HeaderCondition] = {}
        checks: list[tuple[str, Callable[[str], object]]] = []
        for key, cond in headers.items():
            what = f"headers[{key!r}]"
            if not isinstance(key, str) or not key:
                _fail(where, "headers key", "a non-empty header name (string)", key)
            check: Callable[[str], object]
            if isinstance(cond, str):
                normal[key] = cond
                check = cond.__eq__
            elif isinstance(cond, Regex):
                normal[key] = cond
                check = cond.compiled.fullmatch
            elif isinstance(cond, Mapping):
                if set(cond) != {"re"}:
                    _fail(where, what, 'a regular expression written {"re": "<pattern>"}', cond)
                try:
                    regex = Regex(cond["re"])
                except InvalidArgument as exc:
                    raise InvalidArgument(f"{where}: {what}: {exc.message}") from None
                normal[key] = regex
                check = regex.compiled.fullmatch
            elif isinstance(cond, list | tuple | set | frozenset):
                values = tuple(cond)
                if not values:
                    _fail(where, what, "at least one value", cond)
                for value in values:
                    if not isinstance(value, str):
                        _fail(where, f"{what} item", "a string (header values are strings)", value)
                normal[key] = values
                check = frozenset(values).__contains__
            else:
                _fail(
                    where,
                    what,
                    'a string, a list of strings, or {"re": "<pattern>"}',
                    cond,
                )
            checks.append((key, check))
        return MappingProxyType(normal), tuple(checks)

    def matches(self, ctx: CallContext, rand: Callable[[], float] = random.random) -> bool:
        """Whether this call meets every condition (``rand`` draws the unsticky percent)."""
        methods = self.methods
        if methods is not None and ctx.method not in methods:
            return False
        caller = self.caller
        if caller is not None and ctx.caller not in caller:
            return False
        headers = ctx.headers
        for key, check in self._checks:
            value = headers.get(key)
            if value is None or not check(value):
                return False
        threshold = self._threshold
        if threshold >= _SPAN:
            return True
        if threshold <= 0:
            return False
        key_name = self.hash_key
        if key_name is not None:
            value = headers.get(key_name)
            if value:
                return _bucket(self._salt, value) < threshold
        return rand() * _SPAN < threshold

    def to_dict(self) -> dict[str, Any]:
        """The JSON-safe form (only the conditions that are set)."""
        out: dict[str, Any] = {"name": self.name, "target": dict(self.target)}
        if self.methods is not None:
            out["methods"] = sorted(self.methods)
        if self.caller is not None:
            out["caller"] = sorted(self.caller)
        if self.headers:
            out["headers"] = {
                key: (
                    {"re": cond.pattern}
                    if isinstance(cond, Regex)
                    else list(cond)
                    if isinstance(cond, tuple)
                    else cond
                )
                for key, cond in self.headers.items()
            }
        if self.percent != 100:
            out["percent"] = self.percent
        if self.hash_key is not None:
            out["hash_key"] = self.hash_key
        if self.salt is not None:
            out["salt"] = self.salt
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RouteRule:
        """A rule from its dict form (see the module documentation); validated."""
        if not isinstance(data, Mapping):
            _fail("route rule", "rule", "a mapping with at least name and target", data)
        label = f"route rule {data.get('name')!r}" if "name" in data else "route rule"
        unknown = [k for k in data if k not in _RULE_KEYS]
        if unknown:
            raise InvalidArgument(
                f"{label}: expected keys among {', '.join(_RULE_KEYS)}, "
                f"found unknown {', '.join(map(repr, unknown))}"
            )
        missing = [k for k in ("name", "target") if k not in data]
        if missing:
            raise InvalidArgument(f"{label}: expected {' and '.join(missing)}, found none")
        options = dict(data)
        if options.get("headers") is None:
            options.pop("headers", None)
        if options.get("percent") is None:
            options.pop("percent", None)
        return cls(**options)


# ------------------------------------------------------------------ table


class _Partition:
    """The routing pools of one snapshot."""

    __slots__ = ("source", "stable", "stable_route", "targets", "unavailable")

    def __init__(
        self,
        source: Sequence[Endpoint],
        targets: tuple[Sequence[Endpoint], ...],
        stable: Sequence[Endpoint],
        no_stable: bool,
        rules: tuple[RouteRule, ...],
    ) -> None:
        self.source = source
        self.targets = targets
        self.stable = stable
        suffix = ",no-stable" if no_stable else ""
        self.stable_route = f"{FALLBACK}no-stable" if no_stable else STABLE
        # per rule: the route records of falling back (no target, target all tried)
        self.unavailable = tuple(
            (f"{FALLBACK}no-target:{r.name}{suffix}", f"{FALLBACK}tried:{r.name}{suffix}")
            for r in rules
        )


class _State:
    """One version of the table: replaced whole by update(), never changed in place

    (except for the partition cache, which is derived from the rest).
    """

    __slots__ = ("fallback_to_stable", "partition", "rules", "stable")

    def __init__(
        self,
        rules: tuple[RouteRule, ...],
        stable: Mapping[str, str] | None,
        fallback_to_stable: bool,
    ) -> None:
        self.rules = rules
        self.stable = stable
        self.fallback_to_stable = fallback_to_stable
        self.partition: _Partition | None = None

    def classify(self, endpoints: Sequence[Endpoint]) -> _Partition:
        pools: dict[frozenset[tuple[str, str]], Sequence[Endpoint]] = {}
        targets: list[Sequence[Endpoint]] = []
        for rule in self.rules:
            key = frozenset(rule.target.items())
            pool = pools.get(key)
            if pool is None:
                chosen = _having(endpoints, rule.target)
                pool = pools[key] = endpoints if len(chosen) == len(endpoints) else chosen
            targets.append(pool)
        if self.stable is not None:
            stable = _having(endpoints, self.stable)
        else:
            targeted = {id(e) for pool in pools.values() for e in pool}
            stable = tuple(e for e in endpoints if id(e) not in targeted)
        no_stable = not stable
        part = _Partition(
            endpoints,
            tuple(targets),
            endpoints if no_stable or len(stable) == len(endpoints) else stable,
            no_stable,
            self.rules,
        )
        self.partition = part
        return part


def _check_rules(rules: object) -> tuple[RouteRule, ...]:
    if isinstance(rules, str | bytes | Mapping) or not isinstance(rules, Iterable):
        _fail("routing table", "rules", "a list of RouteRule", rules)
    out = tuple(rules)
    seen: set[str] = set()
    for i, rule in enumerate(out):
        if not isinstance(rule, RouteRule):
            _fail("routing table", f"rules[{i}]", "a RouteRule", rule)
        if rule.name in seen:
            _fail("routing table", f"rules[{i}] name", "a name no earlier rule has", rule.name)
        seen.add(rule.name)
    return out


class RoutingTable:
    """Gray-release routing as an endpoint selector: ``Pick(..., selectors=[table])``.

    ``rules`` are tried in order; ``stable`` is the tag selector of the stable pool
    (``None``: the endpoints no rule's target selects); with ``fallback_to_stable``
    false, a call that a rule takes but whose target has no instance fails with
    :class:`~meshkit.errors.NoInstances` instead of going to the stable pool (it then
    never leaves the target, even on retries). ``rng`` draws the non-sticky percent
    (tests pass a seeded :class:`random.Random`). See the module documentation.
    """

    name = "route"

    def __init__(
        self,
        rules: Sequence[RouteRule] = (),
        stable: Mapping[str, str] | None = None,
        fallback_to_stable: bool = True,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self._random = (rng or random.Random()).random
        self._state = self._make_state(rules, stable, fallback_to_stable)

    @staticmethod
    def _make_state(
        rules: Sequence[RouteRule], stable: Mapping[str, str] | None, fallback_to_stable: object
    ) -> _State:
        checked = _check_rules(rules)
        selector = None if stable is None else _tag_selector("routing table", "stable", stable)
        if not isinstance(fallback_to_stable, bool):
            _fail("routing table", "fallback_to_stable", "true or false", fallback_to_stable)
        return _State(checked, selector, fallback_to_stable)

    # -- the table as data

    @property
    def rules(self) -> tuple[RouteRule, ...]:
        """The rules in force."""
        return self._state.rules

    @property
    def stable(self) -> Mapping[str, str] | None:
        """The stable pool's tag selector (``None``: endpoints no rule targets)."""
        return self._state.stable

    @property
    def fallback_to_stable(self) -> bool:
        """Whether a call whose rule has no instance goes to the stable pool (or fails)."""
        return self._state.fallback_to_stable

    def update(
        self,
        rules: Sequence[RouteRule] | RoutingTable,
        *,
        stable: Mapping[str, str] | EllipsisType | None = ...,
        fallback_to_stable: bool | None = None,
    ) -> None:
        """Install new rules atomically (one reference swap; validated first).

        Given another :class:`RoutingTable` (e.g. ``RoutingTable.from_dict(new_config)``),
        take its rules, stable selector and fallback setting at once. Otherwise
        ``stable`` and ``fallback_to_stable`` keep their values unless given.
        """
        current = self._state
        if isinstance(rules, RoutingTable):
            other = rules._state
            rules, new_stable, new_fallback = other.rules, other.stable, other.fallback_to_stable
        else:
            new_stable = current.stable if isinstance(stable, EllipsisType) else stable
            new_fallback = (
                current.fallback_to_stable if fallback_to_stable is None else fallback_to_stable
            )
        self._state = self._make_state(rules, new_stable, new_fallback)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-safe form read by :meth:`from_dict`."""
        state = self._state
        return {
            "rules": [rule.to_dict() for rule in state.rules],
            "stable": None if state.stable is None else dict(state.stable),
            "fallback_to_stable": state.fallback_to_stable,
        }

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, rng: random.Random | None = None
    ) -> RoutingTable:
        """A table from its dict form (see the module documentation); validated.

        Raises :class:`~meshkit.errors.InvalidArgument` naming the rule (by position and
        name) and the field, with what was expected and what was found.
        """
        if not isinstance(data, Mapping):
            _fail("routing table", "table", 'a mapping such as {"rules": [...]}', data)
        unknown = [k for k in data if k not in _TABLE_KEYS]
        if unknown:
            raise InvalidArgument(
                f"routing table: expected keys among {', '.join(_TABLE_KEYS)}, "
                f"found unknown {', '.join(map(repr, unknown))}"
            )
        raw_rules = data.get("rules")
        if raw_rules is None:
            raw_rules = []
        if not isinstance(raw_rules, list | tuple):
            _fail("routing table", "rules", "a list of rules", raw_rules)
        rules = []
        for i, raw in enumerate(raw_rules):
            try:
                rules.append(RouteRule.from_dict(raw))
            except InvalidArgument as exc:
                raise InvalidArgument(f"rules[{i}]: {exc.message}") from None
        fallback = data.get("fallback_to_stable")
        return cls(
            rules,
            stable=data.get("stable"),
            fallback_to_stable=True if fallback is None else fallback,
            rng=rng,
        )

    # -- the selector

    def select(self, endpoints: Sequence[Endpoint], ctx: CallContext) -> Sequence[Endpoint]:
        """The endpoints this attempt may use; records the decision in ``ctx.extras``."""
        state = self._state
        part = state.partition
        if part is None or part.source is not endpoints:
            part = state.classify(endpoints)
        rand = self._random
        tried = ctx.tried
        strict = not state.fallback_to_stable
        first = -1  # the first matching rule that cannot take the call
        why = 0  # 0: its target has no instance; 1: all of them were tried by this call
        for i, (rule, target) in enumerate(zip(state.rules, part.targets, strict=True)):
            if not rule.matches(ctx, rand):
                continue
            if target and (strict or not tried or not all(e in tried for e in target)):
                ctx.extras[ROUTE_KEY] = rule.name
                return target
            if first < 0:
                first, why = i, 1 if target else 0
        if first < 0:
            ctx.extras[ROUTE_KEY] = part.stable_route
            return part.stable
        if strict:
            rule = state.rules[first]
            ctx.extras[ROUTE_KEY] = rule.name
            raise NoInstances(
                f"expected an instance of {ctx.service!r} with tags {dict(rule.target)} "
                f"for route rule {rule.name!r} (fallback_to_stable is off), found none "
                f"among {len(endpoints)} endpoints"
            )
        ctx.extras[ROUTE_KEY] = part.unavailable[first][why]
        return part.stable

    def __repr__(self) -> str:
        state = self._state
        names = ", ".join(rule.name for rule in state.rules)
        return f"<RoutingTable [{names}] stable={dict(state.stable) if state.stable else None}>"
