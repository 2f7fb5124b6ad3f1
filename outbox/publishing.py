"""``publish()``: add messages to the caller's transaction. Nothing is sent before commit.

A batch, of one message or many, is one INSERT statement; a batch of
:data:`COPY_MIN_ROWS` or more without idempotency keys is one COPY, once a look
at its topics found them registered and active. When a batch writes fewer rows
than it was given, a second look says why (unknown or inactive topic, or an
idempotency key used before) and the error names the message and field. A
repeat of an idempotency key with the same message returns the first message's
id and adds nothing; with a different message it is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from functools import lru_cache
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
from typing import Any, NamedTuple

from sqlalchemy import Connection
from sqlalchemy.orm import Session

from outbox import leases, queries
from outbox.batch_text import PreparedRow, copy_rows, document
from outbox.db import execute
from outbox.errors import (
    IdempotencyConflict,
    InactiveTopic,
    InvalidHeaders,
    KeyTooLong,
    PayloadNotJSON,
    PayloadTooLarge,
    PublishError,
    UnknownTopic,
)
from outbox.registry import check_topic_names
from outbox.settings import Settings, env_name
from outbox.wire import (
    HEADER_IDEMPOTENCY_KEY,
    HEADER_TRACEPARENT,
    MAX_TOPIC,
    RESERVED_HEADERS,
    bucket_for,
)

_BUCKETS = env_name("buckets")
TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
MAX_IDEMPOTENCY_KEY = 255
# A batch this large without idempotency keys goes in by COPY (queries.COPY_MESSAGES).
# Below it, COPY's two more round trips (the look at the topics, and COPY's own
# hand-shake) cost more than it saves: the two ways cost the same at 10-20 rows.
COPY_MIN_ROWS = 16


class Message(NamedTuple):
    """One message to publish (a tuple: a batch makes thousands at a time)."""

    topic: str
    payload: Any
    key: str | None = None
    headers: Mapping[str, str] | None = None
    idempotency_key: str | None = None


# One encoder for every message: json.dumps with options would build one per call.
_ENCODER = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, allow_nan=False, sort_keys=True
)
_compact = _ENCODER.encode
# The same for payloads, without the per-call set-up of ``encode`` (json's C encoder, made
# once), and without its bookkeeping of circular references: a circular payload recurses
# to Python's limit and is refused like any other value that is not JSON.
_PAYLOAD_ENCODER = (
    None
    if c_make_encoder is None
    else c_make_encoder(
        None, _ENCODER.default, encode_basestring, None, ":", ",", True, False, False
    )
)


def _payload_json(value: Any) -> str:
    """``value`` as compact JSON, keys sorted; TypeError or ValueError if it is not JSON."""
    if _PAYLOAD_ENCODER is None:
        return _compact(value)
    try:
        return "".join(_PAYLOAD_ENCODER(value, 0))
    except RecursionError as exc:
        raise ValueError("nested too deeply, or circular") from exc


def new_message_ids(count: int) -> list[uuid.UUID]:
    """``count`` new message ids: UUIDv7 (RFC 9562), the millisecond clock first and 74
    random bits, so that new rows go to the end of the ``message_id`` index rather than
    to a random page of it (which, on a large table, is a page read per row)."""
    stamp = (time.time_ns() // 1_000_000) << 80 | 0x7 << 76 | 0b10 << 62
    noise = os.urandom(10 * count)
    ids = []
    for n in range(0, 10 * count, 10):
        bits = int.from_bytes(noise[n : n + 10], "big")
        # 12 random bits after the version, 62 after the variant
        ids.append(uuid.UUID(int=stamp | (bits >> 62 & 0xFFF) << 64 | bits & (1 << 62) - 1))
    return ids


class Publisher:
    """Validates messages against the limits in ``settings`` and writes them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._buckets_checked = False

    def publish(
        self,
        session: Session | Connection,
        topic: str,
        payload: Any,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> uuid.UUID:
        """Add one message to the session's transaction; return its message id."""
        return self.publish_batch(
            session, [Message(topic, payload, key, headers, idempotency_key)]
        )[0]

    def publish_batch(
        self, session: Session | Connection, messages: Sequence[Message]
    ) -> list[uuid.UUID]:
        """Add messages, all or none, to the session's transaction; return their ids in order.

        Raises a :class:`PublishError` subclass whose ``index`` is the message at fault;
        the caller then rolls back (the API does), so nothing of the batch is kept.
        """
        rows = self.prepare(messages)
        if not rows:
            return []
        if not self._buckets_checked:
            # Rows spread by another bucket count than the relay's would strand or reorder.
            leases.check_rows(session, leases.RELAY_SCOPE, self.settings.buckets, _BUCKETS)
            self._buckets_checked = True
        if self._insert(session, rows) == len(rows):
            return [r.message_id for r in rows]
        return self._resolve_missing(session, rows)

    def prepare(self, messages: Sequence[Message]) -> list[PreparedRow]:
        """The rows ``messages`` become, each with a new message id and its bucket; raises
        a :class:`PublishError` naming the first message at fault and its field."""
        ids = new_message_ids(len(messages))
        return [self._row(i, m, ids[i]) for i, m in enumerate(messages)]

    def _insert(self, session: Session | Connection, rows: list[PreparedRow]) -> int:
        """Write ``rows``; return how many went in (see :meth:`_resolve_missing`)."""
        if len(rows) == 1:
            r = rows[0]
            params = {
                "message_id": r.text_id,
                "topic": r.topic,
                "key": r.key,
                "payload": r.payload,
                "headers": "{}" if r.headers is None else r.headers,
                "idempotency_key": r.idempotency_key,
                "request_hash": r.request_hash,
                "bucket": r.bucket,
            }
            statement = (
                queries.INSERT_MESSAGE if r.idempotency_key is None else queries.INSERT_MESSAGE_ONCE
            )
            written = execute(
                session, statement, params, prepare=self.settings.db_prepare_statements
            )
            return len(written.all())
        once = any(r.idempotency_key is not None for r in rows)
        topics = sorted({r.topic for r in rows})
        if not once and len(rows) >= COPY_MIN_ROWS:
            states = session.execute(queries.TOPIC_STATES, {"names": topics}).all()
            if len(states) == len(topics) and all(active for _, active in states):
                return copy_rows(session, rows)
            # The INSERT below writes nothing, and the caller finds out why.
        statement = queries.INSERT_MESSAGES_ONCE if once else queries.INSERT_MESSAGES
        result = session.execute(statement, {"rows": document(rows), "topics": topics})
        return int(result.rowcount)  # type: ignore[attr-defined]

    def _resolve_missing(
        self, session: Session | Connection, rows: list[PreparedRow]
    ) -> list[uuid.UUID]:
        """The ids of ``rows`` once some were not written: a repeat's first id, or the
        error of the first row at fault."""
        written = self._written(session, rows)
        missing = [(i, r) for i, r in enumerate(rows) if r.message_id not in written]
        states = dict(
            session.execute(
                queries.TOPIC_STATES, {"names": sorted({r.topic for _, r in missing})}
            ).all()
        )
        unknown = {r.topic for _, r in missing if r.topic not in states}
        if unknown and self.settings.auto_register_topics:
            check_topic_names(session, unknown, field="topic")
            session.execute(queries.REGISTER_TOPICS, {"names": sorted(unknown)})
            states.update(dict.fromkeys(unknown, True))
            # A batch with an unknown topic inserted nothing: what is left goes in now,
            # unless another of its topics is inactive (raised below).
            if all(states[r.topic] for _, r in missing):
                self._insert(session, [r for _, r in missing])
                written = self._written(session, [r for _, r in missing])
                missing = [(i, r) for i, r in missing if r.message_id not in written]
        for i, r in missing:
            if r.topic not in states:
                raise UnknownTopic(f"topic {r.topic!r} is not registered", field="topic", index=i)
            if not states[r.topic]:
                raise InactiveTopic(f"topic {r.topic!r} is inactive", field="topic", index=i)
        # What is left was refused for its idempotency key: a repeat, or a conflict.
        keys = sorted({r.idempotency_key for _, r in missing if r.idempotency_key})
        existing = {
            k: (message_id, request_hash)
            for k, message_id, request_hash in session.execute(
                queries.MESSAGES_BY_IDEMPOTENCY_KEY, {"keys": keys}
            )
        }
        ids = [r.message_id for r in rows]
        for i, r in missing:
            if r.idempotency_key not in existing:
                raise PublishError("the message was not written", index=i)
            first_id, first_hash = existing[r.idempotency_key]
            if first_hash != r.request_hash:
                raise IdempotencyConflict(
                    f"idempotency key {r.idempotency_key!r} was used for a different message",
                    field="idempotency_key",
                    index=i,
                )
            ids[i] = first_id
        return ids

    @staticmethod
    def _written(session: Session | Connection, rows: list[PreparedRow]) -> set[uuid.UUID]:
        ids = [r.text_id for r in rows]
        return set(session.execute(queries.MESSAGES_WRITTEN, {"ids": ids}).scalars())

    def _row(self, index: int, message: Message, message_id: uuid.UUID) -> PreparedRow:
        s = self.settings
        topic = message.topic
        if not isinstance(topic, str) or not topic or len(topic) > MAX_TOPIC:
            raise UnknownTopic(
                f"topic must be 1 to {MAX_TOPIC} characters", field="topic", index=index
            )
        try:
            payload = _payload_json(message.payload)
        except (TypeError, ValueError) as exc:
            raise PayloadNotJSON(
                f"payload is not JSON: {exc}", field="payload", index=index
            ) from exc
        size = len(payload) if payload.isascii() else len(payload.encode())
        if size > s.max_payload_bytes:
            raise PayloadTooLarge(
                f"payload is {size} bytes, over the limit of {s.max_payload_bytes}",
                field="payload",
                index=index,
            )
        key = message.key
        if key is not None and len(key.encode()) > s.max_key_bytes:
            raise KeyTooLong(
                f"key is over the limit of {s.max_key_bytes} bytes", field="key", index=index
            )
        idem = message.idempotency_key
        if idem is not None and not 1 <= len(idem) <= MAX_IDEMPOTENCY_KEY:
            raise PublishError(
                f"idempotency key must be 1 to {MAX_IDEMPOTENCY_KEY} characters",
                field="idempotency_key",
                index=index,
            )
        caller_headers = self._caller_headers(index, message.headers)
        headers_json = None
        if caller_headers or idem is not None:
            headers = dict(caller_headers)
            if idem is not None:
                headers[HEADER_IDEMPOTENCY_KEY] = idem
            headers_json = _compact(headers)
        # What makes a repeat "the same message": everything the caller chose. Only a
        # message with an idempotency key can be repeated.
        request_hash = (
            None
            if idem is None
            else hashlib.sha256(
                "\0".join((_compact([topic, key]), payload, _compact(caller_headers))).encode()
            ).hexdigest()
        )
        return PreparedRow(
            message_id,
            topic,
            key,
            payload,
            headers_json,
            idem,
            request_hash,
            bucket_for(key, message_id, s.buckets),
            str(message_id),
        )

    def _caller_headers(self, index: int, headers: Mapping[str, str] | None) -> dict[str, str]:
        if not headers:
            return {}
        if not all(isinstance(k, str) and k and isinstance(v, str) for k, v in headers.items()):
            raise InvalidHeaders(
                "headers must map non-empty names to strings", field="headers", index=index
            )
        reserved = sorted(RESERVED_HEADERS & set(headers))
        if reserved:
            raise InvalidHeaders(
                f"header {reserved[0]!r} is set by the outbox itself; the headers it "
                f"reserves are {', '.join(sorted(RESERVED_HEADERS))}",
                field=f"headers.{reserved[0]}",
                index=index,
            )
        traceparent = headers.get(HEADER_TRACEPARENT)
        if traceparent is not None and not TRACEPARENT.match(traceparent):
            raise InvalidHeaders(
                "traceparent is not a W3C trace context header",
                field="headers.traceparent",
                index=index,
            )
        size = len(_compact(dict(headers)).encode())
        if size > self.settings.max_headers_bytes:
            raise InvalidHeaders(
                f"headers are {size} bytes, over the limit of {self.settings.max_headers_bytes}",
                field="headers",
                index=index,
            )
        return dict(headers)


@lru_cache(maxsize=1)
def _default_publisher() -> Publisher:
    return Publisher(Settings.from_env())


def publish(
    session: Session | Connection,
    topic: str,
    payload: Any,
    *,
    key: str | None = None,
    headers: Mapping[str, str] | None = None,
    idempotency_key: str | None = None,
) -> uuid.UUID:
    """Add one message to ``session``'s transaction; it is relayed once that commits.

    Limits come from the ``OUTBOX_*`` settings; use :class:`Publisher` to pass others.
    """
    return _default_publisher().publish(
        session, topic, payload, key=key, headers=headers, idempotency_key=idempotency_key
    )


def publish_batch(session: Session | Connection, messages: Sequence[Message]) -> list[uuid.UUID]:
    """Add messages, all or none, to ``session``'s transaction; return their ids in order."""
    return _default_publisher().publish_batch(session, messages)
