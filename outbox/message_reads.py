"""Reading messages back: one message with its deliveries, or a filtered page."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from outbox.models import ConsumerGroup, Delivery, OutboxMessage
from outbox.wire import message_headers


@dataclasses.dataclass(frozen=True)
class MessageFilter:
    """Filters of a message listing; None means any."""

    status: str | None = None
    topic: str | None = None
    key: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None


def message_view(row: OutboxMessage) -> dict[str, Any]:
    """The public fields of an outbox row."""
    return {
        "message_id": str(row.message_id),
        "topic": row.topic,
        "key": row.key,
        "status": row.status,
        "attempts": row.attempts,
        "last_error": row.last_error,
        "kafka_partition": row.kafka_partition,
        "kafka_offset": row.kafka_offset,
        "idempotency_key": row.idempotency_key,
        "headers": message_headers(str(row.message_id), row.headers),
        "created_at": row.created_at.isoformat(),
        "sent_at": row.sent_at.isoformat() if row.sent_at else None,
        "available_at": row.available_at.isoformat(),
    }


def get_message(session: Session, message_id: uuid.UUID) -> dict[str, Any] | None:
    """One message with its payload and its per-group deliveries, or None."""
    row = session.scalars(
        select(OutboxMessage).where(OutboxMessage.message_id == message_id)
    ).first()
    if row is None:
        return None
    view = message_view(row)
    view["payload"] = row.payload
    view["deliveries"] = [
        {
            "group": group.name,
            "status": delivery.status,
            "attempts": delivery.attempts,
            "next_retry_at": delivery.next_retry_at.isoformat() if delivery.next_retry_at else None,
            "error": delivery.error,
        }
        for delivery, group in session.execute(
            select(Delivery, ConsumerGroup)
            .join(ConsumerGroup, ConsumerGroup.id == Delivery.consumer_group_id)
            .where(Delivery.message_id == message_id)
            .order_by(ConsumerGroup.name)
        )
    ]
    return view


def list_messages(
    session: Session, where: MessageFilter, *, before_id: int | None, limit: int
) -> tuple[list[dict[str, Any]], int | None]:
    """Newest first; returns a page and the id to continue before (None at the end)."""
    query = select(OutboxMessage).order_by(OutboxMessage.id.desc()).limit(limit + 1)
    if before_id is not None:
        query = query.where(OutboxMessage.id < before_id)
    if where.status is not None:
        query = query.where(OutboxMessage.status == where.status)
    if where.topic is not None:
        query = query.where(OutboxMessage.topic == where.topic)
    if where.key is not None:
        query = query.where(OutboxMessage.key == where.key)
    if where.created_after is not None:
        query = query.where(OutboxMessage.created_at >= where.created_after)
    if where.created_before is not None:
        query = query.where(OutboxMessage.created_at < where.created_before)
    rows = session.scalars(query).all()
    more = len(rows) > limit
    rows = rows[:limit]
    return [message_view(r) for r in rows], (rows[-1].id if more else None)


def list_deliveries(
    session: Session,
    *,
    group: str | None = None,
    status: str | None = None,
    message_id: uuid.UUID | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Deliveries (one per message and group that needs acks), newest first, filtered."""
    query = (
        select(Delivery, ConsumerGroup.name)
        .join(ConsumerGroup, ConsumerGroup.id == Delivery.consumer_group_id)
        .order_by(Delivery.id.desc())
        .limit(limit)
    )
    if group is not None:
        query = query.where(ConsumerGroup.name == group)
    if status is not None:
        query = query.where(Delivery.status == status)
    if message_id is not None:
        query = query.where(Delivery.message_id == message_id)
    return [
        {
            "message_id": str(d.message_id),
            "group": name,
            "status": d.status,
            "attempts": d.attempts,
            "next_retry_at": d.next_retry_at.isoformat() if d.next_retry_at else None,
            "error": d.error,
            "instance_id": d.instance_id,
            "created_at": d.created_at.isoformat(),
            "updated_at": d.updated_at.isoformat(),
        }
        for d, name in session.execute(query)
    ]
