"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-22 23:48:19.340493
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "agents",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("instance_id", sa.String(length=255), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("consumer_group", sa.String(length=255), nullable=True),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column(
            "started_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "last_seen_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("active", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column(
            "health",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "role IN ('api', 'worker', 'beat', 'consumer')", name=op.f("ck_agents_role")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_agents")),
        sa.UniqueConstraint("instance_id", name=op.f("uq_agents_instance_id")),
    )
    op.create_index("ix_agents_role_active", "agents", ["role", "active"], unique=False)
    op.create_table(
        "health_snapshots",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column(
            "taken_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column(
            "backlog",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("oldest_claimable_age_s", sa.Float(), nullable=True),
        sa.Column("dead_letters", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "consumer_lag",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column(
            "agents",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_health_snapshots")),
    )
    op.create_index(
        op.f("ix_health_snapshots_taken_at"), "health_snapshots", ["taken_at"], unique=False
    )
    op.create_table(
        "inbox_messages",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("consumer_group", sa.String(length=255), nullable=False),
        sa.Column("message_id", sa.UUID(), nullable=False),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("topic", sa.String(length=249), nullable=False),
        sa.Column("partition", sa.Integer(), nullable=False),
        sa.Column("offset", sa.BigInteger(), nullable=False),
        sa.Column("key", sa.Text(), nullable=True),
        sa.Column("lane", sa.SmallInteger(), nullable=False),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column(
            "headers",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("status", sa.String(length=16), server_default="received", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "next_attempt_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("worker", sa.String(length=255), nullable=True),
        sa.Column(
            "received_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('received', 'done', 'failed', 'dead')",
            name=op.f("ck_inbox_messages_status"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_inbox_messages")),
        sa.UniqueConstraint(
            "consumer_group", "message_id", name=op.f("uq_inbox_messages_consumer_group_message_id")
        ),
    )
    op.create_index(
        "ix_inbox_messages_due",
        "inbox_messages",
        ["consumer_group", "lane", "id"],
        unique=False,
        postgresql_where=sa.text("status IN ('received', 'failed')"),
    )
    op.create_index(
        "ix_inbox_messages_processed_at",
        "inbox_messages",
        ["processed_at"],
        unique=False,
        postgresql_where=sa.text("status = 'done'"),
    )
    op.create_index(
        "uq_inbox_messages_idempotency_key",
        "inbox_messages",
        ["consumer_group", "idempotency_key"],
        unique=True,
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )
    op.create_table(
        "leases",
        sa.Column("scope", sa.String(length=255), nullable=False),
        sa.Column("bucket", sa.Integer(), nullable=False),
        sa.Column("owner", sa.String(length=255), nullable=True),
        sa.Column("fencing_token", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "expires_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("scope", "bucket", name=op.f("pk_leases")),
    )
    op.create_table(
        "outbox_messages",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("message_id", sa.UUID(), nullable=False),
        sa.Column("topic", sa.String(length=249), nullable=False),
        sa.Column("key", sa.Text(), nullable=True),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column(
            "headers",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("status", sa.String(length=16), server_default="pending", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "available_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("bucket", sa.SmallInteger(), nullable=False),
        sa.Column("claim_token", sa.UUID(), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("kafka_partition", sa.Integer(), nullable=True),
        sa.Column("kafka_offset", sa.BigInteger(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("is_retry", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("original_message_id", sa.UUID(), nullable=True),
        sa.Column("target_group", sa.String(length=255), nullable=True),
        sa.Column("target_instance", sa.String(length=255), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'sent', 'dead')", name=op.f("ck_outbox_messages_status")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox_messages")),
        sa.UniqueConstraint("message_id", name=op.f("uq_outbox_messages_message_id")),
    )
    op.create_index(
        "ix_outbox_messages_claimable",
        "outbox_messages",
        ["bucket", "id"],
        unique=False,
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_index(
        op.f("ix_outbox_messages_original_message_id"),
        "outbox_messages",
        ["original_message_id"],
        unique=False,
    )
    op.create_index(
        "ix_outbox_messages_sent_at",
        "outbox_messages",
        ["sent_at"],
        unique=False,
        postgresql_where=sa.text("status = 'sent'"),
    )
    op.create_index(
        "ix_outbox_messages_topic_created_at",
        "outbox_messages",
        ["topic", "created_at"],
        unique=False,
    )
    op.create_index(
        "uq_outbox_messages_idempotency_key",
        "outbox_messages",
        ["idempotency_key"],
        unique=True,
        postgresql_where=sa.text("idempotency_key IS NOT NULL AND NOT is_retry"),
    )
    op.create_table(
        "topics",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=249), nullable=False),
        sa.Column("description", sa.Text(), server_default="", nullable=False),
        sa.Column("active", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_topics")),
        sa.UniqueConstraint("name", name=op.f("uq_topics_name")),
    )
    op.create_table(
        "consumer_groups",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("topic", sa.String(length=249), nullable=False),
        sa.Column("requires_ack", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("ack_timeout_s", sa.Integer(), server_default=sa.text("300"), nullable=False),
        sa.Column("max_retries", sa.Integer(), server_default=sa.text("10"), nullable=False),
        sa.Column("ordered", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("retry_base_s", sa.Float(), server_default=sa.text("1.0"), nullable=False),
        sa.Column("retry_factor", sa.Float(), server_default=sa.text("2.0"), nullable=False),
        sa.Column("retry_cap_s", sa.Float(), server_default=sa.text("600.0"), nullable=False),
        sa.Column("max_attempts", sa.Integer(), server_default=sa.text("10"), nullable=False),
        sa.Column("active", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("ack_timeout_s > 0", name=op.f("ck_consumer_groups_ack_timeout")),
        sa.CheckConstraint("max_retries >= -1", name=op.f("ck_consumer_groups_max_retries")),
        sa.ForeignKeyConstraint(
            ["topic"],
            ["topics.name"],
            name=op.f("fk_consumer_groups_topic_topics"),
            onupdate="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_consumer_groups")),
        sa.UniqueConstraint("name", "topic", name=op.f("uq_consumer_groups_name_topic")),
    )
    op.create_table(
        "deliveries",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("message_id", sa.UUID(), nullable=False),
        sa.Column("consumer_group_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), server_default="awaiting_ack", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("next_retry_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("instance_id", sa.String(length=255), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "status IN ('awaiting_ack', 'acked', 'failed', 'dead')",
            name=op.f("ck_deliveries_status"),
        ),
        sa.ForeignKeyConstraint(
            ["consumer_group_id"],
            ["consumer_groups.id"],
            name=op.f("fk_deliveries_consumer_group_id_consumer_groups"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deliveries")),
        sa.UniqueConstraint(
            "message_id",
            "consumer_group_id",
            name=op.f("uq_deliveries_message_id_consumer_group_id"),
        ),
    )
    op.create_index(
        op.f("ix_deliveries_consumer_group_id"), "deliveries", ["consumer_group_id"], unique=False
    )
    op.create_index(
        "ix_deliveries_due",
        "deliveries",
        ["next_retry_at"],
        unique=False,
        postgresql_where=sa.text("status IN ('awaiting_ack', 'failed')"),
    )


def downgrade() -> None:
    op.drop_index(
        "ix_deliveries_due",
        table_name="deliveries",
        postgresql_where=sa.text("status IN ('awaiting_ack', 'failed')"),
    )
    op.drop_index(op.f("ix_deliveries_consumer_group_id"), table_name="deliveries")
    op.drop_table("deliveries")
    op.drop_table("consumer_groups")
    op.drop_table("topics")
    op.drop_index(
        "uq_outbox_messages_idempotency_key",
        table_name="outbox_messages",
        postgresql_where=sa.text("idempotency_key IS NOT NULL AND NOT is_retry"),
    )
    op.drop_index("ix_outbox_messages_topic_created_at", table_name="outbox_messages")
    op.drop_index(
        "ix_outbox_messages_sent_at",
        table_name="outbox_messages",
        postgresql_where=sa.text("status = 'sent'"),
    )
    op.drop_index(op.f("ix_outbox_messages_original_message_id"), table_name="outbox_messages")
    op.drop_index(
        "ix_outbox_messages_claimable",
        table_name="outbox_messages",
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.drop_table("outbox_messages")
    op.drop_table("leases")
    op.drop_index(
        "uq_inbox_messages_idempotency_key",
        table_name="inbox_messages",
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )
    op.drop_index(
        "ix_inbox_messages_processed_at",
        table_name="inbox_messages",
        postgresql_where=sa.text("status = 'done'"),
    )
    op.drop_index(
        "ix_inbox_messages_due",
        table_name="inbox_messages",
        postgresql_where=sa.text("status IN ('received', 'failed')"),
    )
    op.drop_table("inbox_messages")
    op.drop_index(op.f("ix_health_snapshots_taken_at"), table_name="health_snapshots")
    op.drop_table("health_snapshots")
    op.drop_index("ix_agents_role_active", table_name="agents")
    op.drop_table("agents")
