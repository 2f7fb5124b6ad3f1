"""Topics and the consumer groups that read them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from outbox.errors import UnknownTopic
from outbox.models import ConsumerGroup, Topic


@dataclass(frozen=True)
class GroupSpec:
    """A consumer group's settings for one topic."""

    name: str
    topic: str
    requires_ack: bool = False
    ack_timeout_s: int = 300
    max_retries: int = 10
    ordered: bool = True
    retry_base_s: float = 1.0
    retry_factor: float = 2.0
    retry_cap_s: float = 600.0
    max_attempts: int = 10
    active: bool = True


def register_topic(
    session: Session, name: str, *, description: str = "", active: bool = True
) -> tuple[Topic, bool]:
    """Create or update a topic; return it and whether it was created."""
    stmt = insert(Topic).values(name=name, description=description, active=active)
    created = session.execute(
        stmt.on_conflict_do_nothing(index_elements=[Topic.name]).returning(Topic.id)
    ).first()
    topic = session.scalars(select(Topic).where(Topic.name == name)).one()
    if created is None:
        topic.description, topic.active = description, active
        topic.updated_at = func.now()
    session.flush()
    return topic, created is not None


def put_group(session: Session, spec: GroupSpec) -> ConsumerGroup:
    """Create or replace the settings of consumer group ``spec.name`` on ``spec.topic``."""
    if session.scalars(select(Topic.id).where(Topic.name == spec.topic)).first() is None:
        raise UnknownTopic(f"topic {spec.topic!r} is not registered", field="topic")
    values: dict[str, Any] = {k: v for k, v in spec.__dict__.items()}
    stmt = insert(ConsumerGroup).values(**values)
    updates: dict[str, Any] = {k: stmt.excluded[k] for k in values if k not in ("name", "topic")}
    updates["updated_at"] = func.now()
    session.execute(stmt.on_conflict_do_update(index_elements=["name", "topic"], set_=updates))
    return session.scalars(
        select(ConsumerGroup)
        .where(ConsumerGroup.name == spec.name, ConsumerGroup.topic == spec.topic)
        .execution_options(populate_existing=True)
    ).one()


def topics_with_groups(session: Session) -> list[tuple[Topic, list[ConsumerGroup]]]:
    """Every topic, by name, with its consumer groups."""
    topics = session.scalars(select(Topic).order_by(Topic.name)).all()
    groups: dict[str, list[ConsumerGroup]] = {}
    for group in session.scalars(select(ConsumerGroup).order_by(ConsumerGroup.name)):
        groups.setdefault(group.topic, []).append(group)
    return [(t, groups.get(t.name, [])) for t in topics]
