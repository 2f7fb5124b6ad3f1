"""a consumer group's on_dead: skip (later messages of a key go on) or hold_key

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-04 15:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "consumer_groups",
        sa.Column("on_dead", sa.String(length=16), server_default="skip", nullable=False),
    )
    op.create_check_constraint(
        op.f("ck_consumer_groups_on_dead"), "consumer_groups", "on_dead IN ('skip', 'hold_key')"
    )
    op.create_index(
        "ix_inbox_messages_dead_keys",
        "inbox_messages",
        ["consumer_group", "lane", "key", "id"],
        postgresql_where=sa.text("status = 'dead'"),
    )


def downgrade() -> None:
    op.drop_index("ix_inbox_messages_dead_keys", table_name="inbox_messages")
    op.drop_constraint(op.f("ck_consumer_groups_on_dead"), "consumer_groups", type_="check")
    op.drop_column("consumer_groups", "on_dead")
