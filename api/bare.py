"""The baseline of ``outbox bench api``: a bare Flask endpoint doing one INSERT into the same
table, with no validation, authentication, idempotency or relay kick."""

from __future__ import annotations

import json
import uuid
import zlib

from flask import Flask, Response, jsonify, request
from sqlalchemy import text

from outbox.db import make_engine
from outbox.settings import Settings

INSERT = text(
    "INSERT INTO outbox_messages (message_id, topic, key, payload, bucket) "
    "VALUES (:message_id, :topic, :key, CAST(:payload AS jsonb), :bucket)"
)


def create_bare_app(settings: Settings | None = None) -> Flask:
    """A Flask app with ``POST /bare``: parse JSON, INSERT one row, answer 202."""
    settings = settings or Settings.from_env()
    app = Flask(__name__)
    engine = make_engine(settings)

    @app.post("/bare")
    def bare() -> tuple[Response, int]:
        body = request.get_json()
        message_id = str(uuid.uuid4())
        key = body.get("key")
        with engine.begin() as conn:
            conn.execute(
                INSERT,
                {
                    "message_id": message_id,
                    "topic": body["topic"],
                    "key": key,
                    "payload": json.dumps(body["payload"]),
                    "bucket": zlib.crc32((key or message_id).encode()) % settings.buckets,
                },
            )
        return jsonify(message_id=message_id), 202

    return app
