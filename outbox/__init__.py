"""Transactional outbox: write events in your transaction, relay them to Kafka."""

from __future__ import annotations

from outbox.errors import OutboxError, PublishError
from outbox.publishing import Message, Publisher, publish, publish_batch
from outbox.settings import Settings

__all__ = [
    "Message",
    "OutboxError",
    "PublishError",
    "Publisher",
    "Settings",
    "publish",
    "publish_batch",
]
