"""Recording received Kafka messages in ``inbox_messages``, once per group."""

from __future__ import annotations

import json
import uuid
from typing import Any

from confluent_kafka import Message
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from consumer.acks import register_ack_topic, success_ack, write_acks
from outbox import queries
from outbox.models import InboxMessage
from outbox.publishing import Publisher
from outbox.wire import (
    HEADER_IDEMPOTENCY_KEY,
    HEADER_MESSAGE_ID,
    HEADER_TARGET_INSTANCE,
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


def absorb_retries(
    session: Session,
    group: str,
    retries: list[dict[str, Any]],
    publisher: Publisher,
    healthy_workers: set[str],
) -> dict[int, str | None]:
    """Settle targeted retries of messages this group holds, in the caller's transaction.

    A message processed already gets its success ack again and does not run again; one
    that failed (or went dead) runs again now with a fresh attempt budget. Returns the
    lanes to kick, each with the worker to run it when the retry names a healthy one.
    """
    if not retries:
        return {}
    ids = [str(r["message_id"]) for r in retries]
    target = {str(r["message_id"]): r["headers"].get(HEADER_TARGET_INSTANCE) for r in retries}
    acks = [
        success_ack(message_id, topic, group, worker or "unknown", attempts)
        for message_id, topic, worker, attempts in session.execute(
            queries.INBOX_DONE_OF, {"group": group, "ids": ids}
        )
    ]
    if acks:
        register_ack_topic(session)
        write_acks(session, publisher, acks)
    lanes: dict[int, str | None] = {}
    again = session.execute(queries.INBOX_RETRY_AGAIN, {"group": group, "ids": ids}).all()
    waiting = session.execute(queries.INBOX_LANES_OF, {"group": group, "ids": ids}).all()
    for message_id, lane in [*again, *waiting]:
        wanted = target.get(str(message_id))
        lanes[lane] = wanted if wanted in healthy_workers else lanes.get(lane)
    return lanes
