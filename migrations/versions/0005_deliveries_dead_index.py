"""deliveries dead index

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 08:10:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Dead deliveries are dead letters: counted by every heartbeat, aged out by cleanup.
    op.create_index(
        "ix_deliveries_dead",
        "deliveries",
        ["updated_at"],
        postgresql_where=sa.text("status = 'dead'"),
    )


def downgrade() -> None:
    op.drop_index("ix_deliveries_dead", table_name="deliveries")
