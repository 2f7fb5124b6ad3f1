"""Inbox rows written straight into the database, for tests of what happens after receipt."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.orm import Session

from outbox.models import InboxMessage


def receive(
    session: Session,
    group: str,
    topic: str,
    messages: list[tuple[str | None, dict[str, Any]]],
    *,
    lane: int = 0,
    **fields: Any,
) -> list[uuid.UUID]:
    """Commit one inbox row per ``(key, payload)``, in that (Kafka) order; return their ids.

    ``fields`` sets further columns on every row (``status``, ``attempts``, ...)."""
    ids = [uuid.uuid4() for _ in messages]
    session.add_all(
        InboxMessage(
            consumer_group=group,
            message_id=message_id,
            topic=topic,
            partition=0,
            offset=n,
            key=key,
            lane=lane,
            payload=payload,
            headers={"message_id": str(message_id)},
            **fields,
        )
        for n, (message_id, (key, payload)) in enumerate(zip(ids, messages, strict=True))
    )
    session.commit()
    return ids
