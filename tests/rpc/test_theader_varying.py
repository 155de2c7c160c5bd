"""THeader blocks with per-call headers (``traceparent``, ``meshkit-timeout-ms``).

The encoder caches the head of such a block (everything but those two pairs) and writes
the two last; the decoder recognises a trailing ``traceparent`` pair and caches the head.
These tests hold the cached paths to the plain ones: the same headers, the same errors,
bytes any THeader peer reads, and caches that stay bounded.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from thrift.transport.THeaderTransport import THeaderClientType, THeaderTransport
from thrift.transport.TTransport import TMemoryBuffer

from meshkit.errors import FrameError
from meshkit.rpc import theader
from meshkit.rpc.context import TIMEOUT_KEY
from meshkit.rpc.theader import (
    HeaderLimits,
    ProtocolId,
    TransformId,
    decode_frame,
    encode_frame,
)

TRACE = "traceparent"
PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
CACHES = ("_BLOCKS", "_PARSED", "_HEADS", "_PARSED_HEADS")


@pytest.fixture(autouse=True)
def empty_caches() -> Iterator[None]:
    for name in CACHES:
        getattr(theader, name).clear()
    yield
    for name in CACHES:
        getattr(theader, name).clear()


def _body(frame: bytes) -> bytes:
    (length,) = struct.unpack("!I", frame[:4])
    assert length == len(frame) - 4
    return frame[4:]


def _block(frame: bytes) -> bytes:
    """The info sections of a frame without transforms (after protocol id, count 0)."""
    words = struct.unpack_from("!H", frame, 12)[0]
    assert frame[14:16] in (b"\x00\x00", b"\x02\x00")
    return frame[16 : 14 + words * 4]


def _traceparent(n: int) -> str:
    return f"00-{n:032x}-{n:016x}-01"


def _full_parse(block: bytes, max_headers: int = 128) -> dict[str, str] | str:
    """What the uncached parser makes of ``block``: the headers or the error message."""
    try:
        return theader._parse_info_sections(block, max_headers)[0]
    except FrameError as exc:
        return str(exc)


def _parse(block: bytes, max_headers: int = 128) -> dict[str, str] | str:
    try:
        return theader._parse_info(block, max_headers)
    except FrameError as exc:
        return str(exc)


# --------------------------------------------------------------------- round trips

texts = st.text(max_size=20)
# keys drawn to hit the varying ones often, values to give a well-formed traceparent often
keys = st.one_of(st.sampled_from([TRACE, TIMEOUT_KEY, "meshkit-caller", "a", ""]), texts)
values = st.one_of(
    st.builds(_traceparent, st.integers(1, 2**64 - 1)),
    st.integers(0, 10**9).map(str),
    texts,
    st.text(min_size=120, max_size=200),
)
header_dicts = st.dictionaries(keys, values, max_size=6)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    headers=header_dicts,
    protocol=st.sampled_from([ProtocolId.BINARY, ProtocolId.COMPACT]),
    transforms=st.sampled_from([(), (TransformId.ZLIB,)]),
    seqid=st.integers(-(2**31), 2**31 - 1),
    payload=st.binary(max_size=64),
)
def test_round_trip_with_and_without_varying_headers(
    headers: dict[str, str],
    protocol: int,
    transforms: tuple[int, ...],
    seqid: int,
    payload: bytes,
) -> None:
    frame = encode_frame(
        payload, seqid=seqid, headers=headers, protocol_id=protocol, transforms=transforms
    )
    for _ in range(2):  # the second time from the caches
        assert (
            encode_frame(
                payload,
                seqid=seqid,
                headers=dict(headers),
                protocol_id=protocol,
                transforms=transforms,
            )
            == frame
        )
        got = decode_frame(_body(frame))
        assert got.headers == headers
        assert got.payload == payload
        assert got.seqid == seqid
        assert got.protocol_id == protocol
        # the others in the mapping's order, then the budget, then the trace context
        others = [k for k in headers if k not in (TRACE, TIMEOUT_KEY)]
        last = [k for k in (TIMEOUT_KEY, TRACE) if k in headers]
        assert list(got.headers) == others + last


def test_order_of_the_varying_headers_in_the_mapping_does_not_matter() -> None:
    stable = {"meshkit-caller": "gateway", "user": "42"}
    orders = [
        {**stable, TRACE: PARENT, TIMEOUT_KEY: "4999"},
        {**stable, TIMEOUT_KEY: "4999", TRACE: PARENT},
        {TRACE: PARENT, **stable, TIMEOUT_KEY: "4999"},
        {TIMEOUT_KEY: "4999", "meshkit-caller": "gateway", TRACE: PARENT, "user": "42"},
    ]
    frames = {encode_frame(b"p", seqid=1, headers=h) for h in orders}
    assert len(frames) == 1
    (frame,) = frames
    assert _block(frame) == (
        b"\x01\x04"
        b"\x0emeshkit-caller\x07gateway"
        b"\x04user\x0242"
        b"\x12meshkit-timeout-ms\x044999"
        b"\x0btraceparent\x37" + PARENT.encode() + b"\x00"  # 127 + 1: 32 words
    )


def test_traced_blocks_share_one_cached_head_each_way() -> None:
    for i in range(1, 200):
        headers = {"meshkit-caller": "gateway", TRACE: _traceparent(i), TIMEOUT_KEY: str(i)}
        frame = encode_frame(b"p", seqid=i, headers=headers)
        assert decode_frame(_body(frame)).headers == headers
    assert len(theader._HEADS) == 1  # (caller, 3 headers): budget and trace appended
    # parsed: the head with each budget, and the head without it (one entry)
    assert len(theader._PARSED_HEADS) == 199 + 1
    assert not theader._BLOCKS and not theader._PARSED


@pytest.mark.parametrize(
    "headers",
    [
        {TRACE: PARENT},
        {TRACE: PARENT, TIMEOUT_KEY: "5000"},
        {TIMEOUT_KEY: "5000"},
        {"a": "b", TRACE: "00-short-01"},  # not 55 characters: a plain pair
        {"a": "b", TRACE: "ü" * 55},  # 55 characters, 110 bytes
        {"a": "b", TRACE: PARENT, TIMEOUT_KEY: "9" * 200},  # a two-byte length
        {"a": "b", TRACE: PARENT, TIMEOUT_KEY: "é"},
        {"k" * 300: "v" * 3000, TRACE: PARENT, TIMEOUT_KEY: "1"},  # head too big to cache
        {"ключ": "значение", TRACE: PARENT, TIMEOUT_KEY: "12"},
        {"x": PARENT, "y": "\x0btraceparent\x37" + PARENT, TRACE: PARENT},
        {"x": "\x12meshkit-timeout-ms\x041234", TRACE: PARENT, TIMEOUT_KEY: "1"},
    ],
)
def test_unusual_varying_headers_round_trip(headers: dict[str, str]) -> None:
    frame = encode_frame(b"payload", seqid=3, headers=headers)
    for _ in range(2):
        assert decode_frame(_body(frame)).headers == headers
        assert _parse(_block(frame)) == _full_parse(_block(frame))


# ------------------------------------------------------------ the cached parse = the full one


def _pair(key: bytes, value: bytes) -> bytes:
    return theader._varint(len(key)) + key + theader._varint(len(value)) + value


blocks_with_a_trace_tail = st.builds(
    lambda head_pairs, count_delta, timeout, pad, trace: (
        b"\x01"
        + theader._varint(max(0, len(head_pairs) + (timeout is not None) + 1 + count_delta))
        + b"".join(_pair(k, v) for k, v in head_pairs)
        + (b"" if timeout is None else _pair(b"meshkit-timeout-ms", timeout))
        + b"\x0btraceparent\x37"
        + trace
        + b"\x00" * pad
    ),
    st.lists(
        st.tuples(
            st.one_of(st.sampled_from([b"traceparent", b"meshkit-timeout-ms", b"a"]), st.binary()),
            st.binary(max_size=30),
        ),
        max_size=4,
    ),
    st.sampled_from([0, 0, 0, -1, 1, 127]),
    st.one_of(st.none(), st.binary(max_size=12), st.sampled_from([b"4999", b"\xff"])),
    st.integers(0, 5),
    st.one_of(st.just(PARENT.encode()), st.binary(min_size=55, max_size=55)),
)


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(
    block=blocks_with_a_trace_tail,
    flips=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=2),
    cut=st.integers(0, 3),
    max_headers=st.sampled_from([128, 3, 1]),
)
def test_cached_parse_equals_full_parse(
    block: bytes, flips: list[tuple[int, int]], cut: int, max_headers: int
) -> None:
    """Whatever the block (well-formed, corrupted, truncated), the fast path's headers or
    error are exactly those of the full parse, first from an empty cache, then warm."""
    data = bytearray(block)
    for at, byte in flips:
        if at < len(data):
            data[at] = byte
    mangled = bytes(data[: len(data) - cut] if cut < len(data) else data)
    for name in CACHES:
        getattr(theader, name).clear()
    expected = _full_parse(mangled, max_headers)
    assert _parse(mangled, max_headers) == expected
    assert _parse(mangled, max_headers) == expected  # from the caches
    # a head cached under a loose limit does not let a strict one pass
    assert _parse(mangled, 128) == _full_parse(mangled, 128)
    assert _parse(mangled, max_headers) == expected


def test_limit_applies_to_a_cached_head() -> None:
    headers = {f"k{i}": "v" for i in range(4)} | {TRACE: PARENT, TIMEOUT_KEY: "10"}
    body = _body(encode_frame(b"", seqid=0, headers=headers))
    assert decode_frame(body, limits=HeaderLimits(max_headers=6)).headers == headers
    with pytest.raises(FrameError, match="expected at most 5 headers, found 6"):
        decode_frame(body, limits=HeaderLimits(max_headers=5))


def test_limit_applies_to_a_cached_block_with_repeated_keys() -> None:
    """The limit counts the headers a block declares, not the distinct keys parsed."""
    block = b"\x00\x00" + b"\x01\x03\x01a\x01b\x01a\x01c\x01d\x01e"  # 16 bytes
    body = struct.pack("!HHiH", 0x0FFF, 0, 1, len(block) // 4) + block
    assert decode_frame(body).headers == {"a": "c", "d": "e"}
    with pytest.raises(FrameError, match="expected at most 2 headers, found 3"):
        decode_frame(body, limits=HeaderLimits(max_headers=2))


_TRACE_PAIR = _pair(TRACE.encode(), PARENT.encode())


@pytest.mark.parametrize(
    ("block", "message"),
    [
        # the count says 4 pairs; 2 are there (the traceparent one last)
        (b"\x01\x04\x01a\x01b" + _TRACE_PAIR, "expected a varint header (key|value) length"),
        # a value runs past the head into the traceparent pair
        (b"\x01\x02\x01a\x20b" + _TRACE_PAIR, "expected a header key of 100 bytes"),
        (b"\x01\x02\x02\xff\xfe\x01b" + _TRACE_PAIR, "expected a utf-8 header key"),
        (b"\x01\x02\x01a\x02\xc3\x28" + _TRACE_PAIR, "expected a utf-8 header value"),
        (b"\x01\x81\x01\x01a\x01b" + _TRACE_PAIR, "expected at most 128 headers, found 129"),
    ],
)
def test_malformed_traced_blocks_keep_their_errors(block: bytes, message: str) -> None:
    for pad in (b"", b"\x00", b"\x00\x00\x00"):
        for _ in range(2):
            with pytest.raises(FrameError, match=message):
                theader._parse_info(block + pad, 128)


def test_a_traced_section_followed_by_another_is_parsed_in_full() -> None:
    block = b"\x01\x02\x01a\x01b" + _TRACE_PAIR + b"\x00\x01\x01\x01c\x01d"
    expected = {"a": "b", TRACE: PARENT}  # padding (0) ends the info sections
    assert _parse(block) == _full_parse(block) == expected
    block = b"\x01\x01\x01a\x01b\x01\x01" + _TRACE_PAIR  # two sections
    assert _parse(block) == _full_parse(block) == {"a": "b", TRACE: PARENT}


def test_a_cached_head_is_used_only_for_the_pairs_it_misses() -> None:
    """The head of one block (before its budget pair) may be the whole head of another,
    where it lacks a different number of pairs: that one is parsed in full."""
    caller = b"\x01\x03" + _pair(b"meshkit-caller", b"gateway")
    first = caller + _pair(TIMEOUT_KEY.encode(), b"10") + _TRACE_PAIR
    assert _parse(first) == {"meshkit-caller": "gateway", TIMEOUT_KEY: "10", TRACE: PARENT}
    second = caller + _TRACE_PAIR  # 3 declared, 2 there
    assert isinstance(_full_parse(second), str)
    assert _parse(second) == _full_parse(second)


def test_a_budget_pair_with_a_long_length_is_not_taken_for_one_byte() -> None:
    """A length byte >= 0x80 starts a longer varint: the pair is not the budget it looks
    like from the end of the block."""
    region = b"\x00" + b"12345" + b"\x02kk\x7b" + b"v" * 123  # 133 bytes after 0x85
    block = (
        b"\x01\x03"
        + _pair(b"a", b"b")
        + b"\x12meshkit-timeout-ms\x85"
        + region
        + _TRACE_PAIR
        + b"\x00"
    )
    expected = {"a": "b", TIMEOUT_KEY: "12345", "kk": "v" * 123}  # id 0x0b ends the parse
    assert _full_parse(block) == expected
    assert _parse(block) == expected
    assert _parse(block) == expected


# ------------------------------------------------------------------------------ bounds


def test_caches_stay_bounded() -> None:
    for i in range(3 * theader._CACHE_SIZE):
        caller = f"service-{i}"
        for headers in (
            {"meshkit-caller": caller, TRACE: _traceparent(i + 1), TIMEOUT_KEY: str(i)},
            {"meshkit-caller": caller, TIMEOUT_KEY: str(i)},
            {"meshkit-caller": caller},
        ):
            frame = encode_frame(b"p", seqid=i, headers=headers)
            assert decode_frame(_body(frame)).headers == headers
    for name in CACHES:
        assert 0 < len(getattr(theader, name)) <= theader._CACHE_SIZE, name


# ----------------------------------------------------------------------------- interop


@pytest.mark.parametrize("transforms", [(), (TransformId.ZLIB,)])
@pytest.mark.parametrize("timeout", [None, "4999"])
def test_apache_reads_traced_frames(transforms: tuple[int, ...], timeout: str | None) -> None:
    headers = {"meshkit-caller": "gateway", TRACE: PARENT}
    if timeout is not None:
        headers[TIMEOUT_KEY] = timeout
    for i in range(3):  # the first from an empty cache, then cached heads
        headers[TRACE] = _traceparent(i + 1)
        wire = encode_frame(b"PAYLOAD", seqid=i, headers=headers, transforms=transforms)
        apache = THeaderTransport(TMemoryBuffer(wire), (THeaderClientType.HEADERS,))
        assert apache.read(7) == b"PAYLOAD"
        assert apache.get_headers() == {k.encode(): v.encode() for k, v in headers.items()}
        assert apache.sequence_id == i


def test_traced_frames_apache_writes_are_read_on_the_fast_path() -> None:
    """An Apache (OTel-instrumented) peer writes traceparent wherever it likes; last or not,
    the headers are the same."""
    for order in ([b"a", b"traceparent"], [b"traceparent", b"a"]):
        for i in range(2):
            buf = TMemoryBuffer()
            writer = THeaderTransport(buf, (THeaderClientType.HEADERS,))
            values = {b"a": b"b", b"traceparent": _traceparent(i + 1).encode()}
            for key in order:
                writer.set_header(key, values[key])
            writer.write(b"PAYLOAD")
            writer.flush()
            got = decode_frame(_body(buf.getvalue()))
            assert got.headers == {k.decode(): v.decode() for k, v in values.items()}
            assert got.payload == b"PAYLOAD"
    assert theader._PARSED_HEADS  # the traceparent-last frames took the cached path
