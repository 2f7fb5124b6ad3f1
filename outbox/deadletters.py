"""Dead letters: outbox rows the relay gave up on, inbox rows whose handler failed for
good, and deliveries that a group never acknowledged after all its targeted retries.
List them with filters, and requeue them in place: a requeued message keeps its id,
payload and headers and gets a fresh attempt (or retry) budget.

A dead letter's id names its side: ``outbox:<row id>``, ``inbox:<row id>`` or
``delivery:<row id>``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from outbox import queries
from outbox.models import BIGINT_MAX, MAX_ERROR_CHARS
from outbox.wire import message_headers

SIDES = ("outbox", "inbox", "delivery")
_REQUEUE = {
    "outbox": queries.REQUEUE_OUTBOX,
    "inbox": queries.REQUEUE_INBOX,
    "delivery": queries.REQUEUE_DELIVERY,
}


@dataclasses.dataclass(frozen=True)
class DeadLetterFilter:
    """Filters of a dead-letter listing or a bulk requeue; None means any."""

    side: str | None = None
    group: str | None = None  # inbox and delivery sides: outbox rows belong to no group
    topic: str | None = None
    error: str | None = None  # a part of the last error, case-insensitive
    after: datetime | None = None  # created (outbox) or received (inbox) at or after
    before: datetime | None = None

    @classmethod
    def of(cls, values: Mapping[str, Any]) -> DeadLetterFilter:
        """The filter of the fields of ``values`` named as this class's (others ignored)."""
        return cls(**{f.name: values.get(f.name) for f in dataclasses.fields(cls)})

    def params(self) -> dict[str, Any]:
        return {
            "side": self.side,
            "group": self.group,
            "topic": self.topic,
            "error": None if self.error is None else f"%{_escape_like(self.error)}%",
            "after": self.after,
            "before": self.before,
        }


def parse_id(dead_letter_id: str) -> tuple[str, int] | None:
    """``("outbox", 12)`` from ``"outbox:12"``; None if it is not a dead-letter id."""
    side, _, number = dead_letter_id.partition(":")
    # ASCII digits only ("²" is a digit to str.isdigit, not to int), within a bigint
    if side not in SIDES or not (number.isascii() and number.isdigit()):
        return None
    row_id = int(number)
    return (side, row_id) if row_id <= BIGINT_MAX else None


def encode_cursor(at: datetime, side: str, row_id: int) -> str:
    raw = json.dumps([at.isoformat(), side, row_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str, int] | None:
    """The position a cursor names, or None if it is not one of ours."""
    try:
        at, side, row_id = json.loads(base64.urlsafe_b64decode(cursor.encode() + b"=="))
        position = (datetime.fromisoformat(at), side, int(row_id))
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        return None
    return position if side in SIDES and 0 < position[2] <= BIGINT_MAX else None


def list_dead_letters(
    session: Session,
    where: DeadLetterFilter,
    *,
    cursor: tuple[datetime, str, int] | None = None,
    limit: int = 100,
) -> tuple[list[dict[str, Any]], str | None]:
    """Newest first; returns a page and the cursor of the next one (None at the end)."""
    at, side, row_id = cursor or (None, None, None)
    rows = session.execute(
        queries.DEAD_LETTERS,
        {
            **where.params(),
            "cursor_at": at,
            "cursor_side": side,
            "cursor_id": row_id,
            "limit": limit + 1,
        },
    ).all()
    page = [
        {
            "id": f"{r.side}:{r.id}",
            "side": r.side,
            "message_id": str(r.message_id),
            "group": r.consumer_group,
            "topic": r.topic,
            "key": r.key,
            "attempts": r.attempts,
            "error": r.last_error,
            # an inbox row holds the headers as received; an outbox row, the caller's
            "headers": r.headers
            if r.side == "inbox"
            else message_headers(str(r.message_id), r.headers),
            "payload": r.payload,
            "at": r.at.isoformat(),
        }
        for r in rows[:limit]
    ]
    last = rows[limit - 1] if len(rows) > limit else None
    return page, (encode_cursor(last.at, last.side, last.id) if last is not None else None)


def discard(session: Session, dead_letter_id: str) -> bool:
    """Let an inbox dead letter go without running it (its key moves on); False when there
    is no such inbox dead letter. The caller commits."""
    parsed = parse_id(dead_letter_id)
    if parsed is None or parsed[0] != "inbox":
        return False
    params = {"id": parsed[1], "max_error": MAX_ERROR_CHARS}
    return session.execute(queries.DISCARD_INBOX, params).rowcount == 1  # type: ignore[attr-defined]


def held_keys(session: Session, group: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Keys parked by a dead letter in hold_key groups, with how many messages wait."""
    return [
        {
            "group": r.consumer_group,
            "topic": r.topic,
            "key": r.key,
            "held": r.held,
            "dead_letter": f"inbox:{r.id}",
            "error": r.last_error,
        }
        for r in session.execute(queries.HELD_KEYS, {"group": group, "limit": limit})
    ]


def requeue(session: Session, dead_letter_id: str) -> bool:
    """Requeue one dead letter; False when there is no such dead letter. The caller commits."""
    parsed = parse_id(dead_letter_id)
    if parsed is None:
        return False
    side, row_id = parsed
    return session.execute(_REQUEUE[side], {"ids": [row_id]}).rowcount == 1  # type: ignore[attr-defined]


def requeue_matching(session: Session, where: DeadLetterFilter, *, limit: int) -> dict[str, int]:
    """Requeue up to ``limit`` dead letters matching ``where`` (oldest first); the caller
    commits. Returns how many were requeued on each side."""
    ids: dict[str, list[int]] = {side: [] for side in SIDES}
    for side, row_id in session.execute(
        queries.DEAD_LETTERS_TO_REQUEUE, {**where.params(), "limit": limit}
    ):
        ids[side].append(row_id)
    for side, side_ids in ids.items():
        if side_ids:
            session.execute(_REQUEUE[side], {"ids": side_ids})
    return {side: len(rows) for side, rows in ids.items()}


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
