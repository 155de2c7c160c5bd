"""Store outages: etcd stopped or killed and restarted, the watch resumes from the last
revision it saw — no version lost or applied out of order, the last good config kept
meanwhile — and the local store's journal (compaction, a torn write)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import etcd_url
from etcd_server import EtcdServer
from prometheus_client import CollectorRegistry
from pydantic import BaseModel
from waiting import wait_until

from meshkit.config import Compacted, ConfigChange, ServiceConfig, store_from_url
from meshkit.config.local import LocalKV


class Settings(BaseModel):
    n: int = 0


@pytest.mark.parametrize("kill", [False, True], ids=["stop", "kill"])
async def test_etcd_outage_resume_without_lost_or_reordered_versions(
    etcd: EtcdServer, kill: bool
) -> None:
    url = etcd_url(etcd)
    publisher = store_from_url(url)
    await publisher.set_key("echo", "n", 1)
    registry = CollectorRegistry()
    cfg = ServiceConfig("echo", Settings, store=url, environ={}, metrics_registry=registry)
    applied: list[int] = []

    @cfg.on_change
    async def record(change: ConfigChange[Settings]) -> None:
        applied.append(change.new.n)

    await cfg.start("echo-1", {})
    try:
        assert cfg.value.n == 1
        await publisher.set_key("echo", "n", 2)
        await wait_until(lambda: applied == [2], "version 2 before the outage")

        await (etcd.akill() if kill else etcd.astop())
        await wait_until(lambda: cfg.info()["store_reachable"] is False, "the outage noticed")
        assert cfg.value.n == 2  # the last good config stays in force
        up = registry.get_sample_value("meshkit_config_store_up", {"service": "echo"})
        assert up == 0

        await etcd.astart()
        # Publish a burst right away: the watcher is still reconnecting and must catch up
        # from its last revision, applying each version once and in order.
        for n in range(3, 9):
            await _retry(lambda n=n: publisher.set_key("echo", "n", n))
        await wait_until(lambda: cfg.value.n == 8, "the last version applied", limit=20)
        # Callbacks run in their own task after the swap: wait for the last one to be heard.
        await wait_until(lambda: applied[-1] == 8, "the callback of the last version")
        assert applied == [2, 3, 4, 5, 6, 7, 8]
        assert cfg.versions["echo"] == 8
        await wait_until(lambda: cfg.info()["store_reachable"] is True, "recovery noticed")
    finally:
        await cfg.stop()
        await publisher.close()


async def _retry(fn: Any, limit: float = 15.0) -> Any:
    from meshkit.errors import Unavailable

    deadline = asyncio.get_running_loop().time() + limit
    while True:
        try:
            return await fn()
        except Unavailable:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_etcd_compacted_history_reads_state_again(etcd: EtcdServer) -> None:
    import aetcd

    url = etcd_url(etcd)
    publisher = store_from_url(url)
    await publisher.set_key("echo", "n", 1)
    cfg = ServiceConfig(
        "echo", Settings, store=url, environ={}, metrics_registry=CollectorRegistry()
    )
    await cfg.start("echo-1", {})
    try:
        await etcd.astop()
        await wait_until(lambda: cfg.info()["store_reachable"] is False, "the outage noticed")
        await etcd.astart()
        for n in range(2, 5):
            await _retry(lambda n=n: publisher.set_key("echo", "n", n))
        client = aetcd.Client("127.0.0.1", etcd.client_port)
        try:
            status = await client.get(b"/nothing")
            del status
            head = await client.get_prefix(b"/")
            await client.compact(int(head.header.revision))
        finally:
            await client.close()
        await wait_until(lambda: cfg.value.n == 4, "the latest version after compaction", limit=20)
    finally:
        await cfg.stop()
        await publisher.close()


async def test_local_store_across_processes(local_url: str, tmp_path: Path) -> None:
    """Another process publishes; this one's watcher applies it."""
    cfg = ServiceConfig(
        "echo", Settings, store=local_url, environ={}, metrics_registry=CollectorRegistry()
    )
    await cfg.start("echo-1", {})
    try:
        script = (
            "import asyncio, sys\n"
            "from meshkit.config import store_from_url\n"
            "async def main():\n"
            "    s = store_from_url(sys.argv[1])\n"
            "    for n in range(1, 4):\n"
            "        await s.set_key('echo', 'n', n)\n"
            "asyncio.run(main())\n"
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, local_url, stderr=asyncio.subprocess.PIPE
        )
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        await wait_until(lambda: cfg.value.n == 3, "the other process's version 3")
        assert cfg.versions["echo"] == 3
    finally:
        await cfg.stop()


async def test_local_journal_compaction(tmp_path: Path) -> None:
    kv = LocalKV(tmp_path / "c", max_journal=2048)
    store_url = f"local://{tmp_path / 'c'}?max_journal=2048"
    store = store_from_url(store_url)
    await store.set_key("echo", "n", 0)
    events: list[int] = []

    async def follow() -> None:
        async for state in store.follow("echo"):
            events.append(state.current.values["n"] if state.current else -1)  # type: ignore[index]

    task = asyncio.create_task(follow())
    try:
        await wait_until(lambda: events == [0], "initial state")
        for n in range(1, 40):  # several journal rotations
            await store.set_key("echo", "n", n, message="x" * 40)
        await wait_until(lambda: events[-1:] == [39], "the last version")
        # Never out of order or repeated; a watcher that fell behind a rotation reads the
        # state again (it may skip versions then, as after an etcd compaction).
        assert events == sorted(events) and len(set(events)) == len(events)
        with pytest.raises(Compacted, match="compacted revisions up to"):
            async for _ in kv.watch("echo/", 1):
                break
        header = json.loads((tmp_path / "c" / "journal").read_bytes().splitlines()[0])
        assert header["base"] > 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()
        await kv.close()


async def test_local_torn_write_is_repaired(tmp_path: Path) -> None:
    store = store_from_url(f"local://{tmp_path / 'c'}")
    await store.set_key("echo", "n", 1)
    journal = tmp_path / "c" / "journal"
    # A writer died after appending a full line (not applied) and half of another.
    line = {"rev": 99, "ops": [["echo/head/x", "1"]]}
    with open(journal, "ab") as f:
        f.write(json.dumps(line).encode() + b"\n" + b'{"rev": 100, "op')
    await store.set_key("echo", "n", 2)
    kv = LocalKV(tmp_path / "c")
    entry = await kv.get("echo/head/x")
    assert entry is not None and entry.mod_revision == 99
    assert (await store.state("echo")).current.values == {"n": 2}  # type: ignore[union-attr]
    assert b'"rev": 100' not in journal.read_bytes()
    await store.close()


def test_bad_store_urls() -> None:
    from meshkit.errors import ConfigError

    for url, message in [
        ("redis://x", "expected a config store URL with scheme local://, etcd://, consul://"),
        ("local://relative/dir", "three slashes"),
        ("local:///tmp/x?bogus=1", "expected local:// parameters"),
        ("local:///tmp/x?poll_interval=fast", "poll_interval to be a number"),
        ("etcd://", "expected etcd://host:port"),
        ("etcd://h:99999", "port between 1 and 65535"),
        ("etcd://h:2379/path", "set the key prefix with ?prefix="),
        ("etcd://h:2379?ttl=3", "expected etcd:// parameters"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("?", r"\?").replace("/", "/")):
            store_from_url(url)


async def test_etcd_rebuilt_without_data_keeps_config_and_follows_new_versions(
    etcd: EtcdServer,
) -> None:
    url = etcd_url(etcd)
    publisher = store_from_url(url)
    for n in (1, 2, 3):
        await publisher.set_key("echo", "n", n)
    cfg = ServiceConfig(
        "echo", Settings, store=url, environ={}, metrics_registry=CollectorRegistry()
    )
    await cfg.start("echo-1", {})
    try:
        assert cfg.value.n == 3
        await etcd.astop()
        await wait_until(lambda: cfg.info()["store_reachable"] is False, "the outage noticed")
        await etcd.arestart(fresh=True)  # back with every key and revision lost
        await wait_until(lambda: cfg.info()["store_reachable"] is True, "back", limit=20)
        assert cfg.value.n == 3  # the store is empty: the version in force stays
        await _retry(lambda: publisher.set_key("echo", "n", 7))  # version 1 of the new store
        await wait_until(lambda: cfg.value.n == 7, "a version published after the reset")
    finally:
        await cfg.stop()
        await publisher.close()


async def test_local_store_wiped_keeps_config_and_follows_new_versions(tmp_path: Path) -> None:
    import shutil

    directory = tmp_path / "c"
    url = f"local://{directory}"
    publisher = store_from_url(url)
    for n in (1, 2, 3):
        await publisher.set_key("echo", "n", n)
    cfg = ServiceConfig(
        "echo", Settings, store=url, environ={}, metrics_registry=CollectorRegistry()
    )
    await cfg.start("echo-1", {})
    try:
        await publisher.set_key("echo", "n", 4)
        await wait_until(lambda: cfg.value.n == 4, "the watch running")
        shutil.rmtree(directory)
        await publisher.set_key("echo", "n", 7)  # version 1 of a new store
        await wait_until(lambda: cfg.value.n == 7, "the version published after the wipe")
    finally:
        await cfg.stop()
        await publisher.close()
