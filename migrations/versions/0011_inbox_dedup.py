"""a group remembers processed message ids past their inbox rows: the dedup window

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01 22:10:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "inbox_dedup",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("consumer_group", sa.String(length=255), nullable=False),
        sa.Column("message_id", sa.UUID(), nullable=False),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("topic", sa.String(length=249), nullable=False),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_inbox_dedup")),
        sa.UniqueConstraint(
            "consumer_group", "message_id", name=op.f("uq_inbox_dedup_consumer_group_message_id")
        ),
    )
    op.create_index(
        op.f("ix_inbox_dedup_processed_at"), "inbox_dedup", ["processed_at"], unique=False
    )
    op.create_index(
        "uq_inbox_dedup_idempotency_key",
        "inbox_dedup",
        ["consumer_group", "idempotency_key"],
        unique=True,
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("uq_inbox_dedup_idempotency_key", table_name="inbox_dedup")
    op.drop_index(op.f("ix_inbox_dedup_processed_at"), table_name="inbox_dedup")
    op.drop_table("inbox_dedup")
