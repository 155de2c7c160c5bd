"""``meshkit config``: read, change, roll back and gray-release service configuration.

::

    meshkit config set echo limit 20 -m "more headroom"     # publish, then wait for the acks
    meshkit config get echo [limit]
    meshkit config history echo
    meshkit config diff echo 3 5
    meshkit config rollback echo 3
    meshkit config edit echo                               # $EDITOR on the JSON document
    meshkit config replace echo echo.toml                  # publish a whole file
    meshkit config show echo                               # effective value + layer, per instance
    meshkit config status echo                             # which version each instance runs
    meshkit config gray publish echo limit 30 --tag canary=true
    meshkit config gray promote echo  |  meshkit config gray abort echo

The store is ``--store`` or ``$MESHKIT_CONFIG`` (default ``local://``). Values are JSON
(``5``, ``true``, ``"text"``, ``[1, 2]``, ``{"a": 1}``); ``--string`` takes the text as is.
Publishing commands wait up to ``--wait`` seconds (default 5) for the running instances
to report and print which applied the version and which rejected it (exit 1 if any
rejected or did not answer). Keys that instances' schemas mark secret (and keys named like
passwords, tokens or secrets) are masked unless ``--show-secrets``.

Exit codes: 0 success; 1 the store failed, or an instance rejected / did not apply the
version; 2 bad input (unknown service, key or version, malformed value, file or URL).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import re
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, NoReturn, TypeVar

import click

__all__ = ["config"]

T = TypeVar("T")
USAGE_ERROR = 2
FAILURE = 1
DEFAULT_WAIT = 5.0
#: A status record older than this is from an instance that is gone (they refresh every 15 s).
STALE_AFTER = 45.0
_SECRET_NAME = re.compile(
    r"(pass(word)?|secret|token|api[_-]?key|private[_-]?key|credential)", re.I
)


class _UsageError(click.ClickException):
    exit_code = USAGE_ERROR


class _Failure(click.ClickException):
    exit_code = FAILURE


def _usage(message: str) -> NoReturn:
    raise _UsageError(message)


def _run(ctx: click.Context, work: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``work(store)`` on a fresh store; map meshkit errors to exit codes."""
    from .config import store_from_url
    from .errors import ConfigError, InvalidArgument, MeshkitError

    async def main() -> T:
        try:
            store = store_from_url(ctx.obj["store"])
        except (ConfigError, InvalidArgument) as exc:
            _usage(exc.message)
        try:
            return await work(store)
        finally:
            await store.close()

    try:
        return asyncio.run(main())
    except (ConfigError, InvalidArgument) as exc:
        _usage(exc.message)
    except MeshkitError as exc:
        raise _Failure(exc.message) from None


def _parse_value(text: str, as_string: bool) -> Any:
    if as_string:
        return text
    try:
        return json.loads(text)
    except ValueError as exc:
        _usage(
            f'expected VALUE to be JSON (5, true, "text", [1, 2], {{"a": 1}}), found '
            f"{text!r}: {exc}. To set a string, quote it ('\"{text}\"') or pass --string."
        )


def _parse_tags(pairs: Sequence[str]) -> dict[str, str]:
    tags = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            _usage(f"expected --tag key=value, found {pair!r}")
        tags[key] = value
    return tags


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _dump(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)


async def _secrets(store: Any, namespace: str) -> set[str]:
    """Secret keys of ``namespace`` (any service's for shared): those its instances
    recorded in the store at start (kept after they stop) and those running ones report
    (instances of a version from before the record existed)."""
    from .config import SHARED

    statuses = await store.statuses(None if namespace == SHARED else namespace)
    recorded = await store.secret_keys(namespace)
    return recorded | {key for status in statuses for key in status.secret_keys}


def _mask(values: Any, secrets: set[str], show: bool, prefix: str = "") -> Any:
    """``values`` with secret keys masked: keys under ``secrets`` and keys named like a
    secret (a mapping under such a name, e.g. ``credentials``, is masked whole)."""
    if show or not isinstance(values, Mapping):
        return values
    out = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if path in secrets or _SECRET_NAME.search(str(key)):
            out[key] = "**********"
        else:
            out[key] = _mask(value, secrets, show, path + ".")
    return out


def _is_secret_key(key: str, secrets: set[str]) -> bool:
    """Whether dotted ``key`` is, or lies under, a secret key or a key named like one."""
    parts = key.split(".")
    prefixes = {".".join(parts[: i + 1]) for i in range(len(parts))}
    return bool(prefixes & secrets) or any(_SECRET_NAME.search(p) for p in parts)


async def _require_namespace(store: Any, namespace: str) -> Any:
    from .config.store import validate_namespace

    validate_namespace(namespace)
    state = await store.state(namespace)
    if state.current is None and state.gray is None:
        known = await store.namespaces()
        _usage(
            f"no config published for {namespace!r}"
            + (f" (known: {', '.join(known)})" if known else " (the store is empty)")
        )
    return state


# -- waiting for instances ---------------------------------------------------------------


def _live(status: Any) -> bool:
    if time.time() - status.time > STALE_AFTER:
        return False
    if status.pid and status.host == socket.gethostname():
        try:
            os.kill(status.pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            return True
    return True


async def _wait_for_instances(store: Any, namespace: str, wait: float) -> bool:
    """Print which instances applied / rejected what they should run; ``True`` if all did."""
    from .config import SHARED

    state = await store.state(namespace)
    deadline = time.monotonic() + wait
    outcome: dict[str, str] = {}
    expected: dict[str, int] = {}
    while True:
        statuses = [
            s for s in await store.statuses(None if namespace == SHARED else namespace) if _live(s)
        ]
        for status in statuses:
            target = state.for_instance(status.instance, status.tags)
            number = target.version if target is not None else 0
            expected[status.instance] = number
            rejected = status.rejected.get(namespace)
            if status.versions.get(namespace) == number:
                outcome[status.instance] = "applied"
            elif rejected is not None and rejected.get("version") == number:
                outcome[status.instance] = f"REJECTED: {rejected.get('error', '')}"
        if len(outcome) == len(expected) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    if not expected:
        click.echo(f"no running instance of {namespace!r} reports its config status")
        return True
    width = max(len(i) for i in expected)
    running = {s.instance: s.versions.get(namespace, 0) for s in statuses}
    for instance in sorted(expected):
        result = outcome.get(instance)
        if result is None:
            result = f"no answer within {wait:g}s (runs version {running.get(instance, '?')})"
        click.echo(f"  {instance:<{width}}  version {expected[instance]}: {result}")
    applied = sum(1 for r in outcome.values() if r == "applied")
    rejected_count = sum(1 for r in outcome.values() if r.startswith("REJECTED"))
    silent = len(expected) - len(outcome)
    click.echo(
        f"{applied} of {len(expected)} instances applied"
        + (f", {rejected_count} rejected" if rejected_count else "")
        + (f", {silent} did not answer" if silent else "")
    )
    return applied == len(expected)


def _published(version: Any) -> None:
    gray = " as a gray release" if version.kind == "gray" else ""
    click.echo(
        f"published {version.namespace} version {version.version}{gray} "
        f"(by {version.author}{': ' + version.message if version.message else ''})"
    )


async def _after_publish(store: Any, version: Any, wait: float) -> None:
    _published(version)
    if wait > 0 and not await _wait_for_instances(store, version.namespace, wait):
        raise _Failure(
            f"version {version.version} of {version.namespace} is published, but not every "
            f"instance applied it (see above; `meshkit config rollback {version.namespace} "
            f"VERSION` republishes an earlier one)"
        )


# -- the commands ------------------------------------------------------------------------

_wait_option = click.option(
    "--wait",
    type=click.FloatRange(min=0),
    default=DEFAULT_WAIT,
    show_default=True,
    help="Seconds to wait for running instances to apply or reject (0: do not wait).",
)
_message_option = click.option("-m", "--message", default="", help="Why (kept in the history).")
_author_option = click.option(
    "--author", default=None, help="Who (default $MESHKIT_AUTHOR, else user@host)."
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--store",
    envvar="MESHKIT_CONFIG",
    default="local://",
    show_default=True,
    help="Config store URL: local://[/dir], etcd://h:p[?prefix=…], consul://h:p ($MESHKIT_CONFIG).",
)
@click.pass_context
def config(ctx: click.Context, store: str) -> None:
    """Read and change service configuration in the central store."""
    import sys

    from .logs import configure_logging

    configure_logging(level="WARNING", json=False, stream=sys.stderr)
    ctx.obj = {"store": store}


@config.command()
@click.argument("service")
@click.argument("key", required=False)
@click.option("--version", "number", type=int, default=None, help="A past version.")
@click.option("--show-secrets", is_flag=True, help="Print secret values instead of ****.")
@click.pass_context
def get(
    ctx: click.Context, service: str, key: str | None, number: int | None, show_secrets: bool
) -> None:
    """Print SERVICE's config (or one dotted KEY) as JSON."""
    from .config.store import get_path

    async def work(store: Any) -> None:
        state = await _require_namespace(store, service)
        version = await store.version(service, number) if number is not None else state.current
        if version is None:
            _usage(f"{service!r} has only a gray release in progress; use --version")
        secrets = await _secrets(store, service)
        if key is None:
            click.echo(_dump(_mask(version.values, secrets, show_secrets)))
            return
        try:
            value = get_path(version.values, key)
        except KeyError:
            keys = ", ".join(sorted(version.values)) or "none"
            _usage(f"key {key!r} is not set in {service} version {version.version} (keys: {keys})")
        if not show_secrets and _is_secret_key(key, secrets):
            value = "**********"
        else:
            value = _mask(value, secrets, show_secrets, key + ".")
        click.echo(_dump(value))

    _run(ctx, work)


@config.command(name="set")
@click.argument("service")
@click.argument("key")
@click.argument("value")
@click.option("--string", "as_string", is_flag=True, help="Take VALUE as text, not JSON.")
@_message_option
@_author_option
@_wait_option
@click.pass_context
def set_(
    ctx: click.Context,
    service: str,
    key: str,
    value: str,
    as_string: bool,
    message: str,
    author: str | None,
    wait: float,
) -> None:
    """Publish a new version of SERVICE with KEY set to VALUE (JSON)."""
    parsed = _parse_value(value, as_string)

    async def work(store: Any) -> None:
        version = await store.set_key(service, key, parsed, author=author, message=message)
        await _after_publish(store, version, wait)

    _run(ctx, work)


@config.command()
@click.argument("service")
@click.argument("key")
@_message_option
@_author_option
@_wait_option
@click.pass_context
def unset(
    ctx: click.Context, service: str, key: str, message: str, author: str | None, wait: float
) -> None:
    """Publish a new version of SERVICE without KEY (its default applies again)."""

    async def work(store: Any) -> None:
        await _require_namespace(store, service)
        version = await store.unset_key(service, key, author=author, message=message)
        await _after_publish(store, version, wait)

    _run(ctx, work)


@config.command()
@click.argument("service")
@click.argument("file", type=click.Path(dir_okay=False))
@_message_option
@_author_option
@_wait_option
@click.pass_context
def replace(
    ctx: click.Context, service: str, file: str, message: str, author: str | None, wait: float
) -> None:
    """Publish FILE (TOML, or JSON when it ends in .json) as SERVICE's whole config."""
    from .config.layers import load_file
    from .errors import ConfigError

    if not os.path.exists(file):
        _usage(f"no such file: {file}")
    try:
        values = load_file(file)
    except ConfigError as exc:
        _usage(exc.message)

    async def work(store: Any) -> None:
        version = await store.replace(
            service, values, author=author, message=message or f"replace from {file}"
        )
        await _after_publish(store, version, wait)

    _run(ctx, work)


@config.command()
@click.argument("service")
@_message_option
@_author_option
@_wait_option
@click.pass_context
def edit(ctx: click.Context, service: str, message: str, author: str | None, wait: float) -> None:
    """Edit SERVICE's config as JSON in $EDITOR and publish the result."""

    async def load(store: Any) -> Any:
        from .config.store import validate_namespace

        validate_namespace(service)
        return (await store.state(service)).current

    current = _run(ctx, load)
    original = _dump(dict(current.values) if current else {})
    edited = click.edit(original + "\n", extension=".json")
    if edited is None or edited.strip() == original.strip():
        click.echo("no change; nothing published")
        return

    def save() -> str:
        fd, path = tempfile.mkstemp(prefix=f"meshkit-config-{service}-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            f.write(edited)
        return path

    try:
        values = json.loads(edited)
        if not isinstance(values, dict):
            raise ValueError("expected a JSON object at the top level")
    except ValueError as exc:
        path = save()
        _usage(
            f"the edited config is not a valid JSON object ({exc}); nothing published. "
            f"Your text is saved in {path}: fix it and run "
            f"`meshkit config replace {service} {path}`"
        )
    published: list[Any] = []

    async def work(store: Any) -> None:
        version = await store.replace(
            service, values, author=author, message=message or "edit", kind="edit"
        )
        published.append(version)
        await _after_publish(store, version, wait)

    try:
        _run(ctx, work)
    except click.ClickException as exc:
        if published:
            raise
        # Keep the edit: the store refused it or could not be reached.
        kept = type(exc)(
            f"{exc.message}. Nothing published; your text is saved in {save()} "
            f"(`meshkit config replace {service} FILE` publishes it)"
        )
        raise kept from None


@config.command()
@click.argument("service")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the last N.")
@click.pass_context
def history(ctx: click.Context, service: str, limit: int | None) -> None:
    """List SERVICE's versions, newest last (* marks the current one)."""

    async def work(store: Any) -> None:
        state = await _require_namespace(store, service)
        versions = await store.history(service)
        if limit:
            versions = versions[-limit:]
        current = state.current.version if state.current else None
        gray = state.gray.version.version if state.gray else None
        for v in versions:
            mark = "*" if v.version == current else "~" if v.version == gray else " "
            kind = v.kind + (f" of {v.source}" if v.source else "")
            kind += (
                f" ({v.outcome})" if v.outcome else " (in progress)" if v.version == gray else ""
            )
            click.echo(
                f"{mark}{v.version:>5}  {_when(v.time)}  {v.author:<20}  {kind:<22}  {v.message}"
            )

    _run(ctx, work)


@config.command()
@click.argument("service")
@click.argument("version", type=int)
@_message_option
@_author_option
@_wait_option
@click.pass_context
def rollback(
    ctx: click.Context,
    service: str,
    version: int,
    message: str,
    author: str | None,
    wait: float,
) -> None:
    """Republish the values of VERSION as a new version of SERVICE."""

    async def work(store: Any) -> None:
        # Not the head records: a rollback is how an unreadable one is written over.
        if service not in await store.namespaces():
            await _require_namespace(store, service)  # says which namespaces there are
        new = await store.rollback(service, version, author=author, message=message or None)
        await _after_publish(store, new, wait)

    _run(ctx, work)


@config.command()
@click.argument("service")
@click.argument("old", type=int, required=False)
@click.argument("new", type=int, required=False)
@click.option("--show-secrets", is_flag=True, help="Print secret values instead of ****.")
@click.pass_context
def diff(
    ctx: click.Context, service: str, old: int | None, new: int | None, show_secrets: bool
) -> None:
    """What changed from version OLD to NEW (default: the current one and the one before;
    during a gray release: current to gray)."""
    from .config.store import diff_values

    async def work(store: Any) -> None:
        state = await _require_namespace(store, service)
        if new is None:
            head = state.gray.version if state.gray and old is None else state.current
            b = head if head is not None else state.gray.version
        else:
            b = await store.version(service, new)
        if old is None:
            if state.gray is not None and new is None and state.current is not None:
                a_values, a_label = state.current.values, f"version {state.current.version}"
            elif b.version > 1:
                prev = await store.version(service, b.version - 1)
                a_values, a_label = prev.values, f"version {prev.version}"
            else:
                a_values, a_label = {}, "nothing"
        else:
            a = await store.version(service, old)
            a_values, a_label = a.values, f"version {a.version}"
        secrets = await _secrets(store, service)
        # Diffed in clear, printed masked: a changed secret shows as changed, not its value.
        changes = diff_values(a_values, b.values)
        click.echo(f"--- {service} {a_label}\n+++ {service} version {b.version}")
        if not changes:
            click.echo("(no differences)")
        for change, key, before, after in changes:
            if not show_secrets and _is_secret_key(key, secrets):
                before = after = "**********"
            if change in ("removed", "changed"):
                click.echo(f"- {key} = {json.dumps(before)}")
            if change in ("added", "changed"):
                click.echo(f"+ {key} = {json.dumps(after)}")

    _run(ctx, work)


@config.command()
@click.argument("service")
@click.pass_context
def status(ctx: click.Context, service: str) -> None:
    """Which version each running instance of SERVICE runs, and what it rejected."""

    async def work(store: Any) -> None:
        from .config.store import validate_namespace

        validate_namespace(service)
        state = await store.state(service)
        current = state.current.version if state.current else 0
        line = f"{service}: current version {current}"
        if state.gray:
            line += (
                f", gray version {state.gray.version.version} to {state.gray.selector.describe()}"
            )
        click.echo(line)
        statuses = [s for s in await store.statuses(service) if _live(s)]
        if not statuses:
            click.echo("no running instance reports its config status")
        for s in statuses:
            versions = ", ".join(f"{ns} v{n}" for ns, n in sorted(s.versions.items()))
            tags = ",".join(f"{k}={v}" for k, v in sorted(s.tags.items()))
            click.echo(f"  {s.instance}  [{tags}]  runs {versions}")
            for ns, r in sorted(s.rejected.items()):
                click.echo(f"    rejected {ns} v{r.get('version')}: {r.get('error')}")

    _run(ctx, work)


@config.command()
@click.argument("service")
@click.option(
    "--registry", envvar="MESHKIT_REGISTRY", default=None, help="Where to find instances."
)
@click.option("--addr", default=None, help="Ask one instance's health port (host:port) instead.")
def show(service: str, registry: str | None, addr: str | None) -> None:
    """Every key's effective value and the layer it came from, per running instance."""
    import aiohttp

    from .errors import MeshkitError

    async def main() -> list[tuple[str, Any]]:
        if addr is not None:
            targets = [(addr, f"http://{addr}/info")]
        else:
            from .registry import registry_from_url

            reg = registry_from_url(registry)
            try:
                instances = await reg.resolve(service)
            finally:
                await reg.close()
            targets = [(i.instance_id, f"http://{i.host}:{i.health_port}/info") for i in instances]
        out = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as http:
            for name, url in targets:
                try:
                    async with http.get(url) as resp:
                        out.append((name, await resp.json()))
                except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    out.append((name, {"error": f"{url}: {exc or type(exc).__name__}"}))
        return out

    try:
        results = asyncio.run(main())
    except MeshkitError as exc:
        raise _Failure(exc.message) from None
    if not results:
        raise _Failure(f"no running instance of {service!r} found in the registry")
    for name, info in results:
        cfg = info.get("config") if isinstance(info, dict) else None
        if not cfg:
            click.echo(f"{name}: {info.get('error') or 'no config information in /info'}")
            continue
        versions = ", ".join(f"{ns} v{n}" for ns, n in sorted(cfg["versions"].items()))
        click.echo(f"{name}  ({versions}; store {cfg['store']})")
        effective = cfg["effective"]
        width = max((len(k) for k in effective), default=0)
        for key, entry in effective.items():
            click.echo(f"  {key:<{width}}  {json.dumps(entry['value']):<30}  {entry['source']}")
        for ns, r in cfg.get("rejected", {}).items():
            click.echo(f"  rejected {ns} v{r['version']}: {r['error']}")


# -- gray releases -----------------------------------------------------------------------


@config.group()
def gray() -> None:
    """Publish a version to some instances first, then promote or abort it."""


@gray.command(name="publish")
@click.argument("service")
@click.argument("key")
@click.argument("value")
@click.option("--instance", "instances", multiple=True, help="An instance id (repeatable).")
@click.option(
    "--tag", "tags", multiple=True, help="key=value the instances must have (repeatable)."
)
@click.option(
    "--percent", type=click.FloatRange(0, 100), default=None, help="A share of instances."
)
@click.option("--string", "as_string", is_flag=True, help="Take VALUE as text, not JSON.")
@_message_option
@_author_option
@_wait_option
@click.pass_context
def gray_publish(
    ctx: click.Context,
    service: str,
    key: str,
    value: str,
    instances: tuple[str, ...],
    tags: tuple[str, ...],
    percent: float | None,
    as_string: bool,
    message: str,
    author: str | None,
    wait: float,
) -> None:
    """Publish KEY=VALUE to the chosen instances of SERVICE only."""
    from .config import Selector
    from .config.store import set_path
    from .errors import InvalidArgument

    parsed = _parse_value(value, as_string)
    try:
        selector = Selector(instances, _parse_tags(tags), percent)
    except InvalidArgument as exc:
        _usage(
            exc.message.replace(
                "expected a gray selector with", "give --instance, --tag or --percent:"
            )
        )

    async def work(store: Any) -> None:
        version = await store.gray_publish(
            service, lambda v: set_path(v, key, parsed), selector, author=author, message=message
        )
        click.echo(f"gray release to {selector.describe()}")
        await _after_publish(store, version, wait)

    _run(ctx, work)


@gray.command(name="promote")
@click.argument("service")
@_author_option
@_wait_option
@click.pass_context
def gray_promote(ctx: click.Context, service: str, author: str | None, wait: float) -> None:
    """Make the gray version SERVICE's current version everywhere."""

    async def work(store: Any) -> None:
        version = await store.gray_promote(service, author=author)
        click.echo(f"promoted {service} version {version.version} to every instance")
        if wait > 0 and not await _wait_for_instances(store, service, wait):
            raise _Failure(f"not every instance of {service} applied version {version.version}")

    _run(ctx, work)


@gray.command(name="abort")
@click.argument("service")
@_author_option
@_wait_option
@click.pass_context
def gray_abort(ctx: click.Context, service: str, author: str | None, wait: float) -> None:
    """Withdraw the gray version; its instances go back to the current one."""

    async def work(store: Any) -> None:
        version = await store.gray_abort(service, author=author)
        click.echo(f"aborted the gray release of {service} version {version.version}")
        if wait > 0 and not await _wait_for_instances(store, service, wait):
            raise _Failure(f"not every instance of {service} went back to the current version")

    _run(ctx, work)
