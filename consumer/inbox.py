"""Recording received Kafka messages in ``inbox_messages``, once per group."""

from __future__ import annotations

import base64
import json
import math
import re
from json.encoder import encode_basestring
from typing import Any

from confluent_kafka import Message
from sqlalchemy.orm import Session

from consumer.acks import register_ack_topic, success_ack, write_acks
from outbox import queries
from outbox.db import execute, text_array
from outbox.publishing import Publisher
from outbox.storable import MAX_JSON_DEPTH
from outbox.wire import (
    HEADER_IDEMPOTENCY_KEY,
    HEADER_MESSAGE_ID,
    HEADER_TARGET_INSTANCE,
    bucket_for,
    canonical_message_id,
    foreign_message_id,
)

MAX_IDEMPOTENCY_KEY = 255


class Unstorable(ValueError):
    """A Kafka record that the inbox cannot hold as it is (its message is kept raw)."""


def inbox_row(group: str, msg: Message, lanes: int) -> dict[str, Any]:
    """The inbox row for one Kafka message.

    A record that cannot be stored as it is (a value that is not JSON or is JSON that
    PostgreSQL refuses, a key or header that is not UTF-8 text or holds a NUL) is dead
    on arrival: its row keeps the raw bytes, base64-encoded, and says what is wrong, so
    that its partition keeps flowing."""
    if msg.topic() is None or msg.partition() is None or msg.offset() is None:
        raise ValueError("an error event is not a message")
    try:
        headers: dict[str, str] = {}
        for name, value in _header_pairs(msg):
            text = _strict_text(value, "header", name)
            if text is not None:
                headers[_strict_text(name, "a header name") or ""] = text
        idempotency_key = headers.get(HEADER_IDEMPOTENCY_KEY)
        if idempotency_key is not None and len(idempotency_key) > MAX_IDEMPOTENCY_KEY:
            raise Unstorable(f"idempotency_key header is over {MAX_IDEMPOTENCY_KEY} characters")
        key = _strict_text(msg.key(), "the key")
        payload, payload_json = _payload(msg.value())
    except Unstorable as exc:
        return poison_row(group, msg, lanes, str(exc))
    row = _row(group, msg, lanes, key, headers, idempotency_key, payload)
    row["payload_json"] = payload_json
    return row


def poison_row(group: str, msg: Message, lanes: int, error: str) -> dict[str, Any]:
    """A dead inbox row for a record that cannot be stored as it is, keeping its raw bytes."""
    try:
        pairs = _header_pairs(msg)
    except Unstorable:
        pairs = []
    headers = {_readable(name): _readable(value) for name, value in pairs}
    raw_key = msg.key()
    raw = {
        "value_base64": _b64(msg.value()),
        "key_base64": _b64(raw_key),
        "headers_base64": [[_b64(n), _b64(v)] for n, v in pairs],
    }
    key = None if raw_key is None else _readable(raw_key)
    # A raw record is never matched by its idempotency key: it cannot be trusted.
    row = _row(group, msg, lanes, key, headers, None, {"raw": raw})
    row.update(status="dead", last_error=f"record cannot be stored: {error}")
    return row


def _row(
    group: str,
    msg: Message,
    lanes: int,
    key: str | None,
    headers: dict[str, str],
    idempotency_key: str | None,
    payload: dict[str, Any],
) -> dict[str, Any]:
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    assert topic is not None and partition is not None and offset is not None
    message_id = _message_id(headers.get(HEADER_MESSAGE_ID), topic, partition, offset)
    return {
        "consumer_group": group,
        "message_id": message_id,
        "idempotency_key": idempotency_key,
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "key": key,
        "lane": bucket_for(key, message_id, lanes),
        "headers": headers,
        "payload": payload,
    }


def _message_id(header: str | None, topic: str, partition: int, offset: int) -> str:
    """The row's message id, in canonical form: the ``message_id`` header's UUID, or for a
    record without a valid one, an id derived from its position."""
    if header is not None:
        try:
            return canonical_message_id(header)
        except ValueError:
            pass
    return str(foreign_message_id(topic, partition, offset))


def _header_pairs(msg: Message) -> list[tuple[str | bytes, str | bytes | None]]:
    try:
        raw = msg.headers() or []
    except (UnicodeDecodeError, ValueError) as exc:
        raise Unstorable(f"headers are not readable: {exc}") from exc
    return list(raw.items() if isinstance(raw, dict) else raw)


def _strict_text(
    value: str | bytes | None, what: str, name: str | bytes | None = None
) -> str | None:
    """UTF-8 text without NUL (PostgreSQL's text and JSON take no NUL), or Unstorable
    saying what was wrong with ``what`` (and ``name``: a header's)."""
    if value is None:
        return None
    try:
        if isinstance(value, bytes):
            text = value.decode()
        else:
            text = value
            text.encode()  # a lone surrogate
    except UnicodeError as exc:
        raise Unstorable(f"{_what(what, name)} is not UTF-8 text: {exc}") from exc
    if "\x00" in text:
        raise Unstorable(f"{_what(what, name)} holds a NUL character")
    return text


def _what(what: str, name: str | bytes | None) -> str:
    return what if name is None else f"{what} {name!r}"


def _readable(value: str | bytes | None) -> str:
    """Text for an operator to read: invalid bytes replaced, NUL shown as U+FFFD."""
    if value is None:
        return ""
    if isinstance(value, str):
        value = value.encode(errors="replace")
    return value.decode(errors="replace").replace("\x00", "\ufffd")


def _b64(value: str | bytes | None) -> str | None:
    if value is None:
        return None
    data = value.encode(errors="surrogateescape") if isinstance(value, str) else value
    return base64.b64encode(data).decode()


def _payload(value: bytes | None) -> tuple[dict[str, Any], str]:
    """The record's value as the inbox stores it: JSON that PostgreSQL takes, an object
    (any other JSON value is wrapped as ``{"value": ...}``); and the same as JSON text (the
    record's own text once it passed the checks, so that it is not encoded again)."""
    try:
        text = (value or b"null").decode()
    except UnicodeDecodeError as exc:
        raise Unstorable(f"payload is not JSON: not UTF-8: {exc}") from exc
    try:
        payload = _DECODER.decode(text)
    except RecursionError as exc:
        raise Unstorable(f"payload nests deeper than {MAX_JSON_DEPTH} levels") from exc
    except ValueError as exc:
        raise Unstorable(f"payload is not JSON: {exc}") from exc
    # Nesting deeper takes more opening brackets than that (counted in strings too).
    deep = text.count("[") + text.count("{") > MAX_JSON_DEPTH
    if deep and _depth_over(payload, MAX_JSON_DEPTH):
        raise Unstorable(f"payload nests deeper than {MAX_JSON_DEPTH} levels")
    # Decoded UTF-8 holds neither NUL (the decoder refuses control characters in strings)
    # nor a lone surrogate: only a \u escape can put one in.
    if "\\u" in text:
        if _NUL_ESCAPE.search(text):
            raise Unstorable(
                "payload holds a NUL character (\\u0000), which PostgreSQL's JSON refuses"
            )
        try:
            json.dumps(payload, ensure_ascii=False).encode()
        except UnicodeEncodeError as exc:
            raise Unstorable(f"payload holds a lone surrogate: {exc}") from exc
    if isinstance(payload, dict):
        return payload, text
    return {"value": payload}, '{"value":' + text + "}"


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number PostgreSQL takes")


def _finite(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        raise ValueError(f"{text} is too large a number for PostgreSQL's JSON")
    return number


# A \u0000 escape (NUL): after an even number of backslashes; after an odd number, its
# backslash is itself escaped and the text is plain.
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
# Made once: ``json.loads`` with hooks builds a decoder on every call.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite)


def _depth_over(value: Any, limit: int) -> bool:
    """Whether ``value`` nests more than ``limit`` arrays and objects deep."""
    level = [value]
    for _ in range(limit + 1):
        level = [
            child
            for item in level
            if isinstance(item, (dict, list))
            for child in (item.values() if isinstance(item, dict) else item)
        ]
        if not level:
            return False
    return any(isinstance(item, (dict, list)) for item in level)


def record(session: Session, rows: list[dict[str, Any]], *, prepare: bool = True) -> list[int]:
    """Insert rows, skipping any this group already holds (by message id or idempotency key).

    Returns the lane of each new row. The caller commits; only then may offsets be stored.
    ``prepare``: see :func:`outbox.db.execute`.
    """
    if not rows:
        return []
    rows = _not_remembered(session, rows)
    if not rows:
        return []
    result = execute(session, queries.INSERT_INBOX, {"rows": _document(rows)}, prepare=prepare)
    return list(result.scalars())


_compact = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_OPTIONAL = ("key", "idempotency_key", "status", "last_error")


def _document(rows: list[dict[str, Any]]) -> str:
    """The rows as one JSON array for :data:`outbox.queries.INSERT_INBOX`, in order; a
    payload that is JSON text already goes in as it is, and null fields are left out."""
    return "[" + ",".join(_entry(n, r) for n, r in enumerate(rows)) + "]"


def _entry(n: int, r: dict[str, Any]) -> str:
    payload = r.get("payload_json") or _compact(r["payload"])
    optional = ""
    for name in _OPTIONAL:
        if (value := r.get(name)) is not None:
            optional += f',"{name}":{encode_basestring(value)}'
    # Header names and values are text: each encoded as a JSON string, as _compact
    # would write the object (which costs a new encoder per call).
    headers = ",".join(
        [f"{encode_basestring(k)}:{encode_basestring(v)}" for k, v in r["headers"].items()]
    )
    return (
        f'{{"n":{n},"consumer_group":{encode_basestring(r["consumer_group"])},'
        f'"message_id":"{r["message_id"]}","topic":{encode_basestring(r["topic"])},'
        f'"partition":{int(r["partition"])},"offset":{int(r["offset"])},"lane":{int(r["lane"])},'
        f'"payload":{payload},"headers":{{{headers}}}{optional}}}'
    )


def _not_remembered(session: Session, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows whose message the group did not process before its inbox row was cleaned
    up (it remembers those in ``inbox_dedup`` for the dedup window)."""
    by_group: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_group.setdefault(row["consumer_group"], []).append(row)
    seen_ids: set[tuple[str, str]] = set()
    seen_keys: set[tuple[str, str]] = set()
    for group, group_rows in by_group.items():
        for message_id, idempotency_key in session.execute(
            queries.DEDUP_SEEN,
            {
                "group": group,
                "ids": text_array(str(r["message_id"]) for r in group_rows),
                "keys": text_array(
                    r["idempotency_key"] for r in group_rows if r["idempotency_key"]
                ),
            },
        ):
            seen_ids.add((group, str(message_id)))
            if idempotency_key is not None:
                seen_keys.add((group, idempotency_key))
    if not seen_ids:
        return rows
    return [
        r
        for r in rows
        if (r["consumer_group"], str(r["message_id"])) not in seen_ids
        and (r["consumer_group"], r["idempotency_key"]) not in seen_keys
    ]


def absorb_retries(
    session: Session,
    group: str,
    retries: list[dict[str, Any]],
    publisher: Publisher,
    healthy_workers: set[str],
) -> dict[int, str | None]:
    """Settle targeted retries of messages this group holds, in the caller's transaction.

    A message processed already gets its success ack again and does not run again; one
    that failed (or went dead) runs again now with a fresh attempt budget. Returns the
    lanes to kick, each with the worker to run it when the retry names a healthy one.
    """
    if not retries:
        return {}
    ids = [str(r["message_id"]) for r in retries]
    target = {str(r["message_id"]): r["headers"].get(HEADER_TARGET_INSTANCE) for r in retries}
    acks = [
        success_ack(message_id, topic, group, worker or "unknown", attempts)
        for message_id, topic, worker, attempts in session.execute(
            queries.INBOX_DONE_OF, {"group": group, "ids": ids}
        )
    ] + [
        # processed, and its row cleaned up since: it is remembered for the dedup window
        success_ack(message_id, topic, group, "unknown", 1)
        for message_id, topic in session.execute(
            queries.DEDUP_DONE_OF, {"group": group, "ids": ids}
        )
    ]
    if acks:
        register_ack_topic(session)
        # Success acks, which no other ack of the message changes: their order is free.
        write_acks(session, publisher, [(group, ack) for ack in acks])
    lanes: dict[int, str | None] = {}
    again = session.execute(queries.INBOX_RETRY_AGAIN, {"group": group, "ids": ids}).all()
    waiting = session.execute(queries.INBOX_LANES_OF, {"group": group, "ids": ids}).all()
    for message_id, lane in [*again, *waiting]:
        wanted = target.get(str(message_id))
        lanes[lane] = wanted if wanted in healthy_workers else lanes.get(lane)
    return lanes
