"""Recording received Kafka messages in ``inbox_messages``, once per group."""

from __future__ import annotations

import json
import uuid
from typing import Any

from confluent_kafka import Message
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from outbox.models import InboxMessage
from outbox.wire import (
    HEADER_IDEMPOTENCY_KEY,
    HEADER_MESSAGE_ID,
    bucket_for,
    foreign_message_id,
)


def inbox_row(group: str, msg: Message, lanes: int) -> dict[str, Any]:
    """The inbox row for one Kafka message; a payload that is not JSON is dead on arrival."""
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    if topic is None or partition is None or offset is None:
        raise ValueError("an error event is not a message")
    raw_headers = msg.headers() or []
    pairs = raw_headers.items() if isinstance(raw_headers, dict) else raw_headers
    headers = {}
    for name, value in pairs:
        text = _text(value)
        if text is not None:
            headers[name] = text
    key = _text(msg.key())
    try:
        message_id = uuid.UUID(headers[HEADER_MESSAGE_ID])
    except (KeyError, ValueError):
        message_id = foreign_message_id(topic, partition, offset)
    row: dict[str, Any] = {
        "consumer_group": group,
        "message_id": message_id,
        "idempotency_key": headers.get(HEADER_IDEMPOTENCY_KEY),
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "key": key,
        "lane": bucket_for(key, message_id, lanes),
        "headers": headers,
    }
    try:
        payload = json.loads(msg.value() or b"null")
        row["payload"] = payload if isinstance(payload, dict) else {"value": payload}
    except ValueError as exc:
        row["payload"] = {"raw": (msg.value() or b"").decode(errors="replace")}
        row["status"] = "dead"
        row["last_error"] = f"payload is not JSON: {exc}"
    return row


def _text(value: str | bytes | None) -> str | None:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value


def record(session: Session, rows: list[dict[str, Any]]) -> list[int]:
    """Insert rows, skipping any this group already holds (by message id or idempotency key).

    Returns the lane of each new row. The caller commits; only then may offsets be stored.
    """
    if not rows:
        return []
    # No conflict target: both unique keys (message id, idempotency key) absorb duplicates.
    result = session.execute(
        insert(InboxMessage).on_conflict_do_nothing().returning(InboxMessage.lane), rows
    )
    return list(result.scalars())
