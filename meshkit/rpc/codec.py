"""Thrift message encoding on thriftpy2's protocols (Cython binary, compact).

The payload inside a THeader/framed/unframed frame is one Thrift message: a
message header (name, type, seq id) followed by one struct. thriftpy2's Cython
decoder trusts declared lengths, so every payload is scanned first
(:func:`meshkit.rpc.framing.unframed_message_length`): a truncated or lying
message is rejected before it can allocate or loop on a forged size.
"""

from __future__ import annotations

from typing import Any

from thriftpy2.protocol.compact import TCompactProtocol
from thriftpy2.protocol.cybin import TCyBinaryProtocol  # type: ignore[attr-defined]
from thriftpy2.thrift import TApplicationException, TMessageType
from thriftpy2.transport import TCyMemoryBuffer
from thriftpy2.transport.memory import TMemoryBuffer

from ..errors import FrameError
from .framing import unframed_message_length
from .theader import ProtocolId

__all__ = [
    "MessageReader",
    "TMessageType",
    "encode_message",
    "read_message",
]


class MessageReader:
    """A decoded message header with the protocol positioned at the body struct."""

    __slots__ = ("mtype", "name", "proto", "seqid")

    def __init__(self, name: str, mtype: int, seqid: int, proto: Any) -> None:
        self.name = name
        self.mtype = mtype
        self.seqid = seqid
        self.proto = proto

    def read_struct(self, obj: Any) -> Any:
        """Fill ``obj`` (a thriftpy2 struct) from the message body."""
        self.proto.read_struct(obj)
        return obj

    def read_application_exception(self) -> TApplicationException:
        exc = TApplicationException()
        self.proto.read_struct(exc)
        return exc


def read_message(payload: bytes, protocol_id: int) -> MessageReader:
    """Validate a whole message and decode its header.

    Raises :class:`FrameError` when the bytes are not exactly one well-formed
    message of the given protocol.
    """
    length = unframed_message_length(payload, protocol_id, limit=len(payload))
    if length is None:
        raise FrameError(
            f"expected a complete Thrift message of {len(payload)} bytes, found a truncated one"
        )
    if length != len(payload):
        raise FrameError(
            f"expected exactly one Thrift message in {len(payload)} bytes, found "
            f"{len(payload) - length} bytes after it"
        )
    if protocol_id == ProtocolId.BINARY:
        proto: Any = TCyBinaryProtocol(TCyMemoryBuffer(payload), decode_response=True)
    elif protocol_id == ProtocolId.COMPACT:
        proto = TCompactProtocol(TMemoryBuffer(payload))
    else:
        raise FrameError(f"expected protocol id 0 (binary) or 2 (compact), found {protocol_id}")
    try:
        name, mtype, seqid = proto.read_message_begin()
    except Exception as exc:
        raise FrameError(f"malformed Thrift message header: {exc}") from None
    return MessageReader(name, mtype, seqid, proto)


def encode_message(name: str, mtype: int, seqid: int, body: Any, protocol_id: int) -> bytes:
    """Encode one message (header + struct) with the given protocol."""
    if protocol_id == ProtocolId.BINARY:
        buf = TCyMemoryBuffer()
        proto = TCyBinaryProtocol(buf)
        proto.write_message_begin(name, mtype, seqid)
        proto.write_struct(body)
        return buf.getvalue()  # type: ignore[no-any-return]
    mbuf = TMemoryBuffer()
    cproto = TCompactProtocol(mbuf)
    cproto.write_message_begin(name, mtype, seqid)
    cproto.write_struct(body)
    return mbuf.getvalue()  # type: ignore[no-any-return]
