"""A handler for the targeted-retry test, imported by worker processes
(``OUTBOX_HANDLER_MODULES``): it serves ``OUTBOX_TEST_HANDLER_TOPIC`` for every group and
records each effect per (group, message) with the worker that produced it. It fails
for the group named by ``OUTBOX_TEST_FAIL_GROUP`` on the worker whose
``OUTBOX_TEST_WORKER`` is ``OUTBOX_TEST_FAIL_WORKER``. Every call is logged in
``group_attempts`` on a connection of its own, so failed attempts leave their trace.
"""

from __future__ import annotations

import os

from sqlalchemy import text
from sqlalchemy.orm import Session

import consumer

SCHEMA = """
CREATE TABLE IF NOT EXISTS group_effects (
    consumer_group text, message_id uuid, worker text, PRIMARY KEY (consumer_group, message_id));
CREATE TABLE IF NOT EXISTS group_attempts (consumer_group text, message_id uuid, worker text);
"""


def handle(message: consumer.Message, session: Session) -> None:
    worker = os.environ.get("OUTBOX_TEST_WORKER", "?")
    with session.get_bind().engine.begin() as conn:  # type: ignore[union-attr]
        conn.execute(
            text("INSERT INTO group_attempts VALUES (:g, :id, :w)"),
            {"g": message.group, "id": message.id, "w": worker},
        )
    if (message.group, worker) == (
        os.environ.get("OUTBOX_TEST_FAIL_GROUP"),
        os.environ.get("OUTBOX_TEST_FAIL_WORKER"),
    ):
        raise ConnectionError(f"{worker} cannot reach this group's downstream")
    session.execute(
        text("INSERT INTO group_effects VALUES (:g, :id, :w)"),
        {"g": message.group, "id": message.id, "w": worker},
    )


if "OUTBOX_TEST_HANDLER_TOPIC" in os.environ:
    consumer.handler(os.environ["OUTBOX_TEST_HANDLER_TOPIC"])(handle)
