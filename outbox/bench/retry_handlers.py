"""The handlers of ``outbox bench retry``: one effect row per message. On
:data:`TOPIC_SOME`, the first try of every message whose ``payload["n"] % 100`` is
below ``OUTBOX_BENCH_FAIL_PERCENT`` fails; its targeted retry succeeds."""

from __future__ import annotations

import os

from sqlalchemy import text
from sqlalchemy.orm import Session

import consumer

TOPIC_NONE = "bench.retry.none"
TOPIC_SOME = "bench.retry.some"
FAIL_PERCENT = int(os.environ.get("OUTBOX_BENCH_FAIL_PERCENT", "10"))


def _effect(message: consumer.Message, session: Session) -> None:
    session.execute(text("INSERT INTO bench_effects (message_id) VALUES (:id)"), {"id": message.id})


@consumer.handler(TOPIC_NONE)
def never_fails(message: consumer.Message, session: Session) -> None:
    """Write the message's effect."""
    _effect(message, session)


@consumer.handler(TOPIC_SOME)
def fails_once(message: consumer.Message, session: Session) -> None:
    """Fail the first try of ``FAIL_PERCENT`` in 100 messages; write the effect otherwise."""
    if not message.is_retry and message.payload["n"] % 100 < FAIL_PERCENT:
        raise RuntimeError("bench: this message's first try fails")
    _effect(message, session)
