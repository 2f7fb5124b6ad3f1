"""The ``agents`` table: who is alive, as seen by the database clock."""

from __future__ import annotations

import os
import socket
from typing import Any

from sqlalchemy import func
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from outbox.models import Agent


def instance_id(role: str, name: str | None = None) -> str:
    """A process's identity: role, host and pid unless a name is given."""
    return name or f"{role}@{socket.gethostname()}:{os.getpid()}"


def upsert_agent(
    session: Session,
    instance: str,
    role: str,
    *,
    consumer_group: str | None = None,
    health: dict[str, Any] | None = None,
) -> None:
    """Record that ``instance`` is alive now; the caller commits."""
    stmt = insert(Agent).values(
        instance_id=instance,
        role=role,
        consumer_group=consumer_group,
        host=socket.gethostname(),
        pid=os.getpid(),
        health=health or {},
    )
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=[Agent.instance_id],
            set_={
                "last_seen_at": func.now(),
                "active": True,
                "health": stmt.excluded.health,
                "consumer_group": stmt.excluded.consumer_group,
            },
        )
    )
