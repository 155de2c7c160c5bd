"""Errors raised by meshkit's Kafka publishers and workers (all :class:`~meshkit.MeshkitError`)."""

from __future__ import annotations

from ..errors import ConfigError, InvalidArgument, MeshkitError, ResourceExhausted, Unavailable

__all__ = [
    "ConfigError",
    "DeadLetter",
    "DecodeError",
    "HandlerCancelled",
    "MqError",
    "PublishBufferFull",
    "PublishError",
]


class MqError(MeshkitError):
    """Root of the MQ errors."""


class PublishError(MqError, Unavailable):
    """The broker did not acknowledge a message (delivery report carried an error)."""


class PublishBufferFull(MqError, ResourceExhausted):
    """The producer's local buffer is full: the broker is slower than the publishers.

    Nothing was enqueued; the caller may wait and publish again, or shed load.
    """


class DecodeError(MqError, InvalidArgument):
    """A message's payload cannot be decoded for the subscription's model (a poison message).

    Workers send such messages straight to the dead-letter topic.
    """


class DeadLetter(MqError):
    """Raised by a handler to send the message straight to the dead-letter topic.

    For errors that no retry can fix (a reference to a record that does not exist, a
    request the business rules reject): no in-place retry, no retry topic.
    """


class HandlerCancelled(MqError):
    """A handler raised ``CancelledError`` though its worker did not cancel it (it awaited
    something cancelled elsewhere, say a shared client's request): counted as a handler
    failure (retried, then moved to a retry topic or the DLQ), the original as its cause.
    """
