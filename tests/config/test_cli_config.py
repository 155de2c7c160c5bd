"""``meshkit config``: get/set/unset/replace/edit/history/diff/rollback/status/show and
gray publish/promote/abort, acks from running instances, and bad input."""

from __future__ import annotations

import asyncio
import json
import re
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, Field, SecretStr

from meshkit.cli import cli
from meshkit.config import ServiceConfig, store_from_url


class Settings(BaseModel):
    limit: int = Field(10, ge=1)
    greeting: str = "hello"
    password: SecretStr = SecretStr("")


def run(url: str, *args: str, **kwargs: Any) -> Result:
    return CliRunner().invoke(cli, ["config", "--store", url, *args], **kwargs)


async def arun(url: str, *args: str, **kwargs: Any) -> Result:
    """Run the CLI in a thread, so instances on this loop can answer meanwhile."""
    return await asyncio.to_thread(run, url, *args, **kwargs)


def test_round_trip(local_url: str) -> None:
    assert (
        run(local_url, "set", "echo", "limit", "5", "-m", "first", "--author", "ann").exit_code == 0
    )
    r = run(local_url, "set", "echo", "greeting", "hi", "--string", "--wait", "0")
    assert r.exit_code == 0 and "published echo version 2 (by " in r.output
    assert run(local_url, "set", "echo", "db.pool", "[1, 2]").exit_code == 0
    r = run(local_url, "get", "echo")
    assert r.exit_code == 0
    assert '"greeting": "hi"' in r.output and '"pool": [\n      1,' in r.output
    assert run(local_url, "get", "echo", "db.pool").output.split() == ["[", "1,", "2", "]"]
    assert run(local_url, "get", "echo", "limit", "--version", "1").output.strip() == "5"

    r = run(local_url, "history", "echo")
    lines = r.output.splitlines()
    assert len(lines) == 3 and lines[2].startswith("*    3")
    assert "ann" in lines[0] and "first" in lines[0]

    r = run(local_url, "diff", "echo", "1", "3")
    assert r.output.splitlines() == [
        "--- echo version 1",
        "+++ echo version 3",
        "+ db.pool = [1, 2]",
        '+ greeting = "hi"',
    ]
    r = run(local_url, "rollback", "echo", "1", "-m", "too much")
    assert r.exit_code == 0 and "published echo version 4" in r.output
    assert run(local_url, "get", "echo").output.count(":") == 1  # only limit again
    r = run(local_url, "history", "echo", "--limit", "1")
    assert "rollback of 1" in r.output and "too much" in r.output
    r = run(local_url, "unset", "echo", "limit")
    assert r.exit_code == 0 and run(local_url, "get", "echo").output.strip() == "{}"


def test_secrets_masked_in_get_and_diff(local_url: str) -> None:
    run(local_url, "set", "echo", "db_password", '"s3cr3t-value"')
    run(local_url, "set", "echo", "api_token", '"t0ken-value"')
    for args in (["get", "echo"], ["diff", "echo", "1", "2"], ["get", "echo", "--version", "1"]):
        out = run(local_url, *args).output
        assert "s3cr3t-value" not in out and "t0ken-value" not in out and "****" in out
    assert "s3cr3t-value" in run(local_url, "get", "echo", "--show-secrets").output


def test_bad_input_clear_errors_and_nothing_lost(local_url: str, tmp_path: Path) -> None:
    run(local_url, "set", "echo", "limit", "5")
    cases = [
        (["set", "echo", "greeting", "hello"], "expected VALUE to be JSON"),
        (["set", "echo", "greeting", "{oops"], "To set a string, quote it"),
        (["get", "nosuch"], "no config published for 'nosuch' (known: echo)"),
        (["get", "echo", "nope"], "key 'nope' is not set in echo version 1 (keys: limit)"),
        (["rollback", "echo", "9"], "'echo' has no version 9 (versions 1 to 1)"),
        (["diff", "echo", "1", "7"], "'echo' has no version 7"),
        (["set", "bad/name", "a", "1"], "expected a service name"),
        (["set", "echo", "a..b", "1"], "dotted config key"),
        (["set", "echo", "limit", "5"], "nothing to publish"),
        (["gray", "publish", "echo", "limit", "6"], "give --instance, --tag or --percent"),
        (["gray", "publish", "echo", "limit", "6", "--tag", "canary"], "expected --tag key=value"),
        (["gray", "promote", "echo"], "no gray release of 'echo' is in progress"),
        (["replace", "echo", str(tmp_path / "missing.toml")], "no such file"),
    ]
    for args, message in cases:
        r = run(local_url, *args)
        assert r.exit_code == 2, (args, r.output)
        assert message in r.output, (args, r.output)
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("limit = \n")
    r = run(local_url, "replace", "echo", str(bad_toml))
    assert r.exit_code == 2 and "bad.toml is not valid TOML" in r.output
    r = CliRunner().invoke(cli, ["config", "--store", "redis://x", "get", "echo"])
    assert r.exit_code == 2 and "expected a config store URL with scheme" in r.output
    r = CliRunner().invoke(cli, ["config", "--store", "local://rel", "get", "echo"])
    assert r.exit_code == 2 and "three slashes" in r.output
    assert len(run(local_url, "history", "echo").output.splitlines()) == 1  # nothing lost


def test_replace_and_edit(local_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = tmp_path / "echo.toml"
    doc.write_text('limit = 7\n[db]\nhost = "x"\n')
    r = run(local_url, "replace", "echo", str(doc), "--wait", "0")
    assert r.exit_code == 0 and "replace from" in r.output
    editor = tmp_path / "editor.py"
    editor.write_text(
        "import json, sys\n"
        "p = sys.argv[1]\n"
        "d = json.load(open(p))\n"
        "d['limit'] = 8\n"
        "open(p, 'w').write(json.dumps(d))\n"
    )
    editor.chmod(editor.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("EDITOR", f"{sys.executable} {editor}")
    r = run(local_url, "edit", "echo", "-m", "bump")
    assert r.exit_code == 0, r.output
    assert run(local_url, "get", "echo", "limit").output.strip() == "8"
    broken = tmp_path / "broken.py"
    broken.write_text("import sys\nopen(sys.argv[1], 'w').write('{not json')\n")
    monkeypatch.setenv("EDITOR", f"{sys.executable} {broken}")
    r = run(local_url, "edit", "echo")
    assert r.exit_code == 2 and "nothing published" in r.output
    saved = re.search(r"saved in (\S+):", r.output)
    assert saved and Path(saved.group(1)).read_text() == "{not json"  # the edit is not lost
    Path(saved.group(1)).unlink()
    assert run(local_url, "get", "echo", "limit").output.strip() == "8"
    # A store that refuses the edit (a gray release in progress) keeps the text too.
    assert run(local_url, "gray", "publish", "echo", "limit", "9", "--instance", "x").exit_code == 0
    monkeypatch.setenv("EDITOR", f"{sys.executable} {editor}")
    editor.write_text(editor.read_text().replace("= 8", "= 10"))
    r = run(local_url, "edit", "echo")
    assert r.exit_code == 2 and "gray release of 'echo' version 3 is in progress" in r.output
    saved = re.search(r"saved in (\S+) ", r.output)
    assert saved and json.loads(Path(saved.group(1)).read_text())["limit"] == 10
    Path(saved.group(1)).unlink()


async def _instances(url: str, fleet: dict[str, dict[str, str]]) -> list[ServiceConfig[Any]]:
    store = store_from_url(url)
    out = []
    for instance, tags in fleet.items():
        cfg = ServiceConfig(
            "echo", Settings, store=store, environ={}, metrics_registry=CollectorRegistry()
        )
        await cfg.start(instance, tags)
        out.append(cfg)
    return out


async def test_set_reports_applied_and_rejected_instances(store_url: str) -> None:
    assert (await arun(store_url, "set", "echo", "limit", "2")).exit_code == 0
    configs = await _instances(store_url, {"echo-a": {}, "echo-b": {}})
    configs[1].validator(lambda s: _refuse(s.limit > 50, "limit above 50 on echo-b"))
    try:
        r = await arun(store_url, "set", "echo", "limit", "20", "--wait", "10")
        assert r.exit_code == 0, r.output
        assert "echo-a  version 2: applied" in r.output
        assert "echo-b  version 2: applied" in r.output
        assert "2 of 2 instances applied" in r.output

        r = await arun(store_url, "set", "echo", "limit", "60", "--wait", "10")
        assert r.exit_code == 1
        assert "echo-a  version 3: applied" in r.output
        assert "echo-b  version 3: REJECTED: validator" in r.output
        assert "limit above 50 on echo-b" in r.output
        assert "1 of 2 instances applied, 1 rejected" in r.output
        assert "meshkit config rollback echo" in r.output
        assert configs[1].value.limit == 20

        r = await arun(store_url, "set", "echo", "limit", "0", "--wait", "10")
        assert r.exit_code == 1 and "2 rejected" in r.output
        assert "limit (from store): Input should be greater than or equal to 1" in r.output

        r = await arun(store_url, "status", "echo")
        assert "current version 4" in r.output and "rejected echo v4" in r.output
    finally:
        for cfg in configs:
            await cfg.stop()


def _refuse(condition: bool, message: str) -> None:
    if condition:
        raise ValueError(message)


async def test_gray_publish_promote_abort_via_cli(store_url: str) -> None:
    assert (await arun(store_url, "set", "echo", "limit", "1")).exit_code == 0
    configs = await _instances(
        store_url, {"echo-a": {}, "echo-b": {"canary": "true"}, "echo-c": {"zone": "z"}}
    )
    limits = lambda: [c.value.limit for c in configs]  # noqa: E731
    try:
        r = await arun(store_url, "gray", "publish", "echo", "limit", "2", "--tag", "canary=true")
        assert r.exit_code == 0, r.output
        assert "gray release to tags canary=true" in r.output
        assert "echo-b  version 2: applied" in r.output and "echo-a  version 1: applied" in r.output
        assert limits() == [1, 2, 1]
        r = await arun(store_url, "status", "echo")
        assert "gray version 2 to tags canary=true" in r.output
        r = await arun(store_url, "history", "echo")
        assert "~    2" in r.output and "(in progress)" in r.output
        r = await arun(store_url, "diff", "echo")
        assert r.output.splitlines()[-2:] == ["- limit = 1", "+ limit = 2"]
        r = await arun(store_url, "gray", "abort", "echo")
        assert r.exit_code == 0 and "echo-b  version 1: applied" in r.output
        assert limits() == [1, 1, 1]

        r = await arun(
            store_url,
            "gray",
            "publish",
            "echo",
            "limit",
            "3",
            "--instance",
            "echo-c",
            "--instance",
            "echo-a",
        )
        assert r.exit_code == 0 and limits() == [3, 1, 3]
        r = await arun(store_url, "gray", "promote", "echo")
        assert r.exit_code == 0 and "3 of 3 instances applied" in r.output
        assert limits() == [3, 3, 3]
        r = await arun(store_url, "history", "echo")
        assert "gray (aborted)" in r.output and "gray (promoted)" in r.output
    finally:
        for cfg in configs:
            await cfg.stop()


async def test_show_effective_config_of_a_running_service(local_url: str, tmp_path: Path) -> None:
    from echo_support import EchoImpl, echo_thrift

    from meshkit import Service

    assert (await arun(local_url, "set", "echo", "password", '"pw-xyz"')).exit_code == 0
    registry_url = f"local://{tmp_path / 'registry'}"
    svc = Service(
        "echo",
        echo_thrift.Echo,
        registry=registry_url,
        config=Settings,
        config_store=local_url,
        config_overrides={"greeting": "yo"},
        metrics_registry=CollectorRegistry(),
    )
    svc.implement(EchoImpl())
    await svc.start(port=0, health_port=0)
    try:
        r = await asyncio.to_thread(
            CliRunner().invoke, cli, ["config", "show", "echo", "--registry", registry_url]
        )
        assert r.exit_code == 0, r.output
        lines = r.output.splitlines()
        assert lines[0].startswith(svc.instance.instance_id)  # type: ignore[union-attr]
        assert re.search(r"limit\s+10\s+default", r.output)
        assert re.search(r'greeting\s+"yo"\s+override', r.output)
        assert re.search(r'password\s+"\*+"\s+store', r.output) and "pw-xyz" not in r.output
        r = await asyncio.to_thread(
            CliRunner().invoke,
            cli,
            ["config", "show", "echo", "--addr", f"127.0.0.1:{svc.health_port}"],
        )
        assert r.exit_code == 0 and "greeting" in r.output
    finally:
        await svc.stop(drain_timeout=1.0)
    r = await asyncio.to_thread(
        CliRunner().invoke, cli, ["config", "show", "echo", "--registry", registry_url]
    )
    assert r.exit_code == 1 and "no running instance of 'echo'" in r.output


async def test_shared_namespace_reports_every_service(store_url: str) -> None:
    store = store_from_url(store_url)
    configs = []
    for service in ("echo", "web"):
        cfg: ServiceConfig[Any] = ServiceConfig(
            service, Settings, store=store, environ={}, metrics_registry=CollectorRegistry()
        )
        await cfg.start(f"{service}-1", {})
        configs.append(cfg)
    try:
        r = await arun(store_url, "set", "_shared", "greeting", '"hi all"', "--wait", "10")
        assert r.exit_code == 0, r.output
        assert re.search(r"echo-1\s+version 1: applied", r.output)
        assert re.search(r"web-1\s+version 1: applied", r.output)
        assert [c.value.greeting for c in configs] == ["hi all", "hi all"]
    finally:
        for cfg in configs:
            await cfg.stop()
        await store.close()


def test_console_script_exit_codes(local_url: str) -> None:
    import subprocess

    ok = subprocess.run(
        [sys.executable, "-m", "meshkit", "config", "--store", local_url, "set", "echo", "a", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0 and "published echo version 1" in ok.stdout, ok.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "meshkit", "config", "--store", local_url, "get", "nosuch"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "no config published for 'nosuch'" in bad.stderr
    assert bad.stdout == ""


async def test_gray_by_percent_reaches_exactly_the_hashed_subset(local_url: str) -> None:
    from meshkit.config import Selector

    assert (await arun(local_url, "set", "echo", "limit", "1")).exit_code == 0
    fleet = {f"echo-{i}": {"zone": "a" if i % 2 else "b"} for i in range(12)}
    configs = await _instances(local_url, fleet)
    try:
        r = await arun(
            local_url, "gray", "publish", "echo", "limit", "2", "--percent", "60", "--tag", "zone=a"
        )
        assert r.exit_code == 0, r.output
        chosen = Selector(tags={"zone": "a"}, percent=60)
        gray = {i for i, t in fleet.items() if chosen.matches("echo", i, t)}
        assert gray == {"echo-3", "echo-9"}  # 2 of the 6 in zone a (md5 of namespace:id)
        assert {c.instance_id: c.value.limit for c in configs} == {
            i: 2 if i in gray else 1 for i in fleet
        }
        assert "12 of 12 instances applied" in r.output
    finally:
        for cfg in configs:
            await cfg.stop()


class Vault(BaseModel):
    api_keys: dict[str, SecretStr] = {}
    signers: list[SecretStr] = []
    db_dsn: SecretStr | None = None
    limit: int = 1


async def test_secrets_masked_after_instances_stop_and_in_containers(local_url: str) -> None:
    """Containers of secrets are secret subtrees; a SecretStr not named like a secret stays
    masked once no instance runs (its key is recorded in the store at start); a mapping
    under a secret-like name is masked whole; a changed secret shows as changed."""
    clear = ("sk-live-PARTNER", "sig-ONE", "HUNTER2", "cred-VALUE")
    store = store_from_url(local_url)
    try:
        await store.replace(
            "echo",
            {
                "api_keys": {"partner": clear[0]},
                "signers": [clear[1]],
                "db_dsn": f"postgres://u:{clear[2]}@db/x",
                "limit": 1,
                "credentials": {"user": "u", "value": clear[3]},
            },
        )
        assert await store.secret_keys("echo") == set()  # an old store: nothing recorded
        cfg = ServiceConfig(
            "echo", Vault, store=store, environ={}, metrics_registry=CollectorRegistry()
        )
        await cfg.start("echo-1", {})
        assert set(cfg.secret_keys) == {"api_keys", "signers", "db_dsn"}
        await _until(lambda: store.secret_keys("echo"), {"api_keys", "signers", "db_dsn"})
        await cfg.stop()
        assert await store.statuses("echo") == []
        assert await store.secret_keys("_shared") == {"api_keys", "signers", "db_dsn"}
        await store.set_key("echo", "api_keys.partner", "sk-live-ROTATED")
    finally:
        await store.close()
    outputs = [
        await arun(local_url, *args)
        for args in (
            ["get", "echo"],
            ["get", "echo", "--version", "1"],
            ["get", "echo", "api_keys"],
            ["get", "echo", "api_keys.partner"],
            ["get", "echo", "credentials"],
            ["diff", "echo"],
        )
    ]
    for r in outputs:
        assert r.exit_code == 0, r.output
        for secret in (*clear, "ROTATED"):
            assert secret not in r.output, (secret, r.output)
    assert '"limit": 1' in outputs[0].output and '"api_keys": "**********"' in outputs[0].output
    assert outputs[3].output.strip() == '"**********"'
    assert outputs[5].output.splitlines()[2:] == [
        '- api_keys.partner = "**********"',
        '+ api_keys.partner = "**********"',
    ]
    shown = (await arun(local_url, "get", "echo", "--show-secrets")).output
    assert "sk-live-ROTATED" in shown and clear[2] in shown


async def _until(read: Any, expected: Any) -> None:
    for _ in range(500):
        if await read() == expected:
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"timed out waiting for {expected!r}")


def test_a_malformed_head_record_is_repaired_with_meshkit_config(local_url: str) -> None:
    """A bad hand edit of the current head record: `set` (which builds on the current
    values) refuses and says how to repair it; `rollback` writes a new version over it,
    after which `set` works again and the history is whole."""
    assert run(local_url, "set", "echo", "limit", "5").exit_code == 0
    assert run(local_url, "set", "echo", "greeting", "hi", "--string").exit_code == 0

    async def break_head() -> None:
        from meshkit.config.kv import Put

        store = store_from_url(local_url)
        try:
            await store.kv.txn([], [Put("echo/head/current", "{not json")])
        finally:
            await store.close()

    asyncio.run(break_head())
    r = run(local_url, "set", "echo", "limit", "6")
    assert r.exit_code != 0
    assert "echo/head/current is not valid JSON" in r.output
    assert "meshkit config rollback echo 2" in r.output
    r = run(local_url, "rollback", "echo", "2")
    assert r.exit_code == 0, r.output
    assert "version 3" in r.output
    assert run(local_url, "set", "echo", "limit", "6").exit_code == 0
    r = run(local_url, "get", "echo")
    assert json.loads(r.output) == {"limit": 6, "greeting": "hi"}
    assert len(run(local_url, "history", "echo").output.splitlines()) == 4
