"""The meshkit error hierarchy.

Every error meshkit raises derives from :class:`MeshkitError` and carries a
:class:`StatusCode` (in the spirit of gRPC's codes). Exceptions declared in a
service's IDL are *not* wrapped: they reach the caller unchanged.
"""

from __future__ import annotations

import enum


class StatusCode(enum.StrEnum):
    """Status of an RPC, as seen by the caller."""

    OK = "OK"
    CANCELLED = "CANCELLED"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    NO_INSTANCES = "NO_INSTANCES"
    CIRCUIT_OPEN = "CIRCUIT_OPEN"
    INTERNAL = "INTERNAL"


class MeshkitError(Exception):
    """Root of all meshkit errors. ``code`` says what kind of failure it is."""

    code: StatusCode = StatusCode.INTERNAL

    def __init__(self, message: str, *, code: StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"[{self.code.value}] {self.message}"


class Cancelled(MeshkitError):
    """The call was cancelled by the caller."""

    code = StatusCode.CANCELLED


class InvalidArgument(MeshkitError):
    """The request (or a frame on the wire) is malformed."""

    code = StatusCode.INVALID_ARGUMENT


class FrameError(InvalidArgument):
    """A frame on the wire breaks the protocol: the connection cannot continue."""


class DeadlineExceeded(MeshkitError):
    """The call's time budget ran out."""

    code = StatusCode.DEADLINE_EXCEEDED


class Unimplemented(MeshkitError):
    """The server does not implement the method that was called."""

    code = StatusCode.UNIMPLEMENTED


class ResourceExhausted(MeshkitError):
    """The server shed the call because it is at its concurrency limit."""

    code = StatusCode.RESOURCE_EXHAUSTED


class Unavailable(MeshkitError):
    """The peer could not be reached, or the connection broke."""

    code = StatusCode.UNAVAILABLE


class NoInstances(Unavailable):
    """Discovery found no instance of the service."""

    code = StatusCode.NO_INSTANCES


class CircuitOpen(Unavailable):
    """The circuit breaker for the peer is open."""

    code = StatusCode.CIRCUIT_OPEN


class Internal(MeshkitError):
    """The server failed in a way that the IDL does not describe."""

    code = StatusCode.INTERNAL


class ConfigError(MeshkitError):
    """A setting is missing or invalid."""

    code = StatusCode.INVALID_ARGUMENT


_BY_CODE: dict[StatusCode, type[MeshkitError]] = {
    StatusCode.CANCELLED: Cancelled,
    StatusCode.INVALID_ARGUMENT: InvalidArgument,
    StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    StatusCode.UNIMPLEMENTED: Unimplemented,
    StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    StatusCode.UNAVAILABLE: Unavailable,
    StatusCode.NO_INSTANCES: NoInstances,
    StatusCode.CIRCUIT_OPEN: CircuitOpen,
    StatusCode.INTERNAL: Internal,
}


def error_for_code(code: str, message: str) -> MeshkitError:
    """Build the error class that matches a status code received from a peer."""
    try:
        status = StatusCode(code)
    except ValueError:
        return Internal(f"peer sent unknown status code {code!r}: {message}")
    cls = _BY_CODE.get(status, MeshkitError)
    return cls(message, code=status)
