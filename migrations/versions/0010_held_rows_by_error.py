"""rows that met an error hold back their key, whether they wait for a retry or a topic

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01 22:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_outbox_messages_held", table_name="outbox_messages")
    op.create_index(
        "ix_outbox_messages_held",
        "outbox_messages",
        ["bucket", "key", "id"],
        postgresql_where=sa.text("status = 'pending' AND last_error IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_outbox_messages_held", table_name="outbox_messages")
    op.create_index(
        "ix_outbox_messages_held",
        "outbox_messages",
        ["bucket", "key", "id"],
        postgresql_where=sa.text("status = 'pending' AND attempts > 0"),
    )
