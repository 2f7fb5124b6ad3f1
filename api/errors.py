"""Every error leaves the API as ``{"error": {"code", "message", "details"}}``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import kombu.exceptions
import redis
import sqlalchemy.exc
from flask import Flask, Response, jsonify
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from outbox.errors import IdempotencyConflict, PublishError

log = logging.getLogger(__name__)
# Discriminator tags of union bodies; they are not part of a field's path.
_UNION_TAGS = {"message", "batch"}


def error_response(
    status: int, code: str, message: str, details: dict[str, Any] | None = None
) -> tuple[Response, int]:
    """The JSON error envelope with its status code."""
    body = {"error": {"code": code, "message": message, "details": details or {}}}
    return jsonify(body), status


def field_path(loc: tuple[Any, ...]) -> str:
    """``("batch", "messages", 3, "topic")`` -> ``messages[3].topic``."""
    parts = list(loc)
    if parts and parts[0] in _UNION_TAGS:
        parts = parts[1:]
    return join_path(parts)


def join_path(parts: Sequence[Any]) -> str:
    """``("messages", 3, "topic")`` -> ``messages[3].topic``; empty: ``body``."""
    path = ""
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "body"


def validation_error_response(exc: ValidationError) -> Response:
    """422 naming each field that failed, for flask-openapi3's validation callback."""
    fields = [
        {"field": field_path(e["loc"]), "message": e["msg"], "type": e["type"]}
        for e in exc.errors(include_url=False, include_input=False)
    ]
    first = fields[0] if fields else {"field": "body", "message": "invalid"}
    response, status = error_response(
        422, "validation_error", f"{first['field']}: {first['message']}", {"fields": fields}
    )
    response.status_code = status
    return response


def publish_error_response(exc: PublishError, *, batch: bool) -> tuple[Response, int]:
    """A refused message: 409 for a reused idempotency key, else 422; names the field."""
    field = exc.field or "body"
    if batch and exc.index is not None:
        field = f"messages[{exc.index}].{field}"
    status = 409 if isinstance(exc, IdempotencyConflict) else 422
    return error_response(status, exc.code, str(exc), {"field": field})


def register_error_handlers(app: Flask) -> None:
    """Turn HTTP errors and unexpected exceptions into the JSON envelope."""

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(exc: RequestEntityTooLarge) -> tuple[Response, int]:
        limit = app.config.get("MAX_CONTENT_LENGTH")
        return error_response(
            413,
            "body_too_large",
            f"request body is over the limit of {limit} bytes",
            {"limit": limit},
        )

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> tuple[Response, int]:
        code = (exc.name or "error").lower().replace(" ", "_")
        return error_response(exc.code or 500, code, exc.description or exc.name)

    @app.errorhandler(redis.RedisError)
    @app.errorhandler(kombu.exceptions.OperationalError)
    def _redis_down(exc: Exception) -> tuple[Response, int]:
        log.warning("Redis unavailable: %s: %s", type(exc).__name__, exc)
        return error_response(503, "unavailable", "Redis does not answer", {"service": "redis"})

    @app.errorhandler(sqlalchemy.exc.OperationalError)
    def _database_down(exc: Exception) -> tuple[Response, int]:
        log.warning("PostgreSQL unavailable: %s", exc)
        return error_response(
            503, "unavailable", "PostgreSQL does not answer", {"service": "postgresql"}
        )

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> tuple[Response, int]:
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal server error")
