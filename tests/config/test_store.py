"""The versioned store on every backend: versions, history, rollback, gray releases,
concurrent publishers, status records and following changes."""

from __future__ import annotations

import asyncio

import pytest
from waiting import wait_until

from meshkit.config import SHARED, ConfigStore, Selector
from meshkit.config.store import diff_values
from meshkit.errors import ConfigError, InvalidArgument


async def test_versions_and_history(store: ConfigStore) -> None:
    v1 = await store.set_key("echo", "greeting", "hi", author="ann", message="first")
    v2 = await store.set_key("echo", "db.pool_size", 5, author="bob", message="pool")
    assert (v1.version, v2.version) == (1, 2)
    assert dict(v2.values) == {"greeting": "hi", "db": {"pool_size": 5}}
    history = await store.history("echo")
    assert [(v.version, v.author, v.message, v.kind) for v in history] == [
        (1, "ann", "first", "set"),
        (2, "bob", "pool", "set"),
    ]
    assert history[0].time <= history[1].time
    state = await store.state("echo")
    assert state.current == v2 and state.gray is None
    assert (await store.version("echo", 1)).values == {"greeting": "hi"}
    assert await store.namespaces() == ["echo"]
    v3 = await store.unset_key("echo", "greeting")
    assert dict(v3.values) == {"db": {"pool_size": 5}} and v3.kind == "unset"


async def test_rollback_republishes_old_values_as_new_version(store: ConfigStore) -> None:
    await store.set_key("echo", "limit", 1)
    await store.set_key("echo", "limit", 2)
    back = await store.rollback("echo", 1, author="ops")
    assert back.version == 3 and back.kind == "rollback" and back.source == 1
    assert dict(back.values) == {"limit": 1}
    assert (await store.state("echo")).current == back
    assert "rollback to version 1" in back.message


async def test_diff_between_versions(store: ConfigStore) -> None:
    await store.replace("svc", {"a": 1, "b": {"c": 2, "d": 3}})
    await store.replace("svc", {"a": 1, "b": {"c": 5}, "e": [1]})
    one, two = await store.version("svc", 1), await store.version("svc", 2)
    assert diff_values(one.values, two.values) == [
        ("changed", "b.c", 2, 5),
        ("removed", "b.d", 3, None),
        ("added", "e", None, [1]),
    ]
    assert diff_values(two.values, two.values) == []


async def test_bad_input_is_refused_clearly(store: ConfigStore) -> None:
    with pytest.raises(ConfigError, match=r"'echo' has no version 7 \(no versions yet\)"):
        await store.version("echo", 7)
    await store.set_key("echo", "a", 1)
    with pytest.raises(ConfigError, match=r"has no version 9 \(versions 1 to 1\)"):
        await store.rollback("echo", 9)
    with pytest.raises(ConfigError, match="nothing to publish"):
        await store.set_key("echo", "a", 1)
    with pytest.raises(ConfigError, match="key 'zz' is not set"):
        await store.unset_key("echo", "zz")
    with pytest.raises(InvalidArgument, match="expected a service name"):
        await store.set_key("bad/name", "a", 1)
    with pytest.raises(InvalidArgument, match="dotted config key"):
        await store.set_key("echo", "a..b", 1)
    assert [v.version for v in await store.history("echo")] == [1]  # nothing lost


async def test_concurrent_publishers_all_land(store: ConfigStore) -> None:
    results = await asyncio.gather(*(store.set_key("echo", f"k{i}", i) for i in range(6)))
    assert sorted(v.version for v in results) == [1, 2, 3, 4, 5, 6]
    current = (await store.state("echo")).current
    assert current is not None and dict(current.values) == {f"k{i}": i for i in range(6)}


async def test_gray_release_promote_and_abort(store: ConfigStore) -> None:
    await store.set_key("echo", "limit", 1)
    canary = Selector(tags={"canary": "true"})
    gray = await store.gray_publish("echo", lambda v: {**v, "limit": 2}, canary, message="try")
    assert gray.version == 2 and gray.kind == "gray"
    state = await store.state("echo")
    assert state.gray is not None and state.current is not None
    assert state.for_instance("a", {"canary": "true"}) == gray
    assert state.for_instance("b", {}).version == 1  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="gray release of 'echo' version 2 is in progress"):
        await store.set_key("echo", "limit", 3)
    promoted = await store.gray_promote("echo")
    assert promoted.version == 2 and promoted.outcome == "promoted"
    state = await store.state("echo")
    assert state.gray is None and state.current == promoted
    assert (await store.version("echo", 2)).outcome == "promoted"

    await store.gray_publish("echo", lambda v: {**v, "limit": 9}, Selector(instances=("x",)))
    aborted = await store.gray_abort("echo")
    assert aborted.outcome == "aborted"
    state = await store.state("echo")
    assert state.gray is None and state.current is not None and state.current.version == 2
    with pytest.raises(ConfigError, match="no gray release of 'echo' is in progress"):
        await store.gray_abort("echo")
    # The next version number is not reused.
    assert (await store.set_key("echo", "limit", 4)).version == 4


def test_selector_rules() -> None:
    both = Selector(instances=("a", "b"), tags={"zone": "z1"})
    assert both.matches("ns", "a", {"zone": "z1"})
    assert not both.matches("ns", "a", {"zone": "z2"})
    assert not both.matches("ns", "c", {"zone": "z1"})
    ids = [f"i{n}" for n in range(400)]
    ten = {i for i in ids if Selector(percent=10).matches("ns", i, {})}
    thirty = {i for i in ids if Selector(percent=30).matches("ns", i, {})}
    assert ten <= thirty  # raising the percentage only adds instances
    assert 10 < len(ten) < 80 and 70 < len(thirty) < 170
    assert not any(Selector(percent=0).matches("ns", i, {}) for i in ids)
    with pytest.raises(InvalidArgument, match="instances, tags or percent"):
        Selector()
    with pytest.raises(InvalidArgument, match="between 0 and 100"):
        Selector(percent=101)


async def test_status_records(store: ConfigStore) -> None:
    from meshkit.config import InstanceStatus

    status = InstanceStatus(
        "echo", "echo-1", {"echo": 3, SHARED: 0}, {}, {"zone": "a"}, ("pw",), 1.0
    )
    await store.write_status(status)
    await store.write_status(InstanceStatus("web", "web-1", {"web": 1}, {}, {}, (), 1.0))
    assert await store.statuses("echo") == [status]
    assert len(await store.statuses()) == 2
    await store.delete_status("echo", "echo-1")
    assert await store.statuses("echo") == []


async def test_follow_sees_every_change_in_order(store: ConfigStore) -> None:
    seen: list[int] = []

    async def follow() -> None:
        async for state in store.follow("echo"):
            seen.append(state.current.version if state.current else 0)

    task = asyncio.create_task(follow())
    try:
        await wait_until(lambda: seen == [0], "the initial state")
        for i in range(1, 6):
            await store.set_key("echo", "n", i)
            await wait_until(lambda i=i: seen[-1] == i, f"version {i}")
        assert seen == [0, 1, 2, 3, 4, 5]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
