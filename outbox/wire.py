"""How an outbox message looks on Kafka: the header names both sides agree on."""

from __future__ import annotations

import re
import uuid
import zlib
from collections.abc import Mapping

HEADER_MESSAGE_ID = "message_id"
HEADER_IDEMPOTENCY_KEY = "idempotency_key"
HEADER_CORRELATION_ID = "correlation_id"
HEADER_TRACEPARENT = "traceparent"
# A retry aimed at one consumer group; other groups skip it.
HEADER_TARGET_GROUP = "target_group"
# A retry also names the worker it is aimed at (when one is healthy), its attempt, and
# the outbox row it repeats; its message_id header stays the original's.
HEADER_TARGET_INSTANCE = "target_instance"
HEADER_RETRY_ATTEMPT = "retry_attempt"
# The longest topic name Kafka takes.
MAX_TOPIC = 249
# Consumers acknowledge processed messages on this topic, through their own outbox.
ACK_TOPIC = "outbox.acks"
# Topics only the outbox itself writes: the HTTP API neither registers nor publishes to them.
INTERNAL_TOPICS = frozenset({ACK_TOPIC})
# Set by the outbox itself, and acted on by consumers: a caller may not supply them (a
# target_group set by a caller would make every other group skip the message).
RESERVED_HEADERS = frozenset(
    {
        HEADER_MESSAGE_ID,
        HEADER_IDEMPOTENCY_KEY,
        HEADER_TARGET_GROUP,
        HEADER_TARGET_INSTANCE,
        HEADER_RETRY_ATTEMPT,
    }
)

# Messages from producers that are not ours get a stable id from their position.
_FOREIGN_NAMESPACE = uuid.UUID("6f1c2f43-52a4-4b0e-9a8f-3f4a1f0e2b7d")


def bucket_for(key: str | None, message_id: uuid.UUID | str, buckets: int) -> int:
    """The bucket (relay side) or lane (consumer side) of a key; keyless messages spread by
    id (a UUID, or its text)."""
    if key is not None:
        return zlib.crc32(key.encode()) % buckets
    if isinstance(message_id, str):
        message_id = uuid.UUID(message_id)
    return zlib.crc32(message_id.bytes) % buckets


def message_headers(message_id: str, stored: Mapping[str, str]) -> dict[str, str]:
    """A message's headers from its outbox row: the row stores only what the caller gave
    (and the idempotency key); its id, which is also its correlation id unless the
    caller gave one, comes from the row's ``message_id``."""
    return {HEADER_CORRELATION_ID: message_id, HEADER_MESSAGE_ID: message_id, **stored}


def foreign_message_id(topic: str, partition: int, offset: int) -> uuid.UUID:
    """A deterministic id for a message that carries none, so redelivery dedupes."""
    return uuid.uuid5(_FOREIGN_NAMESPACE, f"{topic}/{partition}/{offset}")


# A message id as this project writes it (str(uuid.UUID)): taken as it is, without parsing.
_CANONICAL_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def canonical_message_id(text: str) -> str:
    """A message id written as text, in canonical form (``str(uuid.UUID(text))``); the
    canonical form itself, as this project writes ids, is taken without parsing.
    ValueError (or TypeError, for what is not text) if it is not a UUID."""
    if type(text) is str and _CANONICAL_ID.fullmatch(text):
        return text
    return str(uuid.UUID(text))
