"""Topics and the consumer groups that read them."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from outbox import queries
from outbox.errors import InvalidTopic, UnknownTopic
from outbox.models import ConsumerGroup, Topic
from outbox.wire import MAX_TOPIC


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
    handler_timeout_s: float = 30.0
    on_dead: str = "skip"
    active: bool = True


# What Kafka takes as a topic name (and "." and ".." it does not).
TOPIC_NAME = re.compile(rf"^[A-Za-z0-9._-]{{1,{MAX_TOPIC}}}$")


def check_topic_names(
    session: Session | Connection, names: Iterable[str], *, field: str = "name"
) -> None:
    """Refuse names Kafka cannot take, before any is registered: outside its alphabet or
    length, ``.`` and ``..``, and a name that differs from a registered one only in
    ``.`` against ``_`` (Kafka's metrics cannot tell those apart, so it refuses them)."""
    wanted = sorted(set(names))
    for name in wanted:
        if not TOPIC_NAME.match(name) or name in (".", ".."):
            raise InvalidTopic(
                f"topic name {name!r} is not one Kafka takes: 1 to {MAX_TOPIC} of "
                "A-Z, a-z, 0-9, '.', '_' and '-', and neither '.' nor '..'",
                field=field,
            )
    clash = session.execute(queries.TOPIC_NAME_CLASHES, {"names": wanted}).first()
    if clash is not None:
        raise InvalidTopic(
            f"topic name {clash[0]!r} collides with registered topic {clash[1]!r}: Kafka "
            "treats '.' and '_' in topic names alike",
            field=field,
        )


def register_topic(
    session: Session, name: str, *, description: str = "", active: bool = True
) -> tuple[Topic, bool]:
    """Create or update a topic; return it and whether it was created.

    Raises :class:`~outbox.errors.InvalidTopic` for a name Kafka cannot take."""
    check_topic_names(session, [name])
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
