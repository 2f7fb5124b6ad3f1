"""inbox failed keys index

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 08:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A lane's claim asks, for each row of an ordered topic, whether an earlier row of
    # its key waits for a retry: this small index answers at once, whatever the backlog.
    op.create_index(
        "ix_inbox_messages_failed_keys",
        "inbox_messages",
        ["consumer_group", "lane", "key", "id"],
        postgresql_where=sa.text("status = 'failed'"),
    )


def downgrade() -> None:
    op.drop_index("ix_inbox_messages_failed_keys", table_name="inbox_messages")
