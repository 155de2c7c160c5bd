"""The ``local://`` registry against a real directory and real processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import stat
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs
from waiting import wait_until

from meshkit.errors import ConfigError, InvalidArgument, Unavailable
from meshkit.registry import (
    Instance,
    LocalRegistry,
    Registry,
    RegistryStatus,
    default_directory,
    new_instance_id,
    registry_from_url,
)

REPO = Path(__file__).resolve().parents[2]
DEADLINE = 10.0


def inst(
    service: str = "echo", instance_id: str = "echo-1", port: int = 9000, **kw: object
) -> Instance:
    return Instance(service, instance_id, "127.0.0.1", port, **kw)  # type: ignore[arg-type]


def ids(instances: list[Instance]) -> list[str]:
    return [i.instance_id for i in instances]


@pytest.fixture
async def reg(tmp_path: Path) -> AsyncIterator[LocalRegistry]:
    registry = LocalRegistry(tmp_path / "reg", ttl=1.0, poll_interval=0.02)
    yield registry
    await registry.close()


def write_record(directory: Path, instance: Instance, **extra: object) -> Path:
    record = instance.to_dict()
    record.update({"pid": os.getpid(), "heartbeat": time.time(), "ttl": 5.0})
    record.update(extra)
    path = directory / instance.service / f"{instance.instance_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return path


async def dead_pid() -> int:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await proc.wait()
    return proc.pid


# -- instance records --------------------------------------------------------------------


def test_instance_round_trip_and_address() -> None:
    i = inst(version="1.2.0", weight=50, tags={"zone": "a"}, health_port=9100)
    assert Instance.from_dict(json.loads(json.dumps(i.to_dict()))) == i
    assert i.address == "127.0.0.1:9000"
    assert Instance("s", "s-1", "::1", 80).address == "[::1]:80"
    retagged = Instance.from_dict(i.to_dict() | {"tags": {"zone": "b"}})
    assert hash(retagged) == hash(i)  # tags are not hashed (a dict) ...
    assert retagged != i  # ... but they are compared: a tag change is a record change
    extra = i.to_dict() | {"pid": 1, "future_field": [1]}
    assert Instance.from_dict(extra) == i


def test_instance_from_dict_says_what_was_expected() -> None:
    good = inst().to_dict()
    with pytest.raises(InvalidArgument, match=r"'port'.*integer.*str"):
        Instance.from_dict(good | {"port": "9000"})
    with pytest.raises(InvalidArgument, match=r"'weight'.*bool"):
        Instance.from_dict(good | {"weight": True})
    with pytest.raises(InvalidArgument, match="tags"):
        Instance.from_dict(good | {"tags": {"zone": 1}})
    with pytest.raises(InvalidArgument, match="tags"):
        Instance.from_dict(good | {"tags": ["zone"]})
    with pytest.raises(InvalidArgument, match="host"):
        Instance.from_dict({k: v for k, v in good.items() if k != "host"})
    with pytest.raises(InvalidArgument, match=r"JSON object.*list"):
        Instance.from_dict([good])
    with pytest.raises(InvalidArgument, match="port"):
        Instance.from_dict(good | {"port": 70000})


def test_new_instance_id_is_valid_and_unique() -> None:
    a, b = new_instance_id("echo"), new_instance_id("echo", host="my host/with:odd chars")
    assert a != new_instance_id("echo")
    assert a.startswith("echo-") and f"-{os.getpid()}-" in a
    Instance("echo", a, "h", 1)
    Instance("echo", b, "h", 1)
    Instance("x" * 128, new_instance_id("x" * 128, host="h" * 300), "h", 1)


@pytest.mark.parametrize("name", ["", "a/b", "..", ".", ".hidden", "../etc", "a b", "x" * 129, "é"])
async def test_invalid_service_names_are_rejected(reg: LocalRegistry, name: str) -> None:
    with pytest.raises(InvalidArgument, match="service name"):
        await reg.resolve(name)
    with pytest.raises(InvalidArgument, match="service name"):
        Instance(name, "id-1", "h", 1)
    with pytest.raises(InvalidArgument, match="service name"):
        await anext(reg.watch(name))


async def test_valid_edge_service_names(reg: LocalRegistry) -> None:
    for name in ["x" * 128, "a.b_c-D9", "A"]:
        await reg.register(Instance(name, "i-1", "h", 1))
        assert ids(await reg.resolve(name)) == ["i-1"]


def test_invalid_instance_id_rejected() -> None:
    with pytest.raises(InvalidArgument, match="instance id"):
        Instance("echo", "../../x", "h", 1)


# -- register / resolve / deregister -----------------------------------------------------


async def test_register_resolve_deregister(reg: LocalRegistry) -> None:
    assert await reg.resolve("echo") == []
    a = inst(version="1.0.0", tags={"zone": "a"})
    await reg.register(a)
    assert await reg.resolve("echo") == [a]
    await reg.deregister(a)
    assert await reg.resolve("echo") == []
    await reg.deregister(a)  # absent: no error


async def test_services_are_isolated(reg: LocalRegistry) -> None:
    a, b = inst("alpha", "a-1"), inst("beta", "b-1")
    await reg.register(a)
    await reg.register(b)
    assert await reg.resolve("alpha") == [a]
    assert await reg.resolve("beta") == [b]
    await reg.deregister(a)
    assert await reg.resolve("alpha") == []
    assert await reg.resolve("beta") == [b]


async def test_record_file_layout(reg: LocalRegistry) -> None:
    a = inst()
    before = time.time()
    await reg.register(a)
    after = time.time()
    service_dir = reg.directory / "echo"
    assert os.listdir(service_dir) == ["echo-1.json"]  # no temp files left behind
    record = json.loads((service_dir / "echo-1.json").read_text())
    assert record["pid"] == os.getpid()
    assert before <= record["heartbeat"] <= after  # written by this registration
    assert record["ttl"] == reg.ttl
    assert Instance.from_dict(record) == a
    assert stat.S_IMODE(os.stat(reg.directory).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(service_dir).st_mode) == 0o700


async def test_reregister_updates_record(reg: LocalRegistry) -> None:
    await reg.register(inst(weight=100))
    await reg.register(inst(weight=200))
    assert [i.weight for i in await reg.resolve("echo")] == [200]


async def test_close_withdraws_own_records_and_refuses_use(tmp_path: Path) -> None:
    async with LocalRegistry(tmp_path, ttl=1.0) as registry:
        await registry.register(inst())
        other = LocalRegistry(tmp_path)
        assert ids(await other.resolve("echo")) == ["echo-1"]
    assert await other.resolve("echo") == []
    with pytest.raises(Unavailable, match="closed"):
        await registry.register(inst())
    with pytest.raises(Unavailable, match="closed"):
        await registry.resolve("echo")
    await registry.close()  # idempotent
    await other.close()


# -- other processes, liveness, cleanup --------------------------------------------------

CHILD = """
import asyncio, sys
from meshkit.registry import Instance, LocalRegistry

async def main():
    registry = LocalRegistry(sys.argv[1], ttl=float(sys.argv[2]))
    await registry.register(Instance("echo", "child-1", "127.0.0.1", 9001, version="2.0"))
    print("registered", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def spawn_child(directory: Path, ttl: float) -> asyncio.subprocess.Process:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        str(directory),
        str(ttl),
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )


async def test_other_process_is_seen_and_vanishes_after_kill9(reg: LocalRegistry) -> None:
    seen: list[list[str]] = []

    async def follow() -> None:
        async for snapshot in reg.watch("echo"):
            seen.append(ids(snapshot))

    watcher = asyncio.create_task(follow())
    await wait_until(lambda: seen == [[]], "the initial empty snapshot")
    proc = await spawn_child(reg.directory, ttl=2.0)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), DEADLINE)
        assert line.strip() == b"registered"
        await wait_until(lambda: ["child-1"] in seen, "the watcher to see the child")
        [child] = await reg.resolve("echo")
        assert child.version == "2.0"
        path = reg.directory / "echo" / "child-1.json"
        assert json.loads(path.read_text())["pid"] == proc.pid
    finally:
        proc.kill()  # SIGKILL: no deregistration, no cleanup
        await proc.wait()
    await wait_until(lambda: seen[-1] == [], "the watcher to drop the killed child")
    assert not path.exists(), "the record of the dead process should have been removed"
    assert seen == [[], ["child-1"], []]
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher


async def test_dead_pid_records_are_removed_stale_heartbeats_kept(reg: LocalRegistry) -> None:
    dead = write_record(reg.directory, inst(instance_id="dead-1"), pid=await dead_pid())
    stale = write_record(
        reg.directory, inst(instance_id="stale-1"), heartbeat=time.time() - 100, ttl=1.0
    )
    fresh = write_record(reg.directory, inst(instance_id="fresh-1"))
    assert ids(await reg.resolve("echo")) == ["fresh-1"]
    assert not dead.exists()
    assert stale.exists() and fresh.exists()  # its process lives: maybe just paused


async def test_record_ttl_taken_from_the_record(reg: LocalRegistry) -> None:
    # Reader ttl is 1 s; the writer said 100 s, so a 50 s old heartbeat is still live.
    write_record(reg.directory, inst(), heartbeat=time.time() - 50, ttl=100.0)
    assert ids(await reg.resolve("echo")) == ["echo-1"]


async def test_temp_files_of_dead_writers_are_reaped(reg: LocalRegistry) -> None:
    await reg.register(inst())
    pid = await dead_pid()
    orphan = reg.directory / "echo" / f".echo-2.{pid}.abc123_x.tmp"
    orphan.write_text("{partial")
    live_tmp = reg.directory / "echo" / f".echo-3.{os.getpid()}.abc123_y.tmp"
    live_tmp.write_text("{partial")
    assert ids(await reg.resolve("echo")) == ["echo-1"]
    assert not orphan.exists()
    assert live_tmp.exists()


async def test_heartbeat_keeps_alive_and_recreates_deleted_record(tmp_path: Path) -> None:
    ttl = 0.6
    async with LocalRegistry(tmp_path, ttl=ttl, poll_interval=0.02) as registry:
        await registry.register(inst())
        path = tmp_path / "echo" / "echo-1.json"
        first_beat = json.loads(path.read_text())["heartbeat"]
        await asyncio.sleep(ttl * 3)
        assert ids(await registry.resolve("echo")) == ["echo-1"]
        assert json.loads(path.read_text())["heartbeat"] > first_beat

        with capture_logs() as logs:
            path.unlink()
            assert await registry.resolve("echo") == []
            await wait_until(path.exists, "the heartbeat to re-create the deleted record")
        assert ids(await registry.resolve("echo")) == ["echo-1"]
        assert any("vanished" in entry["event"] for entry in logs)

        # Even the whole directory tree may go.
        shutil.rmtree(tmp_path / "echo")
        await wait_until(path.exists, "the heartbeat to re-create the directory")
        assert ids(await registry.resolve("echo")) == ["echo-1"]


# -- watch -------------------------------------------------------------------------------


async def test_watch_snapshot_first_then_changes_without_duplicates(tmp_path: Path) -> None:
    # ttl 0.3: heartbeats rewrite the files every 0.1 s during the test; no extra yields.
    registry = LocalRegistry(tmp_path, ttl=0.3, poll_interval=0.02)
    a, b = inst(instance_id="a"), inst(instance_id="b", port=9001)
    await registry.register(a)
    seen: list[list[str]] = []
    ended = asyncio.Event()

    async def follow() -> None:
        async for snapshot in registry.watch("echo"):
            seen.append(ids(snapshot))
        ended.set()

    watcher = asyncio.create_task(follow())
    await wait_until(lambda: seen == [["a"]], "the current snapshot first")
    await registry.register(b)
    await wait_until(lambda: seen[-1] == ["a", "b"], "b to appear")
    await asyncio.sleep(0.5)  # several heartbeats and polls: nothing changed
    await registry.register(b)  # identical record rewritten: not a change
    await registry.deregister(a)
    await wait_until(lambda: seen[-1] == ["b"], "a to go")
    await registry.register(inst(instance_id="b", port=9001, weight=5))
    await wait_until(lambda: len(seen) == 4, "the changed record of b")
    await asyncio.sleep(0.3)
    assert seen == [["a"], ["a", "b"], ["b"], ["b"]]
    await registry.close()
    await asyncio.wait_for(ended.wait(), DEADLINE)  # the watch ends on close
    await watcher


async def test_watch_reports_heartbeat_expiry(reg: LocalRegistry) -> None:
    write_record(reg.directory, inst(), ttl=0.5)  # our pid: alive, but nobody heartbeats
    seen: list[list[str]] = []

    async def follow() -> None:
        async for snapshot in reg.watch("echo"):
            seen.append(ids(snapshot))

    watcher = asyncio.create_task(follow())
    await wait_until(lambda: seen == [["echo-1"], []], "the record to expire")
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher


async def test_watch_on_a_closed_registry_ends_at_once(tmp_path: Path) -> None:
    registry = LocalRegistry(tmp_path)
    await registry.close()
    with pytest.raises(Unavailable, match="closed"):
        await anext(registry.watch("echo"))


async def test_two_watches_each_get_the_snapshot(reg: LocalRegistry) -> None:
    await reg.register(inst())
    first, second = reg.watch("echo"), reg.watch("echo")
    assert ids(await anext(first)) == ["echo-1"]
    assert ids(await anext(second)) == ["echo-1"]
    await reg.close()
    with pytest.raises(StopAsyncIteration):
        await anext(first)


# -- malformed records, outages ----------------------------------------------------------


async def test_malformed_records_are_skipped_and_logged_once(reg: LocalRegistry) -> None:
    good = inst(instance_id="good-1")
    await reg.register(good)
    service_dir = reg.directory / "echo"
    (service_dir / "bad-json.json").write_text("{not json")
    (service_dir / "list.json").write_text("[1, 2]")
    write_record(reg.directory, inst(instance_id="wrong-port"), port="9000")
    write_record(reg.directory, inst(instance_id="wrong-pid"), pid="123")
    write_record(reg.directory, inst(instance_id="zero-pid"), pid=0)
    write_record(reg.directory, inst(instance_id="no-heartbeat"), heartbeat=None)
    renamed = write_record(reg.directory, inst(instance_id="orig"))
    renamed.rename(service_dir / "renamed.json")
    (service_dir / "notes.txt").write_text("ignored")
    (service_dir / "adir.json").mkdir()

    with capture_logs() as logs:
        assert await reg.resolve("echo") == [good]
        assert await reg.resolve("echo") == [good]
        watch = reg.watch("echo")
        assert await anext(watch) == [good]
        await watch.aclose()
    warnings = [e for e in logs if e["event"] == "skipping malformed registry record"]
    assert sorted(Path(e["path"]).name for e in warnings) == [
        "bad-json.json",
        "list.json",
        "no-heartbeat.json",
        "renamed.json",
        "wrong-pid.json",
        "wrong-port.json",
        "zero-pid.json",
    ]
    assert all(e["log_level"] == "warning" for e in warnings)
    assert "port" in next(e["error"] for e in warnings if "wrong-port" in e["path"])


async def test_unreadable_directory_raises_unavailable_and_sets_status(tmp_path: Path) -> None:
    root = tmp_path / "reg"
    registry = LocalRegistry(root, ttl=1.0)
    await registry.register(inst())
    assert registry.status.connected and registry.status.last_ok > 0
    root.rename(tmp_path / "moved")
    root.write_text("not a directory")  # the store is broken, not merely empty
    with pytest.raises(Unavailable, match="cannot read registry directory"):
        await registry.resolve("echo")
    assert not registry.status.connected
    assert registry.status.last_error and "NotADirectoryError" in registry.status.last_error
    with pytest.raises(Unavailable):
        await anext(registry.watch("echo"))
    root.unlink()
    (tmp_path / "moved").rename(root)
    assert ids(await registry.resolve("echo")) == ["echo-1"]
    assert registry.status.connected
    await registry.close()


def test_registry_status_transitions() -> None:
    status = RegistryStatus()
    assert status.to_dict() == {"connected": False, "last_error": None, "last_ok": 0.0}
    assert status.mark_ok() is False  # first contact is not a recovery
    assert status.mark_error(OSError("boom")) is True  # outage starts
    assert status.mark_error("again") is False  # same outage
    assert status.last_error == "again"
    assert status.mark_ok() is True  # recovered
    assert status.connected


# -- URLs and default directory ----------------------------------------------------------


def test_default_directory_precedence() -> None:
    env = {"MESHKIT_RUNTIME_DIR": "/run/mk", "XDG_RUNTIME_DIR": "/run/user/7"}
    assert default_directory(env) == Path("/run/mk/registry")
    del env["MESHKIT_RUNTIME_DIR"]
    assert default_directory(env) == Path("/run/user/7/meshkit/registry")
    assert default_directory({}) == Path(f"/tmp/meshkit-{os.getuid()}/registry")


def test_registry_from_url_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHKIT_RUNTIME_DIR", str(tmp_path / "rt"))
    monkeypatch.delenv("MESHKIT_REGISTRY", raising=False)
    default = registry_from_url()
    assert isinstance(default, LocalRegistry) and isinstance(default, Registry)
    assert default.directory == tmp_path / "rt" / "registry"
    assert default.url == "local://"
    assert not default.directory.exists()  # created on first registration, not before

    explicit = registry_from_url(f"local://{tmp_path}/abs", ttl=2.0)
    assert isinstance(explicit, LocalRegistry)
    assert (explicit.directory, explicit.ttl) == (tmp_path / "abs", 2.0)
    assert explicit.url == f"local://{tmp_path}/abs"

    monkeypatch.setenv("MESHKIT_REGISTRY", f"local://{tmp_path}/env?ttl=3&poll_interval=0.5")
    from_env = registry_from_url()
    assert isinstance(from_env, LocalRegistry)
    assert (from_env.directory, from_env.ttl, from_env.poll_interval) == (
        tmp_path / "env",
        3.0,
        0.5,
    )
    monkeypatch.setenv("MESHKIT_REGISTRY", "")
    assert registry_from_url().url == "local://"


async def test_registry_from_url_consul() -> None:
    from meshkit.registry.consul import ConsulRegistry

    registry = registry_from_url("consul://127.0.0.1:8500?ttl=5")
    assert isinstance(registry, ConsulRegistry)
    assert registry.url == "consul://127.0.0.1:8500"
    await registry.close()


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("zookeeper://zk:2181", "local://, etcd://, consul://"),
        ("127.0.0.1:2379", "local://, etcd://, consul://"),
        ("local://relative/dir", "absolute"),
        ("local://?bogus=1", "bogus"),
        ("local://?ttl=soon", "ttl"),
        ("local://?ttl=-1", "ttl"),
    ],
)
def test_registry_from_url_rejects(url: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        registry_from_url(url)
