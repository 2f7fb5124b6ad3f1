"""Handlers for end-to-end tests, imported by worker processes (``OUTBOX_HANDLER_MODULES``).

They serve the topic named by ``OUTBOX_TEST_HANDLER_TOPIC`` and write each effect as a
row of ``effects`` (its message id is the primary key), so a repeated effect cannot hide.
Each call is also logged in ``attempts`` on a connection of its own, committed at
once, so that failed attempts leave their trace. A payload may ask to fail:
``{"fail_times": n}`` fails the first n attempts; ``{"poison": true}`` fails until a
row in ``fixes`` says the handler was fixed; ``{"sleep_ms": n}`` takes that long;
``{"exit": true}`` ends the worker process at once.
"""

from __future__ import annotations

import os
import time

from sqlalchemy import text
from sqlalchemy.orm import Session

import consumer

TOPIC_VARIABLE = "OUTBOX_TEST_HANDLER_TOPIC"

SCHEMA = """
CREATE TABLE IF NOT EXISTS effects (
    message_id uuid PRIMARY KEY, key text, seq int, attempt int, worker text,
    at timestamptz DEFAULT clock_timestamp());
CREATE TABLE IF NOT EXISTS attempts (
    message_id uuid, attempt int, at timestamptz DEFAULT clock_timestamp());
CREATE TABLE IF NOT EXISTS fixes (message_id uuid PRIMARY KEY);
"""


def _log_attempt(session: Session, message: consumer.Message) -> None:
    bind = session.get_bind()
    with bind.engine.begin() as conn:  # type: ignore[union-attr]
        conn.execute(
            text("INSERT INTO attempts (message_id, attempt) VALUES (:id, :attempt)"),
            {"id": message.id, "attempt": message.attempt},
        )


def handle(message: consumer.Message, session: Session) -> None:
    """Fail as the payload asks, else write the effect."""
    _log_attempt(session, message)
    payload = message.payload
    if payload.get("exit"):
        os._exit(1)  # as an OOM kill or a segfault would end the process
    if payload.get("sleep_ms"):
        time.sleep(payload["sleep_ms"] / 1000)
    if message.attempt <= payload.get("fail_times", 0):
        raise ConnectionError(f"downstream unavailable (attempt {message.attempt})")
    if payload.get("poison"):
        fixed = session.scalar(
            text("SELECT count(*) FROM fixes WHERE message_id = :id"), {"id": message.id}
        )
        if not fixed:
            raise ValueError("cannot process this message")
    session.execute(
        text(
            "INSERT INTO effects (message_id, key, seq, attempt, worker) "
            "VALUES (:id, :key, :seq, :attempt, :worker)"
        ),
        {
            "id": message.id,
            "key": message.key,
            "seq": payload.get("seq"),
            "attempt": message.attempt,
            "worker": f"{os.getpid()}",
        },
    )


if TOPIC_VARIABLE in os.environ:
    consumer.handler(os.environ[TOPIC_VARIABLE])(handle)
