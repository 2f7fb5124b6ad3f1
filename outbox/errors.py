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
