"""The fault ledger's handler: each effect a row of ``chaos_effects`` (imported by its
workers through ``OUTBOX_HANDLER_MODULES``).

The table has no unique constraint, so an effect that happened twice shows as two
rows; its serial id is the order in which effects committed, so per-key order is
judged by it.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.orm import Session

import consumer

TOPIC = "chaos.events"
GROUP = "chaos"

SCHEMA = """
CREATE TABLE IF NOT EXISTS chaos_effects (
    id bigserial PRIMARY KEY, message_id uuid NOT NULL, key text NOT NULL, seq int NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp())
"""


@consumer.handler(TOPIC)
def record_effect(message: consumer.Message, session: Session) -> None:
    """Write the message's effect in the handler's transaction."""
    session.execute(
        text("INSERT INTO chaos_effects (message_id, key, seq) VALUES (:id, :key, :seq)"),
        {"id": message.id, "key": message.key, "seq": message.payload["seq"]},
    )
