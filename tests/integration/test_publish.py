"""``publish()`` against a real PostgreSQL: one INSERT, or for a large batch one COPY, in
the caller's transaction."""

from __future__ import annotations

import threading
import uuid

import pytest
from sqlalchemy import Connection, event, func, select, text
from sqlalchemy.exc import DataError, OperationalError
from sqlalchemy.orm import Session

from outbox import Message, Publisher
from outbox.db import make_sessionmaker
from outbox.errors import (
    IdempotencyConflict,
    InactiveTopic,
    InvalidHeaders,
    KeyTooLong,
    PayloadNotJSON,
    PayloadTooLarge,
    UnknownTopic,
)
from outbox.message_reads import message_view
from outbox.models import OutboxMessage
from outbox.publishing import COPY_MIN_ROWS
from outbox.registry import register_topic
from outbox.settings import Settings
from outbox.wire import bucket_for


@pytest.fixture
def publisher(settings: Settings) -> Publisher:
    return Publisher(
        settings.replace(max_payload_bytes=1000, max_key_bytes=10, max_headers_bytes=200)
    )


@pytest.fixture
def orders(session: Session) -> str:
    register_topic(session, "orders")
    register_topic(session, "retired", active=False)
    session.commit()
    return "orders"


def _count(session: Session) -> int:
    session.rollback()
    return session.scalar(select(func.count()).select_from(OutboxMessage)) or 0


def test_a_message_is_written_only_when_the_caller_commits(publisher, session, orders):
    message_id = publisher.publish(
        session,
        orders,
        {"total": 5},
        key="order-1",
        headers={"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"},
    )
    session.rollback()
    assert _count(session) == 0

    message_id = publisher.publish(session, orders, {"total": 5}, key="order-1")
    session.commit()
    row = session.scalars(select(OutboxMessage)).one()
    assert row.message_id == message_id
    assert (row.topic, row.key, row.payload, row.status, row.attempts) == (
        "orders",
        "order-1",
        {"total": 5},
        "pending",
        0,
    )
    # The row stores no header of the caller's; its id is also its correlation id.
    assert row.headers == {}
    assert message_view(row)["headers"] == {
        "message_id": str(message_id),
        "correlation_id": str(message_id),
    }
    assert row.bucket == bucket_for("order-1", message_id, publisher.settings.buckets)


def test_caller_headers_are_kept_and_a_correlation_id_is_not_replaced(publisher, session, orders):
    trace = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    message_id = publisher.publish(
        session,
        orders,
        [1, 2],
        headers={"correlation_id": "req-9", "causation_id": "evt-1", "traceparent": trace},
    )
    session.commit()
    row = session.scalars(select(OutboxMessage)).one()
    assert message_view(row)["headers"] == {
        "correlation_id": "req-9",
        "causation_id": "evt-1",
        "traceparent": trace,
        "message_id": str(message_id),
    }


def test_a_batch_keeps_its_order_in_ids(publisher, session, orders):
    ids = publisher.publish_batch(session, [Message(orders, {"n": i}, key="k") for i in range(50)])
    session.commit()
    rows = session.scalars(select(OutboxMessage).order_by(OutboxMessage.id)).all()
    assert [r.message_id for r in rows] == ids
    assert [r.payload["n"] for r in rows] == list(range(50))


# Text that COPY's format and JSON each read specially, in keys, payloads and headers.
AWKWARD = ["tab\there", "new\nline", "cr\rhere", "back\\slash", "\\N", "\\.", "\\", "é☃𝄞", ""]


@pytest.mark.parametrize(
    "size", [COPY_MIN_ROWS - 1, COPY_MIN_ROWS, 300], ids=["insert", "copy", "copy-300"]
)
@pytest.mark.parametrize("caller", ["session", "connection"])
def test_a_batch_is_stored_as_given_whichever_statement_writes_it(
    publisher, session, orders, size, caller
):
    messages = [
        Message(
            orders,
            {"n": i, "text": AWKWARD[i % len(AWKWARD)], AWKWARD[i % len(AWKWARD)]: [i, None]},
            key=None if i % 4 == 3 else AWKWARD[i % len(AWKWARD)],
            headers={"causation_id": AWKWARD[i % len(AWKWARD)]} if i % 2 else None,
        )
        for i in range(size)
    ]

    def target() -> Session | Connection:
        # The session's connection, as a caller on a Connection holds one
        return session if caller == "session" else session.connection()

    statements: list[str] = []
    engine = session.get_bind()

    def seen(conn, cursor, statement, *args):
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", seen)
    try:
        publisher.publish_batch(target(), messages)
        session.rollback()
        assert _count(session) == 0  # nothing of it outlives the caller's rollback
        statements.clear()
        ids = publisher.publish_batch(target(), messages)
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    inserted = any("INSERT INTO outbox_messages" in s for s in statements)
    assert inserted == (size < COPY_MIN_ROWS)
    session.commit()
    rows = session.scalars(select(OutboxMessage).order_by(OutboxMessage.id)).all()
    assert [r.message_id for r in rows] == ids
    assert [(r.topic, r.key, r.payload, r.headers) for r in rows] == [
        (m.topic, m.key, m.payload, dict(m.headers or {})) for m in messages
    ]
    assert [r.bucket for r in rows] == [
        bucket_for(m.key, i, publisher.settings.buckets) for m, i in zip(messages, ids, strict=True)
    ]
    assert {(r.status, r.attempts) for r in rows} == {("pending", 0)}


def test_a_batch_stores_each_message_s_headers_its_own_or_the_caller_s(publisher, session, orders):
    own, given = publisher.publish_batch(
        session,
        [Message(orders, {"n": 1}), Message(orders, {"n": 2}, headers={"causation_id": "e"})],
    )
    session.commit()
    rows = {r.message_id: r for r in session.scalars(select(OutboxMessage))}
    # Each row stores only what its caller gave ...
    assert (rows[own].headers, rows[given].headers) == ({}, {"causation_id": "e"})
    # ... and is read, and sent, with its own id and correlation id besides.
    assert message_view(rows[own])["headers"] == {
        "message_id": str(own),
        "correlation_id": str(own),
    }
    assert message_view(rows[given])["headers"] == {
        "message_id": str(given),
        "correlation_id": str(given),
        "causation_id": "e",
    }


@pytest.mark.parametrize(
    ("message", "error", "field"),
    [
        (Message("nope", {}), UnknownTopic, "topic"),
        (Message("retired", {}), InactiveTopic, "topic"),
        (Message("orders", {"x": float("nan")}), PayloadNotJSON, "payload"),
        (Message("orders", {"x": object()}), PayloadNotJSON, "payload"),
        (Message("orders", {"x": "y" * 1000}), PayloadTooLarge, "payload"),
        (Message("orders", {}, key="k" * 11), KeyTooLong, "key"),
        (Message("orders", {}, headers={"h": "v" * 300}), InvalidHeaders, "headers"),
        *(
            (Message("orders", {}, headers={name: "mine"}), InvalidHeaders, f"headers.{name}")
            for name in ("message_id", "target_group", "target_instance", "retry_attempt")
        ),
        (
            Message("orders", {}, headers={"traceparent": "bogus"}),
            InvalidHeaders,
            "headers.traceparent",
        ),
    ],
)
@pytest.mark.parametrize("before", [2, COPY_MIN_ROWS], ids=["small", "large"])
def test_a_bad_message_in_a_batch_refuses_the_batch(
    publisher, session, orders, message, error, field, before
):
    good = Message(orders, {"ok": True})
    with pytest.raises(error) as info:
        publisher.publish_batch(session, [good] * before + [message])
    assert info.value.index == before
    assert info.value.field == field
    assert _count(session) == 0


def test_an_unknown_topic_is_registered_when_the_setting_allows(settings, session):
    publisher = Publisher(settings.replace(auto_register_topics=True))
    publisher.publish(session, "fresh.topic", {"a": 1})
    session.commit()
    assert _count(session) == 1


def test_a_batch_naming_a_new_topic_is_written_whole_and_in_order_once_it_is_registered(
    settings, session, orders
):
    publisher = Publisher(settings.replace(auto_register_topics=True))
    messages = [
        Message(orders if i % 3 else "fresh.topic", {"n": i}, key="k", idempotency_key=f"i-{i}")
        for i in range(9)
    ]
    ids = publisher.publish_batch(session, messages)
    session.commit()
    rows = session.scalars(select(OutboxMessage).order_by(OutboxMessage.id)).all()
    assert [r.message_id for r in rows] == ids
    assert [r.payload["n"] for r in rows] == list(range(9))
    # ... and a repeat of the whole batch, every key taken, returns the same ids
    assert publisher.publish_batch(session, messages) == ids
    session.commit()
    assert _count(session) == 9


@pytest.mark.parametrize("size", [2, COPY_MIN_ROWS], ids=["insert", "copy"])
@pytest.mark.parametrize("where", ["key", "payload"])
def test_a_nul_is_refused_by_the_database_as_sqlalchemy_s_data_error_either_way(
    publisher, session, orders, size, where
):
    bad = (
        Message(orders, {"x": "a\x00b"}) if where == "payload" else Message(orders, {}, key="a\x00")
    )
    with pytest.raises(DataError):
        publisher.publish_batch(session, [Message(orders, {"ok": True})] * (size - 1) + [bad])
    session.rollback()
    publisher.publish_batch(session, [Message(orders, {"ok": True})] * size)
    session.commit()
    assert _count(session) == size


def test_a_connection_cut_during_a_copy_leaves_the_pool_and_the_session_goes_on(
    publisher, session, orders, admin_engine
):
    engine = session.get_bind()
    cut: list[int] = []

    def cut_after_the_topic_look(conn, cursor, statement, *args):
        # the server ends this connection between the look at the topics and the COPY
        if "FROM topics WHERE name = ANY" in statement and not cut:
            cut.append(cursor.connection.get_backend_pid())
            with admin_engine.connect() as admin:
                admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": cut[0]})

    batch = [Message(orders, {"n": i}, key="k") for i in range(COPY_MIN_ROWS)]
    event.listen(engine, "after_cursor_execute", cut_after_the_topic_look)
    try:
        with pytest.raises(OperationalError) as info:
            publisher.publish_batch(session, batch)
    finally:
        event.remove(engine, "after_cursor_execute", cut_after_the_topic_look)
    assert cut and info.value.connection_invalidated
    session.rollback()
    ids = publisher.publish_batch(session, batch)
    session.commit()
    assert session.scalar(text("SELECT pg_backend_pid()")) != cut[0]
    assert set(session.scalars(select(OutboxMessage.message_id))) == set(ids)


def test_a_large_batch_naming_a_new_topic_is_copied_whole_and_in_order_once_it_is_registered(
    settings, session, orders
):
    publisher = Publisher(settings.replace(auto_register_topics=True))
    size = 2 * COPY_MIN_ROWS
    messages = [Message(orders if i % 3 else "fresh.topic", {"n": i}) for i in range(size)]
    ids = publisher.publish_batch(session, messages)
    session.commit()
    rows = session.scalars(select(OutboxMessage).order_by(OutboxMessage.id)).all()
    assert [r.message_id for r in rows] == ids
    assert [(r.topic, r.payload["n"]) for r in rows] == [
        (m.topic, m.payload["n"]) for m in messages
    ]


@pytest.mark.parametrize("size", ["small", "large"])
def test_a_batch_with_an_inactive_topic_writes_nothing_even_when_new_topics_register(
    settings, session, orders, size
):
    publisher = Publisher(settings.replace(auto_register_topics=True))
    batch = [Message(orders, {}), Message("fresh.topic", {}), Message("retired", {})]
    batch = batch * (1 if size == "small" else COPY_MIN_ROWS)
    with pytest.raises(InactiveTopic) as info:
        publisher.publish_batch(session, batch)
    assert (info.value.index, info.value.field) == (2, "topic")
    assert _count(session) == 0


def test_an_idempotent_repeat_returns_the_first_id_and_writes_nothing(publisher, session, orders):
    first = publisher.publish(session, orders, {"a": 1}, key="k", idempotency_key="pay-1")
    session.commit()
    again = publisher.publish(session, orders, {"a": 1}, key="k", idempotency_key="pay-1")
    session.commit()
    assert again == first
    assert _count(session) == 1
    with pytest.raises(IdempotencyConflict) as info:
        publisher.publish(session, orders, {"a": 2}, key="k", idempotency_key="pay-1")
    assert info.value.field == "idempotency_key"
    assert _count(session) == 1


def test_concurrent_repeats_of_an_idempotency_key_leave_exactly_one_row(
    publisher, engine, session, orders
):
    sessions = make_sessionmaker(engine)
    barrier = threading.Barrier(8)
    results: list[uuid.UUID] = []
    errors: list[BaseException] = []

    def attempt() -> None:
        try:
            with sessions.begin() as own:
                barrier.wait()
                results.append(publisher.publish(own, orders, {"n": 1}, idempotency_key="race"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert len(set(results)) == 1
    assert _count(session) == 1


@pytest.mark.parametrize("prepare", [True, False], ids=["prepared", "plain"])
def test_single_inserts_behave_alike_prepared_or_not(settings, session, orders, prepare):
    publisher = Publisher(settings.replace(db_prepare_statements=prepare))
    first = publisher.publish(session, orders, {"a": 1}, key="k", idempotency_key="once")
    session.rollback()  # a prepared statement outlives the rollback that drops its row
    first = publisher.publish(session, orders, {"a": 1}, key="k", idempotency_key="once")
    plain = publisher.publish(session, orders, {"b": 2}, key="k")
    session.commit()
    assert publisher.publish(session, orders, {"a": 1}, key="k", idempotency_key="once") == first
    with pytest.raises(InactiveTopic):
        publisher.publish(session, "retired", {"c": 3})
    session.rollback()
    assert _count(session) == 2
    ids = set(session.scalars(select(OutboxMessage.message_id)))
    assert ids == {first, plain}
    prepared = set(
        session.scalars(text("SELECT name FROM pg_prepared_statements WHERE name LIKE 'outbox_%'"))
    )
    assert prepared == (
        {"outbox_insert_message", "outbox_insert_message_once"} if prepare else set()
    )
