"""``/v1/messages``: publish (one or a batch), read one, list with filters."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from flask import Response, jsonify, request
from flask_openapi3 import Tag

from api.auth import v1_blueprint
from api.errors import error_response, publish_error_response
from api.schemas import (
    BatchIn,
    ErrorOut,
    MessageDetail,
    MessageIn,
    MessagePage,
    MessagePath,
    MessageQuery,
    Published,
    PublishRequest,
)
from api.state import state
from outbox.errors import PublishError
from outbox.message_reads import MessageFilter, get_message, list_messages
from outbox.models import BIGINT_MAX
from outbox.publishing import Message
from outbox.wire import INTERNAL_TOPICS

TAG = Tag(name="messages", description="Publish messages and follow their delivery")
messages = v1_blueprint("messages", __name__, TAG)
ERRORS: dict[Any, Any] = {401: ErrorOut, 409: ErrorOut, 413: ErrorOut, 422: ErrorOut}


def _message(m: MessageIn, idempotency_key: str | None) -> Message:
    return Message(m.topic, m.payload, m.key, m.headers, m.idempotency_key or idempotency_key)


@messages.post("/messages", responses={202: Published, **ERRORS})
def publish(body: PublishRequest) -> tuple[Response, int]:
    """Publish one message, or a batch all-or-nothing.

    An ``Idempotency-Key`` header makes a repeat return the first answer and write
    nothing; in a batch, message ``i`` uses ``<key>:<i>`` unless it has its own key.
    """
    s = state()
    header_key = request.headers.get("Idempotency-Key") or None
    item = body.root
    if isinstance(item, BatchIn):
        if len(item.messages) > s.settings.max_batch:
            return error_response(
                413,
                "batch_too_large",
                f"{len(item.messages)} messages, over the limit of {s.settings.max_batch}",
                {"field": "messages", "limit": s.settings.max_batch},
            )
        batch = [
            _message(m, f"{header_key}:{i}" if header_key else None)
            for i, m in enumerate(item.messages)
        ]
    else:
        if header_key and item.idempotency_key and header_key != item.idempotency_key:
            return error_response(
                422,
                "validation_error",
                "the Idempotency-Key header and the body's idempotency_key differ",
                {"field": "idempotency_key"},
            )
        batch = [_message(item, header_key)]
    for i, message in enumerate(batch):
        if message.topic in INTERNAL_TOPICS:
            field = f"messages[{i}].topic" if isinstance(item, BatchIn) else "topic"
            return error_response(
                422,
                "invalid_topic",
                f"topic {message.topic!r} is the outbox's own",
                {"field": field},
            )
    try:
        with s.engine.begin() as conn:
            ids = s.publisher.publish_batch(conn, batch)
    except PublishError as exc:
        return publish_error_response(exc, batch=isinstance(item, BatchIn))
    s.kicker.kick()
    if isinstance(item, BatchIn):
        return jsonify(message_ids=[str(i) for i in ids]), 202
    return jsonify(message_id=str(ids[0])), 202


@messages.get("/messages/<message_id>", responses={200: MessageDetail, 404: ErrorOut})
def get_one(path: MessagePath) -> tuple[Response, int]:
    """A message's status, attempts, last error, Kafka position and per-group deliveries."""
    with state().sessions() as session:
        view = get_message(session, path.message_id)
    if view is None:
        return error_response(
            404, "not_found", "no such message", {"message_id": str(path.message_id)}
        )
    return jsonify(view), 200


def _decode_cursor(cursor: str) -> int | None:
    try:
        value = int(base64.urlsafe_b64decode(cursor.encode() + b"==").decode())
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None
    return value if 0 < value <= BIGINT_MAX else None


def _encode_cursor(before_id: int) -> str:
    return base64.urlsafe_b64encode(str(before_id).encode()).decode().rstrip("=")


@messages.get("/messages", responses={200: MessagePage, 422: ErrorOut})
def list_all(query: MessageQuery) -> tuple[Response, int]:
    """Messages, newest first, filtered; follow ``next_cursor`` for the next page."""
    before_id = None
    if query.cursor is not None:
        before_id = _decode_cursor(query.cursor)
        if before_id is None:
            return error_response(
                422, "validation_error", "cursor is not valid", {"field": "cursor"}
            )
    where = MessageFilter(
        query.status, query.topic, query.key, query.created_after, query.created_before
    )
    with state().sessions() as session:
        items, next_id = list_messages(session, where, before_id=before_id, limit=query.limit)
    return jsonify(items=items, next_cursor=_encode_cursor(next_id) if next_id else None), 200
