"""dead letter indexes

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 03:45:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_outbox_messages_dead",
        "outbox_messages",
        ["created_at"],
        postgresql_where=sa.text("status = 'dead'"),
    )
    op.create_index(
        "ix_inbox_messages_dead",
        "inbox_messages",
        ["received_at"],
        postgresql_where=sa.text("status = 'dead'"),
    )


def downgrade() -> None:
    op.drop_index("ix_inbox_messages_dead", table_name="inbox_messages")
    op.drop_index("ix_outbox_messages_dead", table_name="outbox_messages")
