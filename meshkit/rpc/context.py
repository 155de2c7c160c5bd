"""The per-call context that flows through client and server middleware."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .endpoint import Endpoint

# Metadata keys meshkit itself reads and writes (see DESIGN.md, "Wire").
TIMEOUT_KEY = "meshkit-timeout-ms"
CALLER_KEY = "meshkit-caller"
STATUS_KEY = "meshkit-status"
GOAWAY_KEY = "meshkit-goaway"
# Sent by a meshkit client on its first frame of a connection, and answered by a
# meshkit server with a seq-id-0 frame carrying the same key: what each side supports.
FEATURES_KEY = "meshkit-features"
# An empty frame with this header and a call's seq id: the caller stopped waiting.
CANCEL_KEY = "meshkit-cancel"
CANCEL_FEATURE = "cancel"


@dataclass(slots=True, eq=False)
class CallContext:
    """Everything a middleware may read or change about one call.

    On the client ``headers`` are what will be sent; on the server they are what
    arrived. ``response_headers`` go the other way. ``deadline`` is absolute, on
    the ``time.monotonic()`` clock, or ``None`` for no deadline.
    """

    service: str
    method: str
    args: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    response_headers: dict[str, str] = field(default_factory=dict)
    deadline: float | None = None
    timeout: float | None = None
    oneway: bool = False
    peer: str = ""
    caller: str = ""
    attempt: int = 0
    endpoint: Endpoint | None = None
    tried: list[Endpoint] = field(default_factory=list)
    idempotent: bool = False
    extras: dict[str, Any] = field(default_factory=dict)
    # Server side: the undecoded message (a codec.MessageReader) until the decode stage runs.
    raw: Any = None
