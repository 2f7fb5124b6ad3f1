"""a relay bucket's lease records its outstanding row claim

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 21:20:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The claim token of the batch that holds rows of the bucket, and until when its
    # claims hold: no relay claims in the bucket before those rows are settled.
    op.add_column("leases", sa.Column("claim_token", postgresql.UUID(as_uuid=True)))
    op.add_column("leases", sa.Column("claims_until", sa.DateTime(timezone=True)))


def downgrade() -> None:
    op.drop_column("leases", "claims_until")
    op.drop_column("leases", "claim_token")
