"""``/v1/dead-letters``: list the dead letters of every side, requeue one or many.

A requeued outbox row is relayed at once (kick); a requeued inbox row is picked
up by its lane at the next ``consumer.sweep`` tick (``OUTBOX_LANE_SWEEP_INTERVAL_S``).
"""

from __future__ import annotations

from flask import Response, jsonify
from flask_openapi3 import Tag

from api.auth import v1_blueprint
from api.errors import error_response
from api.schemas import (
    DeadLetterPage,
    DeadLetterPath,
    DeadLetterQuery,
    DiscardedOut,
    ErrorOut,
    HeldKeyList,
    HeldKeyQuery,
    RequeuedOut,
    RequeueFilterIn,
)
from api.state import state
from outbox import tasknames
from outbox.deadletters import (
    decode_cursor,
    discard,
    held_keys,
    list_dead_letters,
    parse_id,
    requeue,
    requeue_matching,
)

TAG = Tag(name="dead letters", description="Messages that failed for good, and their requeue")
dead_letters = v1_blueprint("dead_letters", __name__, TAG)


@dead_letters.get("/dead-letters", responses={200: DeadLetterPage, 422: ErrorOut})
def list_all(query: DeadLetterQuery) -> tuple[Response, int]:
    """Dead letters of every side, newest first; follow ``next_cursor`` for the next page."""
    cursor = None
    if query.cursor is not None:
        cursor = decode_cursor(query.cursor)
        if cursor is None:
            return error_response(
                422, "validation_error", "cursor is not valid", {"field": "cursor"}
            )
    where = query.where()
    with state().sessions() as session:
        items, next_cursor = list_dead_letters(session, where, cursor=cursor, limit=query.limit)
    return jsonify(items=items, next_cursor=next_cursor), 200


@dead_letters.post(
    "/dead-letters/<id>/requeue", responses={200: RequeuedOut, 404: ErrorOut, 422: ErrorOut}
)
def requeue_one(path: DeadLetterPath) -> tuple[Response, int]:
    """Requeue one dead letter: same message id and headers, a fresh attempt budget."""
    if parse_id(path.id) is None:
        return _not_an_id()
    s = state()
    with s.sessions.begin() as session:
        found = requeue(session, path.id)
    if not found:
        return error_response(404, "not_found", "no such dead letter", {"id": path.id})
    side = path.id.partition(":")[0]
    _kick(side)
    return jsonify(requeued={side: 1}), 200


@dead_letters.post(
    "/dead-letters/<id>/discard", responses={200: DiscardedOut, 404: ErrorOut, 422: ErrorOut}
)
def discard_one(path: DeadLetterPath) -> tuple[Response, int]:
    """Let an inbox dead letter go without running it: in a hold_key group its key moves
    on, and a redelivery of it is not run either. It is kept as done, its last error
    saying it was discarded."""
    parsed = parse_id(path.id)
    if parsed is None:
        return _not_an_id()
    if parsed[0] != "inbox":
        return error_response(
            422,
            "validation_error",
            "id: only inbox dead letters are discarded (they are what holds a key)",
            {"field": "id"},
        )
    with state().sessions.begin() as session:
        found = discard(session, path.id)
    if not found:
        return error_response(404, "not_found", "no such dead letter", {"id": path.id})
    return jsonify(discarded=path.id), 200


@dead_letters.get("/held-keys", responses={200: HeldKeyList, 422: ErrorOut})
def list_held_keys(query: HeldKeyQuery) -> tuple[Response, int]:
    """Keys parked by a dead letter in hold_key groups: the dead letter that holds each,
    and how many later messages of the key wait for it to be requeued or discarded."""
    with state().sessions() as session:
        items = held_keys(session, query.group, query.limit)
    return jsonify(items=items), 200


def _not_an_id() -> tuple[Response, int]:
    return error_response(
        422,
        "validation_error",
        "id: not a dead-letter id (outbox:<row>, inbox:<row> or delivery:<row>)",
        {"field": "id"},
    )


def _kick(*sides: str) -> None:
    """Start on requeued rows now: the relay for outbox rows, the retry for deliveries."""
    s = state()
    if "outbox" in sides:
        s.kicker.kick()
    if "delivery" in sides:
        s.celery.send_task(tasknames.RETRY_TARGETED, expires=max(s.settings.retry_interval_s, 1.0))


@dead_letters.post("/dead-letters/requeue", responses={200: RequeuedOut, 422: ErrorOut})
def requeue_many(body: RequeueFilterIn) -> tuple[Response, int]:
    """Requeue the dead letters matching a filter, oldest first, up to ``limit``."""
    s = state()
    where = body.where()
    with s.sessions.begin() as session:
        counts = requeue_matching(session, where, limit=body.limit)
    _kick(*(side for side, count in counts.items() if count))
    return jsonify(requeued=counts), 200
