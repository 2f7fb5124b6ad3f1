"""The ``agents`` table: who is alive, as seen by the database clock."""

from __future__ import annotations

import os
import socket
import uuid
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from outbox.models import Agent


def instance_id(role: str, name: str | None = None) -> str:
    """A process's identity: role, host and pid unless a name is given."""
    return name or f"{role}@{socket.gethostname()}:{os.getpid()}"


def owner_id(role: str) -> str:
    """A lease owner's identity: its process's, and a random part, so that two owners in
    one process (or a process after a fork) never pass for each other."""
    return f"{instance_id(role)}:{uuid.uuid4().hex[:8]}"


def upsert_agent(
    session: Session,
    instance: str,
    role: str,
    *,
    consumer_group: str | None = None,
    health: dict[str, Any] | None = None,
    host: str | None = None,
    pid: int | None = None,
) -> None:
    """Record that ``instance`` is alive now; the caller commits. Host and pid default to
    this process's."""
    stmt = insert(Agent).values(
        instance_id=instance,
        role=role,
        consumer_group=consumer_group,
        host=host or socket.gethostname(),
        pid=os.getpid() if pid is None else pid,
        health=health or {},
    )
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=[Agent.instance_id],
            set_={
                "last_seen_at": func.now(),
                "active": True,
                "health": stmt.excluded.health,
                "pid": stmt.excluded.pid,
                "consumer_group": stmt.excluded.consumer_group,
            },
        )
    )


def list_agents(
    session: Session,
    *,
    role: str | None = None,
    group: str | None = None,
    active: bool | None = None,
) -> list[dict[str, Any]]:
    """Agents, most recently seen first, filtered; None means any."""
    query = select(Agent).order_by(Agent.last_seen_at.desc(), Agent.id)
    if role is not None:
        query = query.where(Agent.role == role)
    if group is not None:
        query = query.where(Agent.consumer_group == group)
    if active is not None:
        query = query.where(Agent.active == active)
    return [
        {
            "instance_id": a.instance_id,
            "role": a.role,
            "consumer_group": a.consumer_group,
            "host": a.host,
            "pid": a.pid,
            "active": a.active,
            "started_at": a.started_at.isoformat(),
            "last_seen_at": a.last_seen_at.isoformat(),
            "health": a.health,
        }
        for a in session.scalars(query)
    ]
