"""consumer groups limit how long one handler call may take

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01 21:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "consumer_groups",
        sa.Column("handler_timeout_s", sa.Float(), server_default=sa.text("30.0"), nullable=False),
    )
    op.create_check_constraint(
        op.f("ck_consumer_groups_handler_timeout"), "consumer_groups", "handler_timeout_s > 0"
    )


def downgrade() -> None:
    op.drop_constraint(op.f("ck_consumer_groups_handler_timeout"), "consumer_groups", type_="check")
    op.drop_column("consumer_groups", "handler_timeout_s")
