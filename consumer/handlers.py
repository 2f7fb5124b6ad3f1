"""Handlers: ``@handler("topic")`` on ``def handle(message, session)``, or
``@batch_handler("topic")`` on ``def handle(messages, session)``, which takes the
consecutive messages of its topic in a lane batch at once (one statement for many
messages). If a batch call fails, each of its messages runs again alone, so that only
the one at fault fails: a batch handler may run twice for a message, its first
database effects undone.

A handler runs inside the transaction that marks its inbox row done, so what it
writes through ``session`` happens exactly once; it must not commit or roll back
that session itself. Effects outside the database may repeat: a handler can run
again after a crash, or when a later message of its batch fails. Raising :class:`Permanent`
makes the message a dead letter at once; any other exception is retried with
backoff until the group's attempts are spent.
"""

from __future__ import annotations

import dataclasses
import importlib
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from sqlalchemy.orm import Session

from outbox.errors import OutboxError

Handler = Callable[["Message", Session], None]
BatchHandler = Callable[[list["Message"], Session], None]

_handlers: dict[str, Handler] = {}
_batch_handlers: dict[str, BatchHandler] = {}


class Permanent(OutboxError):
    """The message can never succeed: it goes to the dead letters without more attempts."""


class NoHandler(OutboxError):
    """No handler is registered for the message's topic."""


class HandlerTimeout(OutboxError):
    """The handler took longer than its group's ``handler_timeout_s``."""


class HandlerExit(OutboxError):
    """The handler tried to end its process (``sys.exit``)."""


@dataclasses.dataclass(frozen=True)
class Message:
    """What a handler sees of one received message."""

    id: uuid.UUID
    topic: str
    key: str | None
    payload: Any
    headers: Mapping[str, str]
    attempt: int  # 1 for the first try (again 1 for a targeted retry's first try)
    partition: int
    offset: int
    group: str = ""  # the consumer group processing it
    retry: int = 0  # targeted retries of this message that reached this group

    @property
    def is_retry(self) -> bool:
        """True from the second attempt on, and in a targeted retry."""
        return self.attempt > 1 or self.retry > 0


def handler(topic: str) -> Callable[[Handler], Handler]:
    """Register the decorated function as the handler of ``topic`` (one per topic)."""

    def register(fn: Handler) -> Handler:
        _check_free(topic, fn)
        _handlers[topic] = fn
        return fn

    return register


def batch_handler(topic: str) -> Callable[[BatchHandler], BatchHandler]:
    """Register the decorated function as the handler of ``topic``, called with a list of
    consecutive messages of a lane batch (in their order) rather than one at a time."""

    def register(fn: BatchHandler) -> BatchHandler:
        _check_free(topic, fn)
        _batch_handlers[topic] = fn
        return fn

    return register


def _check_free(topic: str, fn: object) -> None:
    existing = _handlers.get(topic) or _batch_handlers.get(topic)
    if existing is not None and existing is not fn:
        raise ValueError(f"topic {topic!r} already has a handler: {existing.__qualname__}")


def handler_for(topic: str) -> Handler:
    """The handler registered for ``topic`` (a batch handler called with one message)."""
    try:
        return _handlers[topic]
    except KeyError:
        pass
    many = batch_handler_for(topic)
    if many is None:
        raise NoHandler(f"no handler is registered for topic {topic!r}")
    return lambda message, session: many([message], session)


def batch_handler_for(topic: str) -> BatchHandler | None:
    """The batch handler registered for ``topic``, if it has one."""
    return _batch_handlers.get(topic)


def import_handler_modules(modules: Iterable[str]) -> None:
    """Import the modules that register handlers: the built-in ack handler, then
    ``modules`` (``OUTBOX_HANDLER_MODULES``)."""
    for module in ("consumer.acks", *modules):
        importlib.import_module(module)
