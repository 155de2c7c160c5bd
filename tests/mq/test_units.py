"""Pure pieces of meshkit.mq: offset tracking, codecs, retry policy, subscriptions, URLs."""

from __future__ import annotations

import dataclasses
import io
import random
from typing import Any

import pydantic
import pytest
import thriftpy2
from hypothesis import given
from hypothesis import strategies as st

from meshkit.errors import ConfigError
from meshkit.mq import DecodeError, JsonCodec, RawCodec, RetryPolicy, Subscription, ThriftCodec
from meshkit.mq import headers as H
from meshkit.mq.codec import codec_for, codec_for_value
from meshkit.mq.offsets import OffsetBatch, PartitionState
from meshkit.mq.url import bootstrap_servers

events_thrift = thriftpy2.load_fp(
    io.StringIO(
        "struct OrderPlaced { 1: required string id, 2: i64 cents, 3: list<string> items }"
    ),
    module_name="events_thrift",
)


@given(
    st.lists(st.integers(0, 5), min_size=1, max_size=60, unique=True)
    .map(sorted)
    .flatmap(
        lambda gaps: st.tuples(
            st.just(gaps),
            st.lists(st.integers(1, 12), min_size=len(gaps), max_size=len(gaps)),
            st.randoms(use_true_random=False),
        )
    )
)
def test_commit_point_never_passes_an_unfinished_offset(
    case: tuple[list[int], list[int], random.Random],
) -> None:
    # Offsets with gaps (compaction, transaction markers), fetched in batches of random
    # sizes, finished in random order.
    gaps, sizes, rng = case
    offsets, at = [], 100
    for gap in gaps:
        at += gap + 1
        offsets.append(at)
    state = PartitionState("t", 0)
    batch_of: dict[int, OffsetBatch] = {}
    ends: list[int] = []  # batch ends, in fetch order
    rest = offsets[:]
    for size in sizes:
        if not rest:
            break
        chunk, rest = rest[:size], rest[size:]
        batch = state.open()
        batch.left, batch.end = len(chunk), chunk[-1] + 1
        ends.append(batch.end)
        for off in chunk:
            batch_of[off] = batch
    if rest:
        batch = state.open()
        batch.left, batch.end = len(rest), rest[-1] + 1
        ends.append(batch.end)
        for off in rest:
            batch_of[off] = batch
    assert state.in_flight == len(offsets) and state.commit_point() is None
    order = offsets[:]
    rng.shuffle(order)
    finished: set[int] = set()
    for off in order:
        completed = state.finish(batch_of[off])
        finished.add(off)
        assert completed == all(o in finished for o, b in batch_of.items() if b is batch_of[off])
        point = state.commit_point()
        unfinished = [o for o in offsets if o not in finished]
        if point is None:
            assert not all(o in finished for o in offsets if o < ends[0])
            continue
        # everything below the commit point is finished ...
        assert all(o in finished for o in offsets if o < point)
        # ... and it is as far as whole batches go: the end of the last batch that
        # finished with every earlier one, never past the first unfinished offset
        assert point in ends
        assert not unfinished or point <= unfinished[0]
        later = [e for e in ends if e > point]
        if later and unfinished:
            assert any(o < later[0] for o in unfinished)
    assert state.commit_point() == offsets[-1] + 1 and state.in_flight == 0
    assert not state.batches
    state.committed = offsets[-1] + 1
    assert state.commit_point() is None  # nothing new since the last commit


def test_revoked_partition_takes_its_batches_off_the_short_path() -> None:
    state = PartitionState("t", 0)
    first, second = state.open(fast=True), state.open(fast=True)
    first.left, first.end, second.left, second.end = 2, 10, 1, 11
    state.revoke()
    assert state.revoked and not first.fast and not second.fast
    assert state.finish(second) and state.commit_point() is None  # first still open


class Order(pydantic.BaseModel):
    id: str
    cents: int


@dataclasses.dataclass
class Refund:
    id: str
    cents: int = 0


def test_json_codec_models() -> None:
    assert codec_for(Order).decode(b'{"id":"a","cents":3}') == Order(id="a", cents=3)
    assert codec_for(Refund).decode(b'{"id":"r"}') == Refund("r", 0)
    assert codec_for(None).decode(b"[1,2]") == [1, 2]
    assert codec_for(dict).decode(b'{"a":1}') == {"a": 1}
    assert JsonCodec().encode(Refund("r", 5)) == b'{"id":"r","cents":5}'
    assert JsonCodec().encode(Order(id="a", cents=1)) == b'{"id":"a","cents":1}'
    assert JsonCodec().encode({"ü": 1}) == '{"ü":1}'.encode()


@pytest.mark.parametrize(
    ("model", "payload", "match"),
    [
        (Order, b"{nope", "not a valid Order"),
        (Order, b'{"id": "a"}', "not a valid Order"),
        (Refund, b"[1]", "JSON object for Refund"),
        (Refund, b'{"id": "r", "extra": 1}', "does not fit Refund"),
        (dict, b"[1]", "JSON dict, found list"),
        (int, b"true", "JSON int, found bool"),
        (None, b"\xff\xfe", "JSON payload"),
        (None, None, "empty"),
    ],
)
def test_json_decode_errors_are_poison(model: Any, payload: bytes | None, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        codec_for(model).decode(payload)


def test_thrift_and_raw_codecs() -> None:
    Placed = events_thrift.OrderPlaced
    value = Placed(id="o1", cents=250, items=["a", "b"])
    codec = codec_for(Placed)
    assert isinstance(codec, ThriftCodec)
    assert codec.decode(codec.encode(value)) == value
    assert isinstance(codec_for_value(value), ThriftCodec)
    with pytest.raises(DecodeError, match="OrderPlaced"):
        codec.decode(b"\x0b\x00\x01\xff\xff\xff\xff")
    with pytest.raises(TypeError, match="OrderPlaced"):
        codec.encode({"id": "x"})
    raw = codec_for(bytes)
    assert isinstance(raw, RawCodec) and raw.decode(None) == b""
    assert RawCodec().encode("é") == "é".encode() and RawCodec().encode(bytearray(b"x")) == b"x"
    with pytest.raises(TypeError, match="bytes or str"):
        RawCodec().encode(1)
    with pytest.raises(TypeError, match="pydantic model, a dataclass"):
        JsonCodec(set)
    with pytest.raises(TypeError, match="encode"):
        codec_for(None, codec=object())  # type: ignore[arg-type]


def test_retry_policy() -> None:
    policy = RetryPolicy(attempts=3, backoff=0.1, max_backoff=0.25, topic_delays=[1, 5])
    assert policy.topic_delays == (1, 5)
    assert policy.retry_topics("t") == ["t.retry.1", "t.retry.2"]
    assert 0.08 <= policy.backoff_for(1) <= 0.12
    assert 0.2 <= policy.backoff_for(5) <= 0.3  # capped, with jitter
    for bad in ({"attempts": 0}, {"backoff": -1}, {"topic_delays": (1, -1)}):
        with pytest.raises(ConfigError):
            RetryPolicy(**bad)  # type: ignore[arg-type]


def test_subscription_checks() -> None:
    async def two(msg: Any, ctx: Any) -> None: ...

    async def one(msg: Any) -> None: ...

    def sync(msg: Any, ctx: Any) -> None: ...

    assert Subscription("t", two).wants_context and Subscription("t", two).is_async
    assert not Subscription("t", one).wants_context
    assert not Subscription("t", sync).is_async
    assert Subscription("t", two).topics == ["t", "t.retry.1", "t.retry.2"]
    with pytest.raises(ConfigError, match="no positional argument"):
        Subscription("t", lambda: None)
    with pytest.raises(ConfigError, match="topic name"):
        Subscription("bad topic", two)


def test_headers_helpers() -> None:
    headers = [("a", b"1"), (H.ERROR, b"old"), ("n", None)]
    out = H.replace_headers(headers, {H.ERROR: "new", H.ATTEMPTS: None}, drop=("a",))
    assert out == [("n", b""), (H.ERROR, b"new")]
    assert H.header_map({"x": b"\xff", "y": "z"}) == {"x": "\ufffd", "y": "z"}


def test_urls() -> None:
    assert bootstrap_servers("kafka://h1:1, h2:2") == "h1:1,h2:2"
    assert bootstrap_servers("kafka://h") == "h:9092"
    for bad in ("kafka://", "kafka://:1", "kafka://h:x", "tcp://h:1"):
        with pytest.raises(ConfigError):
            bootstrap_servers(bad)
