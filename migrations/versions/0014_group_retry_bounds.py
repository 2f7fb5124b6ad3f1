"""bounds on a consumer group's retry settings, so every backoff stays finite

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-04 17:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

# The bounds as of this revision (outbox.models may move on; a migration does not).
MAX_BACKOFF_S = 31536000.0
MAX_RETRY_FACTOR = 100.0
MAX_HANDLER_TIMEOUT_S = 3600.0

# A value out of bounds is brought to the nearest bound (NaN and infinity compare above
# every number in PostgreSQL, so they take the upper one); a non-positive one to the default.
CLAMPS = {
    "retry_base_s": (MAX_BACKOFF_S, "retry_base_s <= 0", 1.0),
    "retry_cap_s": (MAX_BACKOFF_S, "retry_cap_s <= 0", 600.0),
    "retry_factor": (MAX_RETRY_FACTOR, "retry_factor < 1", 1.0),
    "handler_timeout_s": (MAX_HANDLER_TIMEOUT_S, "handler_timeout_s <= 0", 30.0),
    "max_attempts": (2**31 - 1, "max_attempts < 1", 1),
}

CHECKS = {
    "handler_timeout": f"handler_timeout_s > 0 AND handler_timeout_s <= {MAX_HANDLER_TIMEOUT_S}",
    "retry_base": f"retry_base_s > 0 AND retry_base_s <= {MAX_BACKOFF_S}",
    "retry_cap": f"retry_cap_s > 0 AND retry_cap_s <= {MAX_BACKOFF_S}",
    "retry_factor": f"retry_factor >= 1 AND retry_factor <= {MAX_RETRY_FACTOR}",
    "max_attempts": "max_attempts >= 1",
}


def upgrade() -> None:
    for column, (upper, too_low, default) in CLAMPS.items():
        # Column names and conditions are this module's constants; the values are bound.
        clamp = (
            f"UPDATE consumer_groups SET {column} = CASE WHEN {column} > :upper THEN :upper "  # noqa: S608
            f"ELSE :default END WHERE {column} > :upper OR {too_low}"
        )
        op.get_bind().execute(sa.text(clamp), {"upper": upper, "default": default})
    op.drop_constraint(op.f("ck_consumer_groups_handler_timeout"), "consumer_groups", type_="check")
    for name, condition in CHECKS.items():
        op.create_check_constraint(op.f(f"ck_consumer_groups_{name}"), "consumer_groups", condition)


def downgrade() -> None:
    for name in CHECKS:
        op.drop_constraint(op.f(f"ck_consumer_groups_{name}"), "consumer_groups", type_="check")
    op.create_check_constraint(
        op.f("ck_consumer_groups_handler_timeout"), "consumer_groups", "handler_timeout_s > 0"
    )
