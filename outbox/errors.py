"""The exception tree: one root, a one-line docstring each, the docstring as default message."""

from __future__ import annotations


class OutboxError(Exception):
    """The outbox failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class SettingsError(OutboxError):
    """A setting has a bad value."""


class ServiceError(OutboxError):
    """An embedded service failed to start or stop."""


class PublishError(OutboxError):
    """The message was refused; nothing was written.

    ``field`` names the offending field and ``index`` the message's position in a batch.
    """

    code = "invalid_message"

    def __init__(
        self, message: str | None = None, *, field: str | None = None, index: int | None = None
    ) -> None:
        super().__init__(message)
        self.field = field
        self.index = index


class UnknownTopic(PublishError):
    """The topic is not registered."""

    code = "unknown_topic"


class InactiveTopic(PublishError):
    """The topic is registered but inactive."""

    code = "inactive_topic"


class InvalidTopic(PublishError):
    """The topic name is one Kafka cannot take."""

    code = "invalid_topic"


class PayloadNotJSON(PublishError):
    """The payload cannot be written as JSON."""

    code = "payload_not_json"


class PayloadTooLarge(PublishError):
    """The payload is over the size limit."""

    code = "payload_too_large"


class KeyTooLong(PublishError):
    """The key is over its size limit."""

    code = "key_too_long"


class InvalidHeaders(PublishError):
    """The headers are malformed or over their size limit."""

    code = "invalid_headers"


class IdempotencyConflict(PublishError):
    """The idempotency key was used before for a different message."""

    code = "idempotency_conflict"
