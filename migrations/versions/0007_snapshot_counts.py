"""health snapshot counts by topic and group

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-23 11:10:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Rows by topic (outbox) and by group (inbox, deliveries) and status, for /metrics.
    op.add_column(
        "health_snapshots",
        sa.Column(
            "counts",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
    )


def downgrade() -> None:
    op.drop_column("health_snapshots", "counts")
