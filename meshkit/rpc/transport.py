"""The client's last stage: encode, send on a pooled connection, await and decode the reply."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from thriftpy2.thrift import TApplicationException, TMessageType

from ..errors import (
    DeadlineExceeded,
    FrameError,
    Internal,
    InvalidArgument,
    MeshkitError,
    error_for_code,
)
from .codec import encode_message, read_message
from .connection import ConnectionPool
from .context import CANCEL_FEATURE, FEATURES_KEY, STATUS_KEY, TIMEOUT_KEY, CallContext
from .handler import MethodSpec
from .theader import ProtocolId, encode_frame

_monotonic = time.monotonic

_CODE_FOR_APP_EXC = {
    TApplicationException.UNKNOWN_METHOD: "UNIMPLEMENTED",
    TApplicationException.PROTOCOL_ERROR: "INVALID_ARGUMENT",
    11: "RESOURCE_EXHAUSTED",
    12: "DEADLINE_EXCEEDED",
}


def error_from_application_exception(
    exc: TApplicationException, headers: dict[str, str]
) -> MeshkitError:
    """Map a peer's TApplicationException (and meshkit status header) to a MeshkitError."""
    message = exc.message or f"TApplicationException type {exc.type}"
    code = headers.get(STATUS_KEY) or _CODE_FOR_APP_EXC.get(exc.type, "INTERNAL")
    prefix = f"[{code}] "
    if message.startswith(prefix):
        message = message[len(prefix) :]
    return error_for_code(code, message)


class Transport:
    """Terminal stage of the client pipeline."""

    name = "transport"

    def __init__(
        self,
        pool: ConnectionPool,
        specs: dict[str, MethodSpec],
        protocol_id: int = ProtocolId.BINARY,
    ) -> None:
        self.pool = pool
        self.specs = specs
        self.protocol_id = protocol_id

    async def __call__(self, ctx: CallContext) -> Any:
        endpoint = ctx.endpoint
        assert endpoint is not None, "the pick stage must run before the transport"
        conn = self.pool.get_ready(endpoint) or await self.pool.get(endpoint)
        seqid = conn.next_seqid()
        spec = self.specs[ctx.method]
        mtype = TMessageType.ONEWAY if spec.oneway else TMessageType.CALL
        try:
            payload = encode_message(ctx.method, mtype, seqid, ctx.args, self.protocol_id)
        except Exception as exc:
            raise InvalidArgument(
                f"arguments of {ctx.service}.{ctx.method} do not match the IDL: "
                f"{type(exc).__name__}: {exc}"
            ) from None
        headers = ctx.headers
        deadline = ctx.deadline
        if deadline is not None:
            # The budget on the wire is relative: what is left now, as this attempt leaves.
            left = deadline - _monotonic()
            if left <= 0:
                raise DeadlineExceeded(
                    f"call {ctx.service}.{ctx.method} not sent: its budget ran out before "
                    f"attempt {ctx.attempt} could leave ({-left * 1000:.1f} ms past the deadline)"
                )
            headers[TIMEOUT_KEY] = str(int(left * 1000) or 1)  # at least 1 ms: 0 means spent
        if not conn.announced:
            # First frame on this connection: say what we support (see FEATURES_KEY).
            conn.announced = True
            headers = {**headers, FEATURES_KEY: CANCEL_FEATURE}
        frame = encode_frame(payload, seqid=seqid, headers=headers, protocol_id=self.protocol_id)
        if spec.oneway:
            conn.send_oneway(frame)
            return None
        fut = conn.send(seqid, frame, deadline)
        try:
            reply = await fut
        except asyncio.CancelledError:
            conn.forget(seqid)
            raise
        finally:
            conn.settle(seqid)
        ctx.response_headers = reply.headers
        try:
            reader = read_message(reply.payload, reply.protocol_id)
            if reader.mtype == TMessageType.EXCEPTION:
                app_exc = reader.read_application_exception()
                raise error_from_application_exception(app_exc, reply.headers)
            result = reader.read_struct(spec.result_cls())
        except FrameError as exc:
            raise Internal(
                f"{ctx.service} at {endpoint.address} sent a malformed reply to {ctx.method}: {exc}"
            ) from None
        for field_name, _cls in spec.exception_fields:
            value = getattr(result, field_name, None)
            if value is not None:
                ctx.extras["app_error"] = type(value).__name__
                raise value
        if spec.has_success:
            if result.success is None:
                raise Internal(
                    f"expected a result from {ctx.service}.{ctx.method}, found none "
                    "(the server sent an empty reply)"
                )
            return result.success
        return None
