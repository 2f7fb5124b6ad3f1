"""inbox attempt workers and targeted retries

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23 08:50:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Which worker ran each attempt, in order; and how many targeted retries came in.
    # Both have constant defaults: adding them rewrites no rows.
    op.add_column(
        "inbox_messages",
        sa.Column(
            "attempt_workers",
            postgresql.ARRAY(sa.Text()),
            server_default=sa.text("'{}'::text[]"),
            nullable=False,
        ),
    )
    op.add_column(
        "inbox_messages",
        sa.Column("retries", sa.Integer(), server_default=sa.text("0"), nullable=False),
    )


def downgrade() -> None:
    op.drop_column("inbox_messages", "retries")
    op.drop_column("inbox_messages", "attempt_workers")
