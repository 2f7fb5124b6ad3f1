"""The consumer process records each Kafka message once per group, then stores its offset."""

from __future__ import annotations

import base64
import contextlib
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from confluent_kafka import Consumer as KafkaConsumer
from confluent_kafka import Producer, TopicPartition
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from consumer import Consumer
from consumer.loop import Fenced
from consumer.partitions import scope_prefix, stored_offsets
from outbox.db import make_engine, make_sessionmaker, text_array
from outbox.kafka import admin_client, consumer_config, ensure_topics
from outbox.models import Agent, InboxMessage
from outbox.settings import Settings


def _produce(settings: Settings, topic: str, messages: list[tuple[bytes, bytes, dict]]) -> None:
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "enable.idempotence": True})
    for key, value, headers in messages:
        producer.produce(topic, key=key, value=value, headers=list(headers.items()))
    assert producer.flush(10) == 0


def _wait_rows(session: Session, group: str, count: int, timeout_s: float = 30) -> list:
    deadline = time.monotonic() + timeout_s
    rows: list = []
    while time.monotonic() < deadline:
        session.rollback()  # a fresh look each time
        rows = list(
            session.scalars(
                select(InboxMessage)
                .where(InboxMessage.consumer_group == group)
                .order_by(InboxMessage.partition, InboxMessage.offset)
            )
        )
        if len(rows) >= count:
            return rows
        time.sleep(0.1)
    return rows


@contextlib.contextmanager
def _consuming(settings: Settings, engine, topic: str) -> Iterator[tuple[str, Consumer]]:
    """A consumer of a new group reading ``topic`` in a thread while the block runs."""
    group = f"g-{uuid.uuid4().hex[:8]}"
    consumer = Consumer(settings, group, [topic], sessions=make_sessionmaker(engine))
    thread = threading.Thread(target=consumer.run)
    thread.start()
    try:
        yield group, consumer
    finally:
        consumer.stop()
        thread.join(30)
    assert not thread.is_alive()


def _kafka_committed(settings: Settings, group: str, topic: str, partitions: int) -> dict:
    """The group's offsets as Kafka has them, once every partition has one (or 10 s)."""
    probe = KafkaConsumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": group})
    deadline = time.monotonic() + 10
    try:
        while True:
            found = probe.committed([TopicPartition(topic, p) for p in range(partitions)], 10)
            offsets = {tp.partition: tp.offset for tp in found if tp.offset >= 0}
            if len(offsets) == partitions or time.monotonic() > deadline:
                return offsets
            time.sleep(0.2)
    finally:
        probe.close()


def _running(consumer: Consumer, errors: list[BaseException]) -> threading.Thread:
    """The consumer's loop in a thread; what ends it with an error goes to ``errors``."""

    def run() -> None:
        try:
            consumer.run()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_each_message_is_recorded_once_and_offsets_follow_the_commit(
    settings: Settings, engine, session: Session, topic: str
):
    # Given a topic with one partition, so Kafka order is the order produced
    ensure_topics(admin_client(settings), [topic], 1)
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    _produce(
        settings,
        topic,
        [
            (b"k1", b'{"n": 1}', {"message_id": first}),
            (b"k1", b'{"n": 1}', {"message_id": first}),  # redelivered by an upstream retry
            (b"k2", b'{"n": 2}', {"message_id": second, "idempotency_key": "order-2"}),
            (b"k3", b"not json", {}),
            # a retry aimed at another group: skipped, its offset still stored
            (b"k4", b'{"n": 4}', {"message_id": str(uuid.uuid4()), "target_group": "other"}),
        ],
    )
    # When the consumer runs until it has seen all five
    with _consuming(settings, engine, topic) as (group, consumer):
        rows = _wait_rows(session, group, 3)
        deadline = time.monotonic() + 10
        while consumer.received < 5 and time.monotonic() < deadline:
            time.sleep(0.05)

    # Then the duplicate is absorbed, the foreign message is dead on arrival, order is kept
    rows = _wait_rows(session, group, 3)
    assert [(r.key, r.offset, r.status) for r in rows] == [
        ("k1", 0, "received"),
        ("k2", 2, "received"),
        ("k3", 3, "dead"),
    ]
    assert str(rows[0].message_id) == first and rows[0].payload == {"n": 1}
    assert rows[1].idempotency_key == "order-2"
    assert "not JSON" in (rows[2].last_error or "")
    # And the group's stored offset is past the last message, so nothing is re-read, and
    # Kafka has it too (for tools that read a group's lag there)
    assert stored_offsets(session, group, topic) == {0: 5}
    assert _kafka_committed(settings, group, topic, 1) == {0: 5}
    # And the consumer registered itself as an agent, and left when it stopped
    agent = session.scalars(select(Agent).where(Agent.role == "consumer")).one()
    assert agent.consumer_group == group and not agent.active


def test_kafka_has_the_stored_offsets_soon_after_each_burst_while_the_consumer_runs(
    settings: Settings, engine, session: Session, topic: str
):
    ensure_topics(admin_client(settings), [topic], 2)
    with _consuming(settings, engine, topic) as (group, consumer):
        for burst in (1, 2):
            _produce(
                settings,
                topic,
                [(f"k{n}".encode(), b"{}", {"message_id": str(uuid.uuid4())}) for n in range(100)],
            )
            assert len(_wait_rows(session, group, 100 * burst)) == 100 * burst
            session.rollback()
            stored = stored_offsets(session, group, topic)
            assert sum(stored.values()) == 100 * burst
            # The consumer runs on, idle: Kafka's offsets (what lag tools read) catch up
            deadline = time.monotonic() + 5
            while _kafka_committed(settings, group, topic, 2) != stored:
                assert time.monotonic() < deadline, "Kafka's offsets lag the inbox's"
                time.sleep(0.1)
            assert not consumer.stopping.is_set()


def test_a_second_consumer_of_the_same_group_records_nothing_twice(
    settings: Settings, engine, session: Session, topic: str
):
    ensure_topics(admin_client(settings), [topic], 2)
    ids = [str(uuid.uuid4()) for _ in range(20)]
    _produce(
        settings,
        topic,
        [(f"k{i % 4}".encode(), b"{}", {"message_id": m}) for i, m in enumerate(ids)],
    )
    group = f"g-{uuid.uuid4().hex[:8]}"
    sessions = make_sessionmaker(engine)
    # Given a first member that recorded all 20
    first = Consumer(settings, group, [topic], sessions=sessions)
    first_thread = threading.Thread(target=first.run)
    first_thread.start()
    _wait_rows(session, group, 20)
    first.stop()
    first_thread.join(30)
    # When the group's offsets go back to 0, as if upstream sent everything again
    replay = Consumer(settings, group, [topic], sessions=sessions)
    session.execute(text("UPDATE inbox_offsets SET next_offset = 0"))
    session.commit()
    # Then a second member reads all 20 again and the inbox still holds each once
    thread = threading.Thread(target=replay.run)
    thread.start()
    deadline = time.monotonic() + 30
    while replay.received < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    replay.stop()
    thread.join(30)
    assert replay.received == 20
    rows = _wait_rows(session, group, 20)
    assert sorted(str(r.message_id) for r in rows) == sorted(ids)


POISON = [
    ("not JSON", b"k", b"not json", {}, "not JSON"),
    ("NaN", b"k", b'{"x": NaN}', {}, "NaN"),
    ("Infinity", b"k", b'{"x": Infinity}', {}, "Infinity"),
    ("a number past float", b"k", b'{"x": 1e999}', {}, "too large"),
    ("a NUL in the payload", b"k", b'{"x": "a\\u0000b"}', {}, "NUL"),
    ("a lone surrogate", b"k", b'{"x": "\\ud800"}', {}, "surrogate"),
    ("nested too deep", b"k", b"[" * 5000 + b"]" * 5000, {}, "deeper"),
    ("a key that is not UTF-8", b"\xff\xfe", b"{}", {}, "the key is not UTF-8"),
    ("a NUL in the key", b"a\x00b", b"{}", {}, "the key holds a NUL"),
    ("a header that is not UTF-8", b"k", b"{}", {"h": b"\xc3\x28"}, "not UTF-8"),
    ("a NUL in a header", b"k", b"{}", {"h": b"x\x00y"}, "NUL"),
    ("an overlong idempotency key", b"k", b"{}", {"idempotency_key": b"i" * 300}, "over 255"),
]


def test_a_record_is_stored_as_its_json_says_whatever_its_escapes_and_spacing(
    settings: Settings, engine, session: Session, topic: str
):
    # Given records whose JSON text uses escapes, spacing and values that are not objects
    ensure_topics(admin_client(settings), [topic], 1)
    tricky_key = 'k "1" \\ é'
    _produce(
        settings,
        topic,
        [
            (
                tricky_key.encode(),
                b' {"s": "caf\\u00e9 \\"q\\" \\\\u0000", "n": 1.5e3, "z": [] } ',
                {"message_id": str(uuid.uuid4()), "idempotency_key": 'i "1" \\'},
            ),
            (b"k2", b'[1, {"a": null}]', {"note": 'say "hi" \\ ünï'}),
            (b"k3", b'"just text"', {}),
        ],
    )
    # When the consumer reads them
    with _consuming(settings, engine, topic) as (group, _):
        rows = _wait_rows(session, group, 3)

    # Then each is received with the payload, key and headers it was sent with
    assert [r.status for r in rows] == ["received"] * 3
    assert rows[0].payload == {"s": 'café "q" \\u0000', "n": 1500.0, "z": []}
    assert rows[0].key == tricky_key and rows[0].idempotency_key == 'i "1" \\'
    assert rows[1].payload == {"value": [1, {"a": None}]}
    assert rows[1].headers == {"note": 'say "hi" \\ ünï'}
    assert rows[2].payload == {"value": "just text"}


def test_strings_pass_to_postgresql_arrays_as_they_are(session: Session):
    values = ['a"b', "c\\d", "", "NULL", "{x,y}", " é "]
    stored = session.scalar(text("SELECT CAST(:a AS text[])"), {"a": text_array(values)})
    assert stored == values


def test_records_the_inbox_cannot_store_are_dead_with_their_bytes_and_the_partition_flows(
    settings: Settings, engine, session: Session, topic: str
):
    # Given one partition where each unstorable record sits between two good ones
    ensure_topics(admin_client(settings), [topic], 1)
    records = []
    for n, (_, key, value, headers, _) in enumerate(POISON):
        records.append((f"good-{n}".encode(), b'{"good": %d}' % n, {}))
        records.append((key, value, headers))
    records.append((b"good-last", b'{"good": "last"}', {}))
    _produce(settings, topic, records)
    # When the consumer reads them
    with _consuming(settings, engine, topic) as (group, _):
        rows = _wait_rows(session, group, len(records))

    # Then it is still running to the end, every good record is received in order, and
    # each bad one is a dead row that says what is wrong and keeps the record's bytes
    assert [r.offset for r in rows] == list(range(len(records)))
    good = [r for r in rows if r.status == "received"]
    assert [r.payload["good"] for r in good] == [*range(len(POISON)), "last"]
    dead = [r for r in rows if r.status == "dead"]
    assert len(dead) == len(POISON)
    for row, (what, key, value, headers, error) in zip(dead, POISON, strict=True):
        assert error in (row.last_error or ""), what
        raw = row.payload["raw"]
        assert base64.b64decode(raw["value_base64"]) == value, what
        assert base64.b64decode(raw["key_base64"]) == key, what
        assert [base64.b64decode(v) for _, v in raw["headers_base64"]] == list(headers.values())
    assert stored_offsets(session, group, topic) == {0: len(records)}


def test_consumers_joining_and_leaving_under_steady_traffic_neither_exit_nor_lose_anything(
    settings: Settings, engine, session: Session, topic: str
):
    ensure_topics(admin_client(settings), [topic], 4)
    group = f"g-{uuid.uuid4().hex[:8]}"
    sessions = make_sessionmaker(engine)
    ids = [str(uuid.uuid4()) for _ in range(3000)]
    errors: list[BaseException] = []

    def produce_steadily() -> None:
        producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "linger.ms": 5})
        for n, message_id in enumerate(ids):
            producer.produce(
                topic, key=f"k{n % 50}".encode(), value=b"{}", headers=[("message_id", message_id)]
            )
            if n % 100 == 99:
                producer.flush(10)
                time.sleep(0.05)
        assert producer.flush(10) == 0

    def member() -> tuple[Consumer, threading.Thread]:
        consumer = Consumer(settings, group, [topic], sessions=sessions)
        return consumer, _running(consumer, errors)

    # Given steady traffic into a group whose members come and go throughout
    producer = threading.Thread(target=produce_steadily)
    producer.start()
    members = [member()]
    for step in range(8):
        time.sleep(1.0)
        if step % 3 == 2 and len(members) > 1:
            leaving, thread = members.pop(0)
            leaving.stop()
            thread.join(30)
        else:
            members.append(member())
    producer.join(60)
    try:
        rows = _wait_rows(session, group, len(ids), timeout_s=60)
        # Then every member still running is alive (none ended on an error) ...
        assert not errors
        assert all(thread.is_alive() for _, thread in members)
    finally:
        for consumer, thread in members:
            consumer.stop()
            thread.join(30)
    # ... and the inbox holds every message once
    assert sorted(str(r.message_id) for r in rows) == sorted(ids)


def test_a_consumer_stalled_past_its_partition_lease_stores_nothing_once_another_reads_it(
    settings: Settings, engine, session: Session, topic: str
):
    ensure_topics(admin_client(settings), [topic], 1)
    message_id = str(uuid.uuid4())
    _produce(settings, topic, [(b"k", b"{}", {"message_id": message_id})])
    group = f"g-{uuid.uuid4().hex[:8]}"
    sessions = make_sessionmaker(engine)
    stalled = Consumer(settings, group, [topic], sessions=sessions)
    kafka = KafkaConsumer(consumer_config(settings, group))
    errors: list[BaseException] = []
    other = Consumer(settings, group, [topic], sessions=sessions)
    thread: threading.Thread | None = None
    try:
        # Given a consumer that holds the partition and polled its record
        stalled._refresh(kafka, force=True)
        assert set(stalled.partitions.held) == {(topic, 0)}
        deadline = time.monotonic() + 30
        polled = []
        while not polled and time.monotonic() < deadline:
            polled = [m for m in kafka.consume(1, 0.5) if m.error() is None]
        # When it stalls past its lease, another consumer takes the partition over and
        # records the message ...
        session.execute(
            text("UPDATE leases SET expires_at = now() - interval '1 s' WHERE scope = :scope"),
            {"scope": scope_prefix(group) + topic},
        )
        session.commit()
        thread = _running(other, errors)
        rows = _wait_rows(session, group, 1)
        assert stored_offsets(session, group, topic) == {0: 1}
        # ... and the stalled one wakes up and stores what it polled
        stalled._ingest(kafka, polled)
        with pytest.raises(Fenced):
            stalled._store([], {(topic, 0): 99})
    finally:
        kafka.close()
        other.stop()
        if thread is not None:
            thread.join(30)
    # Then it stored nothing, gave the partition up, and went on; the new holder's
    # offset stands
    assert stalled.received == 0 and stalled.partitions.held == {}
    assert not errors
    assert [str(r.message_id) for r in rows] == [message_id]
    session.rollback()
    assert stored_offsets(session, group, topic) == {0: 1}


def test_a_consumer_rides_out_its_database_connections_being_cut_and_loses_nothing(
    settings: Settings, engine, session: Session, topic: str
):
    ensure_topics(admin_client(settings), [topic], 2)
    ids = [str(uuid.uuid4()) for _ in range(2000)]
    group = f"g-{uuid.uuid4().hex[:8]}"
    own = make_engine(settings, pool_size=2, connect_args={"application_name": "cut-me"})
    consumer = Consumer(settings, group, [topic], sessions=make_sessionmaker(own))
    errors: list[BaseException] = []
    thread = _running(consumer, errors)
    stop_cutting = threading.Event()

    def cut() -> None:
        # As a PostgreSQL restart or a failover would: every connection of the consumer's
        # ends, over and over, while it records.
        while not stop_cutting.wait(0.05):
            with engine.connect() as conn:
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE application_name = 'cut-me'"
                    )
                )
                conn.commit()

    cutter = threading.Thread(target=cut)
    try:
        assert consumer.ready.wait(30)
        cutter.start()
        for start in range(0, len(ids), 200):
            _produce(
                settings,
                topic,
                [
                    (f"k{n % 20}".encode(), b"{}", {"message_id": m})
                    for n, m in enumerate(ids[start : start + 200])
                ],
            )
        time.sleep(3.0)
        stop_cutting.set()
        cutter.join(10)
        rows = _wait_rows(session, group, len(ids), timeout_s=60)
        assert not errors and thread.is_alive()
    finally:
        stop_cutting.set()
        consumer.stop()
        thread.join(30)
        own.dispose()
    assert sorted(str(r.message_id) for r in rows) == sorted(ids)
