"""SQLAlchemy 2.0 typed models of every table.

The schema is made and changed only by the Alembic migrations in
``migrations/``; a test checks that upgrading an empty database yields exactly
these models. Statuses are short strings guarded by CHECK constraints rather
than PostgreSQL enum types, so adding a status is a one-line migration.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from outbox.wire import MAX_TOPIC

# The largest values PostgreSQL's integer and bigint columns hold.
INT_MAX = 2**31 - 1
BIGINT_MAX = 2**63 - 1
# The longest last error kept on a row (outbox, inbox, delivery) or carried by an ack.
MAX_ERROR_CHARS = 2000
# Bounds of a consumer group's retry settings: every backoff stays finite and fits
# PostgreSQL's interval, so the targeted-retry sweep can always compute it.
MAX_BACKOFF_S = 365 * 86400.0
MAX_RETRY_FACTOR = 100.0
MAX_HANDLER_TIMEOUT_S = 3600.0

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

OUTBOX_STATUSES = ("pending", "sent", "dead")
DELIVERY_STATUSES = ("awaiting_ack", "acked", "failed", "dead")
INBOX_STATUSES = ("received", "done", "failed", "dead")
# What a dead letter does to later messages of its key, in an ordered group.
ON_DEAD = ("skip", "hold_key")
AGENT_ROLES = ("api", "worker", "beat", "consumer")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSONB, uuid.UUID: UUID(as_uuid=True)}


def _created() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), server_default=func.now())


class Topic(Base):
    __tablename__ = "topics"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(MAX_TOPIC), unique=True)
    description: Mapped[str] = mapped_column(Text, server_default="")
    active: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _created()


class ConsumerGroup(Base):
    __tablename__ = "consumer_groups"
    __table_args__ = (
        UniqueConstraint("name", "topic"),
        CheckConstraint("max_retries >= -1", name="max_retries"),
        CheckConstraint("ack_timeout_s > 0", name="ack_timeout"),
        CheckConstraint(
            f"handler_timeout_s > 0 AND handler_timeout_s <= {MAX_HANDLER_TIMEOUT_S}",
            name="handler_timeout",
        ),
        # NaN compares above every number in PostgreSQL, so an upper bound refuses it too.
        CheckConstraint(f"retry_base_s > 0 AND retry_base_s <= {MAX_BACKOFF_S}", name="retry_base"),
        CheckConstraint(f"retry_cap_s > 0 AND retry_cap_s <= {MAX_BACKOFF_S}", name="retry_cap"),
        CheckConstraint(
            f"retry_factor >= 1 AND retry_factor <= {MAX_RETRY_FACTOR}", name="retry_factor"
        ),
        CheckConstraint("max_attempts >= 1", name="max_attempts"),
        CheckConstraint(_in("on_dead", ON_DEAD), name="on_dead"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    topic: Mapped[str] = mapped_column(
        String(MAX_TOPIC), ForeignKey("topics.name", onupdate="CASCADE")
    )
    requires_ack: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    ack_timeout_s: Mapped[int] = mapped_column(Integer, server_default=text("300"))
    # -1 retries forever.
    max_retries: Mapped[int] = mapped_column(Integer, server_default=text("10"))
    ordered: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    retry_base_s: Mapped[float] = mapped_column(Float, server_default=text("1.0"))
    retry_factor: Mapped[float] = mapped_column(Float, server_default=text("2.0"))
    retry_cap_s: Mapped[float] = mapped_column(Float, server_default=text("600.0"))
    max_attempts: Mapped[int] = mapped_column(Integer, server_default=text("10"))
    # Longest one handler call may take; past it the call fails like any other failure.
    handler_timeout_s: Mapped[float] = mapped_column(Float, server_default=text("30.0"))
    # In an ordered group: "skip" lets later messages of a dead letter's key go on,
    # "hold_key" parks them until the dead letter is requeued or discarded.
    on_dead: Mapped[str] = mapped_column(String(16), server_default="skip")
    active: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _created()


class OutboxMessage(Base):
    __tablename__ = "outbox_messages"
    __table_args__ = (
        CheckConstraint(_in("status", OUTBOX_STATUSES), name="status"),
        # The relay's claim: pending rows of a bucket in id order.
        Index(
            "ix_outbox_messages_claimable",
            "bucket",
            "id",
            postgresql_where=text("status = 'pending'"),
        ),
        # Cleanup walks sent rows by age.
        Index("ix_outbox_messages_sent_at", "sent_at", postgresql_where=text("status = 'sent'")),
        # The dead letters, newest first.
        Index("ix_outbox_messages_dead", "created_at", postgresql_where=text("status = 'dead'")),
        # One row per idempotency key; retries carry the original's key.
        Index(
            "uq_outbox_messages_idempotency_key",
            "idempotency_key",
            unique=True,
            postgresql_where=text("idempotency_key IS NOT NULL AND NOT is_retry"),
        ),
        # Retries are looked up by the message they repeat; other rows stay out of the index.
        Index(
            "ix_outbox_messages_original_message_id",
            "original_message_id",
            postgresql_where=text("original_message_id IS NOT NULL"),
        ),
        # Per-key order: rows that met an error and wait (for a retry, for their topic)
        # hold back later rows of their key. Few rows ever match, so the relay's check
        # stays cheap.
        Index(
            "ix_outbox_messages_held",
            "bucket",
            "key",
            "id",
            postgresql_where=text("status = 'pending' AND last_error IS NOT NULL"),
        ),
        # Room on each page keeps about half of the marks' new row versions on their own
        # page (a mark changes indexed columns, so it is never HOT): a mark whose version
        # moves to another page costs more than one that stays.
        {"postgresql_with": {"fillfactor": 80}},
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    message_id: Mapped[uuid.UUID] = mapped_column(unique=True)
    topic: Mapped[str] = mapped_column(String(MAX_TOPIC))
    key: Mapped[str | None] = mapped_column(Text)
    payload: Mapped[dict[str, Any]] = mapped_column()
    # The caller's headers and the idempotency key; the message id and correlation id
    # that go out with them come from message_id (wire.message_headers).
    headers: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    # sha256 of (topic, key, payload, caller headers): tells a repeat from a conflict.
    request_hash: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), server_default="pending")
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    available_at: Mapped[datetime] = _created()
    bucket: Mapped[int] = mapped_column(SmallInteger)
    last_error: Mapped[str | None] = mapped_column(Text)
    kafka_partition: Mapped[int | None] = mapped_column(Integer)
    kafka_offset: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = _created()
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    is_retry: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    original_message_id: Mapped[uuid.UUID | None] = mapped_column()
    target_group: Mapped[str | None] = mapped_column(String(255))
    target_instance: Mapped[str | None] = mapped_column(String(255))


class Delivery(Base):
    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("message_id", "consumer_group_id"),
        CheckConstraint(_in("status", DELIVERY_STATUSES), name="status"),
        # Targeted retry sweeps unfinished deliveries by due time.
        Index(
            "ix_deliveries_due",
            "next_retry_at",
            postgresql_where=text("status IN ('awaiting_ack', 'failed')"),
        ),
        Index("ix_deliveries_dead", "updated_at", postgresql_where=text("status = 'dead'")),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    message_id: Mapped[uuid.UUID] = mapped_column()
    consumer_group_id: Mapped[int] = mapped_column(
        ForeignKey("consumer_groups.id", ondelete="CASCADE"), index=True
    )
    status: Mapped[str] = mapped_column(String(16), server_default="awaiting_ack")
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    next_retry_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(Text)
    instance_id: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _created()


class InboxMessage(Base):
    __tablename__ = "inbox_messages"
    __table_args__ = (
        UniqueConstraint("consumer_group", "message_id"),
        CheckConstraint(_in("status", INBOX_STATUSES), name="status"),
        Index(
            "uq_inbox_messages_idempotency_key",
            "consumer_group",
            "idempotency_key",
            unique=True,
            postgresql_where=text("idempotency_key IS NOT NULL"),
        ),
        # A lane task takes its group's unfinished rows in Kafka order.
        Index(
            "ix_inbox_messages_due",
            "consumer_group",
            "lane",
            "id",
            postgresql_where=text("status IN ('received', 'failed')"),
        ),
        Index(
            "ix_inbox_messages_processed_at",
            "processed_at",
            postgresql_where=text("status = 'done'"),
        ),
        Index("ix_inbox_messages_dead", "received_at", postgresql_where=text("status = 'dead'")),
        # Whether an earlier row of a key waits for a retry (an ordered group holds it back).
        Index(
            "ix_inbox_messages_failed_keys",
            "consumer_group",
            "lane",
            "key",
            "id",
            postgresql_where=text("status = 'failed'"),
        ),
        # Whether an earlier row of a key is a dead letter (a hold_key group holds it back).
        Index(
            "ix_inbox_messages_dead_keys",
            "consumer_group",
            "lane",
            "key",
            "id",
            postgresql_where=text("status = 'dead'"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    consumer_group: Mapped[str] = mapped_column(String(255))
    message_id: Mapped[uuid.UUID] = mapped_column()
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    topic: Mapped[str] = mapped_column(String(MAX_TOPIC))
    partition: Mapped[int] = mapped_column(Integer)
    offset: Mapped[int] = mapped_column(BigInteger)
    key: Mapped[str | None] = mapped_column(Text)
    lane: Mapped[int] = mapped_column(SmallInteger)
    payload: Mapped[dict[str, Any]] = mapped_column()
    headers: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    status: Mapped[str] = mapped_column(String(16), server_default="received")
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    next_attempt_at: Mapped[datetime] = _created()
    last_error: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(255))  # the last attempt's
    # the worker of every attempt, in order (a targeted retry's attempts included)
    attempt_workers: Mapped[list[str]] = mapped_column(
        ARRAY(Text), server_default=text("'{}'::text[]")
    )
    retries: Mapped[int] = mapped_column(Integer, server_default=text("0"))  # targeted retries
    received_at: Mapped[datetime] = _created()
    processed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class InboxDedup(Base):
    """What a group remembers of a processed message once its inbox row is cleaned up:
    enough to know a redelivery or a late retry for what it is, for the dedup window."""

    __tablename__ = "inbox_dedup"
    __table_args__ = (
        UniqueConstraint("consumer_group", "message_id"),
        Index(
            "uq_inbox_dedup_idempotency_key",
            "consumer_group",
            "idempotency_key",
            unique=True,
            postgresql_where=text("idempotency_key IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    consumer_group: Mapped[str] = mapped_column(String(255))
    message_id: Mapped[uuid.UUID] = mapped_column()
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    topic: Mapped[str] = mapped_column(String(MAX_TOPIC))
    processed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class InboxOffset(Base):
    """Where a group reads each partition from next: written in the transaction that
    stores the inbox rows below it, so the two never disagree."""

    __tablename__ = "inbox_offsets"

    consumer_group: Mapped[str] = mapped_column(String(255), primary_key=True)
    topic: Mapped[str] = mapped_column(String(MAX_TOPIC), primary_key=True)
    partition: Mapped[int] = mapped_column(Integer, primary_key=True)
    next_offset: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = _created()


class Agent(Base):
    __tablename__ = "agents"
    __table_args__ = (
        CheckConstraint(_in("role", AGENT_ROLES), name="role"),
        Index("ix_agents_role_active", "role", "active"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[str] = mapped_column(String(255), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    consumer_group: Mapped[str | None] = mapped_column(String(255))
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = _created()
    last_seen_at: Mapped[datetime] = _created()
    active: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    health: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))


class Lease(Base):
    """A (scope, bucket) held by one owner until it expires; the token fences stale owners."""

    __tablename__ = "leases"

    scope: Mapped[str] = mapped_column(String(255), primary_key=True)
    bucket: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner: Mapped[str | None] = mapped_column(String(255))
    fencing_token: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    expires_at: Mapped[datetime] = _created()
    # Relay buckets: the claim whose rows are unsettled (sent, not marked yet), and until
    # when it holds; the relay's marks change rows only while it does.
    claim_token: Mapped[uuid.UUID | None] = mapped_column()
    claims_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class HealthSnapshot(Base):
    __tablename__ = "health_snapshots"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    taken_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), index=True
    )
    backlog: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    oldest_claimable_age_s: Mapped[float | None] = mapped_column(Float)
    dead_letters: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    consumer_lag: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    agents: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    # {"outbox": {topic: {status: n}}, "inbox": {group: {status: n}},
    #  "deliveries": {group: {status: n}}} (deliveries: unfinished and dead only)
    counts: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
