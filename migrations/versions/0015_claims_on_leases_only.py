"""relay claims live on the bucket leases only: the rows' claim columns go

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-06 10:00:00.000000

A claim was stamped on each of its rows and on its buckets' leases; the leases alone
now say which claim is unsettled, and the marks check them. A claim in flight as this
runs stays recorded on its leases, which no relay claims in until it is settled or
lapses.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_column("outbox_messages", "claim_token")
    op.drop_column("outbox_messages", "lease_expires_at")


def downgrade() -> None:
    op.add_column("outbox_messages", sa.Column("claim_token", sa.UUID(), nullable=True))
    op.add_column(
        "outbox_messages",
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
    )
