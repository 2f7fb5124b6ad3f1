"""The handler of ``outbox bench e2e``: one effect row per message, the time it ran."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.orm import Session

import consumer

TOPIC = "bench.e2e"
# The same messages, for a consumer group that requires acks.
TOPIC_ACKED = "bench.e2e.acked"
SCHEMA = """
CREATE TABLE IF NOT EXISTS bench_effects (
    message_id uuid PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp())
"""
EFFECT = text("INSERT INTO bench_effects (message_id) VALUES (:id)")


@consumer.handler(TOPIC)
@consumer.handler(TOPIC_ACKED)
def record_effect(message: consumer.Message, session: Session) -> None:
    """Write the message's effect, in the transaction that marks it done."""
    session.execute(EFFECT, {"id": message.id})
