"""claim and hold indexes, request hash, fillfactor

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 00:09:11.212046
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Free space on each page lets the relay's claim update rows in place (HOT).
    op.execute("ALTER TABLE outbox_messages SET (fillfactor = 80)")
    op.add_column("outbox_messages", sa.Column("request_hash", sa.String(length=64), nullable=True))
    op.drop_index(op.f("ix_outbox_messages_topic_created_at"), table_name="outbox_messages")
    op.drop_index("ix_outbox_messages_original_message_id", table_name="outbox_messages")
    op.create_index(
        "ix_outbox_messages_original_message_id",
        "outbox_messages",
        ["original_message_id"],
        postgresql_where=sa.text("original_message_id IS NOT NULL"),
    )
    op.create_index(
        "ix_outbox_messages_held",
        "outbox_messages",
        ["bucket", "key", "id"],
        unique=False,
        postgresql_where=sa.text("status = 'pending' AND attempts > 0"),
    )


def downgrade() -> None:
    op.execute("ALTER TABLE outbox_messages RESET (fillfactor)")
    op.drop_index(
        "ix_outbox_messages_held",
        table_name="outbox_messages",
        postgresql_where=sa.text("status = 'pending' AND attempts > 0"),
    )
    op.drop_index("ix_outbox_messages_original_message_id", table_name="outbox_messages")
    op.create_index(
        "ix_outbox_messages_original_message_id", "outbox_messages", ["original_message_id"]
    )
    op.create_index(
        op.f("ix_outbox_messages_topic_created_at"),
        "outbox_messages",
        ["topic", "created_at"],
        unique=False,
    )
    op.drop_column("outbox_messages", "request_hash")
