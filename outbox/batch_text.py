"""A batch of validated rows as PostgreSQL reads it: one JSON document for the
INSERT (``queries.INSERT_MESSAGES``), or COPY's text format (``queries.COPY_MESSAGES``)."""

from __future__ import annotations

import contextlib
import io
import uuid
from json.encoder import encode_basestring
from typing import NamedTuple

from psycopg2.extensions import encodings
from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from outbox import queries


class PreparedRow(NamedTuple):
    """A validated message as its outbox row will hold it (payload and headers as JSON)."""

    message_id: uuid.UUID
    topic: str
    key: str | None
    payload: str
    # What the row stores: the caller's headers and the idempotency key, or None for none
    # (the message id and correlation id come from the row's id: wire.message_headers)
    headers: str | None
    idempotency_key: str | None
    request_hash: str | None
    bucket: int
    text_id: str  # message_id as text, as the headers and the batch document hold it


def document(rows: list[PreparedRow]) -> str:
    """The batch as one JSON array; payload and headers are already JSON, so they go in
    as they are rather than encoded a second time. Fields that are null are left out (the
    server reads a missing field as null), which spares it parsing them."""
    topics = {topic: encode_basestring(topic) for topic in {r.topic for r in rows}}
    return "[" + ",".join(_entry(n, r, topics[r.topic]) for n, r in enumerate(rows)) + "]"


def _entry(n: int, r: PreparedRow, topic: str) -> str:
    key = "" if r.key is None else f',"key":{encode_basestring(r.key)}'
    headers = "" if r.headers is None else f',"headers":{r.headers}'
    once = (
        ""
        if r.idempotency_key is None
        else f',"idempotency_key":{encode_basestring(r.idempotency_key)},'
        f'"request_hash":"{r.request_hash}"'
    )
    return (
        f'{{"n":{n},"message_id":"{r.text_id}","topic":{topic}{key},"payload":{r.payload}'
        f'{headers},"bucket":{r.bucket}{once}}}'
    )


# What COPY's text format reads as an escape: each is written escaped.
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_COPY_NULL = "\\N"


def _copy_field(value: str) -> str:
    """``value`` as a field of COPY's text format."""
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
        return value.translate(_COPY_ESCAPES)
    return value


def _copy_data(rows: list[PreparedRow]) -> str:
    """The batch in COPY's text format, a line a row, in the columns of
    :data:`outbox.queries.COPY_MESSAGES`."""
    topics = {topic: _copy_field(topic) for topic in {r.topic for r in rows}}
    return "".join(_copy_line(r, topics[r.topic]) for r in rows)


def _copy_line(r: PreparedRow, topic: str) -> str:
    key = _COPY_NULL if r.key is None else _copy_field(r.key)
    headers = "{}" if r.headers is None else _copy_field(r.headers)
    return f"{r.text_id}\t{topic}\t{key}\t{_copy_field(r.payload)}\t{headers}\t{r.bucket}\n"


def copy_rows(session: Session | Connection, rows: list[PreparedRow]) -> int:
    """COPY ``rows`` into the outbox on ``session``'s connection, in its transaction;
    returns how many went in (all: COPY writes all or fails)."""
    conn = session.connection() if isinstance(session, Session) else session
    driver = conn.connection.dbapi_connection
    assert driver is not None
    # Encoded before COPY starts: a string the connection cannot carry fails here, with
    # nothing sent, as a parameter would.
    data = _copy_data(rows).encode(encodings[driver.encoding])
    dbapi_error = conn.dialect.loaded_dbapi.Error
    try:
        with contextlib.closing(driver.cursor()) as cursor:
            cursor.copy_expert(queries.COPY_MESSAGES, io.BytesIO(data))
            return int(cursor.rowcount)
    except dbapi_error as exc:
        # As SQLAlchemy does with the statements it runs: a connection that broke leaves
        # the pool, and the error comes as SQLAlchemy's (DataError, OperationalError...).
        invalidated = conn.dialect.is_disconnect(exc, driver, None)
        if invalidated:
            conn.invalidate(exc)
        raise DBAPIError.instance(
            queries.COPY_MESSAGES,
            None,
            exc,
            dbapi_error,
            hide_parameters=True,
            connection_invalidated=invalidated,
            dialect=conn.dialect,
        ) from exc
