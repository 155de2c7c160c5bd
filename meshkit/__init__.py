"""meshkit: Python microservices on a Thrift service mesh.

The public surface is small: :class:`Service`, :class:`Client`,
:class:`SyncClient`, the errors, and the ``config``, ``mq`` and ``tracing``
packages. Everything else is reachable but not needed for the common case.
"""

from .client import Client, SyncClient
from .errors import (
    CircuitOpen,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    MeshkitError,
    NoInstances,
    ResourceExhausted,
    StatusCode,
    Unavailable,
    Unimplemented,
)
from .rpc.deadline import remaining as remaining_budget
from .service import Service

__version__ = "0.1.0"

__all__ = [
    "CircuitOpen",
    "Client",
    "DeadlineExceeded",
    "Internal",
    "InvalidArgument",
    "MeshkitError",
    "NoInstances",
    "ResourceExhausted",
    "Service",
    "StatusCode",
    "SyncClient",
    "Unavailable",
    "Unimplemented",
    "remaining_budget",
]
