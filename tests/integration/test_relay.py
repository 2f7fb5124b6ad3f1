"""The relay against real PostgreSQL and a real Kafka-protocol broker."""

from __future__ import annotations

import collections
import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from typing import NamedTuple

import pytest
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import NewTopic
from sqlalchemy import TextClause, event, select, text
from sqlalchemy.orm import Session

from outbox import Message, Publisher, leases, queries
from outbox import producer as producer_module
from outbox import relay as relay_module
from outbox.db import as_tuples, execute, make_engine, make_sessionmaker
from outbox.errors import SettingsError
from outbox.kafka import admin_client
from outbox.models import Lease, OutboxMessage
from outbox.producer import DeliveryReport
from outbox.registry import register_topic
from outbox.relay import Claim, Relay, RelayReport
from outbox.settings import Settings
from tests.kafka_helpers import consume_all
from tests.plans import as_written, pages_read, rows_read


@pytest.fixture
def relay_settings(settings: Settings) -> Settings:
    return settings.replace(relay_batch_size=100, relay_buckets_per_task=8, buckets=16)


def _register(session: Session, topic: str) -> None:
    register_topic(session, topic)
    session.commit()


def test_committed_rows_reach_kafka_once_in_order_per_key_with_their_position(
    relay_settings, engine, session, topic
):
    _register(session, topic)
    publisher = Publisher(relay_settings)
    ids = publisher.publish_batch(
        session,
        [
            Message(topic, {"key": f"k{i % 20}", "seq": i // 20}, key=f"k{i % 20}")
            for i in range(2000)
        ],
    )
    session.commit()

    report = Relay(relay_settings, sessions=make_sessionmaker(engine)).run(budget_s=60)
    assert report.sent == 2000 and report.failed == 0

    rows = {r.message_id: r for r in session.scalars(select(OutboxMessage))}
    assert {r.status for r in rows.values()} == {"sent"}
    assert all(r.sent_at is not None for r in rows.values())
    assert not session.scalars(select(Lease).where(Lease.claim_token.is_not(None))).all()
    received = consume_all(relay_settings.kafka_bootstrap, topic, 2000)
    counts = collections.Counter(m.message_id for m in received)
    assert set(counts) == {str(i) for i in ids}
    assert max(counts.values()) == 1
    by_key: dict[str, list[int]] = collections.defaultdict(list)
    for m in sorted(received, key=lambda m: (m.partition, m.offset)):
        by_key[m.key].append(m.value["seq"])
        row = rows[uuid.UUID(m.message_id)]
        assert (row.kafka_partition, row.kafka_offset) == (m.partition, m.offset)
    assert all(seqs == sorted(seqs) for seqs in by_key.values())
    assert len(by_key) == 20


def test_each_record_carries_its_id_its_correlation_id_and_the_caller_s_headers(
    relay_settings, engine, session, topic
):
    _register(session, topic)
    given = {"correlation_id": "req-9", "causation_id": "evt-1"}
    # rows with and without headers of the caller's, mixed in one claim
    messages = [Message(topic, {"n": n}, headers=given if n % 3 == 1 else None) for n in range(9)]
    ids = Publisher(relay_settings).publish_batch(session, messages)
    session.commit()
    assert Relay(relay_settings, sessions=make_sessionmaker(engine)).run(budget_s=30).sent == 9
    received = {
        m.value["n"]: m.headers for m in consume_all(relay_settings.kafka_bootstrap, topic, 9)
    }
    assert received == {
        n: {"message_id": str(ids[n]), "correlation_id": str(ids[n])}
        | (given if n % 3 == 1 else {})
        for n in range(9)
    }


def test_rows_of_an_open_transaction_are_not_relayed_until_it_commits(
    relay_settings, engine, session, topic
):
    _register(session, topic)
    publisher = Publisher(relay_settings)
    publisher.publish(session, topic, {"n": 1})  # not committed yet
    relay = Relay(relay_settings, sessions=make_sessionmaker(engine))
    assert relay.run(budget_s=5).sent == 0
    session.commit()
    assert relay.run(budget_s=5).sent == 1


def test_a_message_kafka_refuses_backs_off_ends_dead_and_holds_its_key_not_others(
    relay_settings, engine, session, topic
):
    _register(session, topic)
    # Published under a larger limit than this relay's producer accepts.
    Publisher(relay_settings.replace(max_payload_bytes=400_000)).publish_batch(
        session,
        [
            Message(topic, {"blob": "z" * 300_000}, key="k1"),
            Message(topic, {"after": "blob"}, key="k1"),
            Message(topic, {"other": "key"}, key="k2"),
        ],
    )
    session.commit()
    settings = relay_settings.replace(
        max_payload_bytes=1000, relay_max_attempts=2, relay_retry_base_s=0.0
    )
    report = Relay(settings, sessions=make_sessionmaker(engine)).run(budget_s=10)

    # The big row failed twice and is dead; k1's later row was held back (no attempt
    # spent) until then; k2 never waited.
    assert (report.sent, report.failed) == (2, 2)
    assert report.released >= 1
    rows = {str(r.payload)[:12]: r for r in session.scalars(select(OutboxMessage))}
    big = rows["{'blob': 'zz"]
    assert (big.status, big.attempts) == ("dead", 2)
    assert "too large" in (big.last_error or "").lower()
    after = rows["{'after': 'b"]
    assert (after.status, after.attempts) == ("sent", 0)
    received = consume_all(settings.kafka_bootstrap, topic, 2)
    assert sorted((m.key, m.value) for m in received) == [
        ("k1", {"after": "blob"}),
        ("k2", {"other": "key"}),
    ]


def test_a_record_over_its_topics_max_message_bytes_fails_before_later_rows_of_its_key(
    relay_settings, engine, session, topic
):
    """A broker refuses a record over its topic's max.message.bytes in the delivery
    report, after later records of its key went; the embedded broker keeps the setting
    but does not enforce it, so what shows the refusal here is the relay's own."""
    admin = admin_client(relay_settings)
    created = admin.create_topics(
        [
            NewTopic(
                topic, num_partitions=2, replication_factor=1, config={"max.message.bytes": "2000"}
            )
        ]
    )
    created[topic].result()
    _register(session, topic)
    # Given a large and then a small message of one key, and another key, in one batch
    Publisher(relay_settings).publish_batch(
        session,
        [
            Message(topic, {"blob": uuid.uuid4().hex * 100}, key="k1"),
            Message(topic, {"after": "blob"}, key="k1"),
            Message(topic, {"other": "key"}, key="k2"),
        ],
    )
    session.commit()

    # When the relay runs
    report = Relay(relay_settings, sessions=make_sessionmaker(engine)).run(budget_s=5)

    # Then the large one failed with a clear error, the small one of its key waits behind
    # it without spending an attempt, and only the other key reached Kafka
    assert (report.sent, report.failed) == (1, 1)
    rows = {next(iter(r.payload)): r for r in session.scalars(select(OutboxMessage))}
    assert (rows["blob"].status, rows["blob"].attempts) == ("pending", 1)
    assert "max.message.bytes of 2000" in (rows["blob"].last_error or "")
    assert (rows["after"].status, rows["after"].attempts) == ("pending", 0)
    received = consume_all(relay_settings.kafka_bootstrap, topic, 1)
    assert [m.value for m in received] == [{"other": "key"}]


def test_a_topic_the_broker_refuses_to_create_fails_its_rows_and_delays_no_other(
    relay_settings, engine, session, topic, monkeypatch
):
    """The embedded broker creates any topic it is asked for, so the refusal (as Kafka
    gives it for a name it cannot take) is injected where the relay receives the
    creation results; the other topic is created by the broker as usual."""
    bad = f"{topic}.refused"
    create = producer_module.create_topics

    def refusing(admin, topics, partitions):
        created, failed = create(admin, [t for t in topics if t != bad], partitions)
        if bad in topics:
            failed[bad] = KafkaException(KafkaError(KafkaError.TOPIC_EXCEPTION, "no"))
        return created, failed

    monkeypatch.setattr(producer_module, "create_topics", refusing)
    _register(session, bad)
    _register(session, topic)
    Publisher(relay_settings).publish_batch(
        session, [Message(bad, {"n": 1}, key="k1"), Message(topic, {"n": 2}, key="k2")]
    )
    session.commit()
    settings = relay_settings.replace(relay_max_attempts=2, relay_retry_base_s=0.0)
    relay = Relay(settings, sessions=make_sessionmaker(engine))
    first = relay.run(budget_s=5)
    second = relay.run(budget_s=5)
    assert (first.sent + second.sent, first.failed + second.failed) == (1, 2)
    rows = {r.topic: r for r in session.scalars(select(OutboxMessage))}
    assert (rows[topic].status, rows[topic].attempts) == ("sent", 0)
    assert (rows[bad].status, rows[bad].attempts) == ("dead", 2)
    assert "TOPIC_EXCEPTION" in (rows[bad].last_error or "")


def _lease(relay: Relay, held: dict[int, int]) -> dict[int, int]:
    with relay.sessions.begin() as session:
        granted, _ = relay._lease(session, held)
    return granted


def _lease_and_claim(relay: Relay) -> tuple[dict[int, int], Claim]:
    """A relay's first lease and its claim, as a pass takes them."""
    with relay.sessions.begin() as session:
        held, _ = relay._lease(session, {})
        return held, relay._claim(session, list(held))


def test_a_trickle_over_every_bucket_goes_out_in_one_pass_and_a_backlog_is_shared(
    relay_settings, engine, session, topic
):
    _register(session, topic)
    publisher = Publisher(relay_settings)
    sessions = make_sessionmaker(engine)
    relay = Relay(relay_settings, sessions=sessions)
    # Given a relay that found the outbox nearly empty last time
    publisher.publish_batch(session, [Message(topic, {"n": 0}, key="k0")])
    session.commit()
    assert relay.run().sent == 1
    # When a few rows arrive in every one of the 16 buckets (8 per task under a backlog)
    publisher.publish_batch(session, [Message(topic, {"n": i}, key=f"k{i}") for i in range(64)])
    session.commit()
    assert len(set(session.scalars(text("SELECT bucket FROM outbox_messages")))) == 16
    # Then one pass sends them all
    report = relay.run()
    assert (report.sent, report.batches, report.buckets) == (64, 1, 16)
    # And under a backlog a relay takes its share, leaving the rest to another
    # (500 rows a bucket: more than a few passes take from one, however fast they run)
    publisher.publish_batch(
        session, [Message(topic, {"n": i}, key=f"k{i}") for i in range(64, 8064)]
    )
    session.commit()
    other = Relay(relay_settings, sessions=sessions)
    report = relay.run(budget_s=0.05)  # a few passes of 100, each filling its shares
    assert 0 < report.sent < 8000
    held_a = _lease(relay, {})
    held_b = _lease(other, {})
    assert len(held_a) == len(held_b) == 8
    assert not set(held_a) & set(held_b)


def _rows_the_look_reads(
    session: Session, settings: Settings, query: TextClause, after: int = 0
) -> float:
    """The rows of the outbox that a look for buckets with work (the lease's, or the
    lingering relay's from the row after ``after``) reads (``EXPLAIN ANALYZE``, rolled
    back)."""
    params = {
        "scope": leases.RELAY_SCOPE,
        "owner": "relay-under-test",
        "buckets": settings.buckets,
        "limit": settings.buckets,
        "lease_s": 30,
        "after": after,
    }
    (plan,) = session.execute(
        text("EXPLAIN (ANALYZE, FORMAT JSON) " + query.text), params
    ).scalar_one()
    session.rollback()
    return rows_read(plan, "outbox_messages")


def _rows_the_looks_read(session: Session, settings: Settings) -> list[float]:
    """The rows that the lease's and the lingering relay's looks read from the first row."""
    return [
        _rows_the_look_reads(session, settings, query)
        for query in (queries.RELAY_LEASE, queries.RELAY_HAS_WORK)
    ]


def test_the_looks_for_buckets_with_work_read_a_row_per_bucket_whatever_the_statistics_say(
    relay_settings, engine, session, topic
):
    _register(session, topic)
    publisher = Publisher(relay_settings)
    # Statistics taken in a quiet moment: every row sent
    publisher.publish_batch(session, [Message(topic, {"n": i}, key=f"k{i}") for i in range(200)])
    session.execute(text("UPDATE outbox_messages SET status = 'sent', sent_at = now()"))
    session.commit()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE outbox_messages"))
    # then a backlog: 3,000 rows wait over the 16 buckets
    publisher.publish_batch(
        session, [Message(topic, {"n": i}, key=f"k{i % 100}") for i in range(3000)]
    )
    session.commit()
    # Each bucket's probe reads its first row: not a scan of the whole backlog (and the
    # look bucket by bucket reads the newest row's id besides)
    assert max(_rows_the_looks_read(session, relay_settings)) <= relay_settings.buckets + 1


def test_the_looks_for_buckets_with_work_read_no_row_of_a_backlog_in_other_buckets(
    relay_settings, engine, session, topic
):
    _register(session, topic)
    publisher = Publisher(relay_settings)
    # A backlog of 20,000 rows over three keys, with statistics taken then: to PostgreSQL,
    # every bucket looks as full as theirs
    for _ in range(20):
        publisher.publish_batch(
            session, [Message(topic, {"n": i}, key=f"hot{i % 3}") for i in range(1000)]
        )
        session.commit()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE outbox_messages"))
    # A bucket with no waiting row costs a probe, not a walk through the others' rows
    assert max(_rows_the_looks_read(session, relay_settings)) <= relay_settings.buckets + 1


@contextlib.contextmanager
def _sent_rows_kept(session: Session, engine, publisher: Publisher, topic: str) -> Iterator[int]:
    """3,000 rows sent while a transaction open elsewhere (a lane task's, a slow reader's)
    keeps their old versions, and those versions' entries in the index of waiting rows,
    from being cleaned up; yields the newest row's id."""
    publisher.publish_batch(session, [Message(topic, {"n": i}, key=f"k{i}") for i in range(3000)])
    session.commit()
    newest = session.execute(text("SELECT max(id) FROM outbox_messages")).scalar_one()
    with engine.connect() as elsewhere:
        elsewhere.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
        elsewhere.execute(text("SELECT count(*) FROM outbox_messages")).scalar_one()
        session.execute(text("UPDATE outbox_messages SET status = 'sent', sent_at = now()"))
        session.commit()
        yield newest


def test_the_lingering_relay_s_look_for_due_rows_skips_what_a_backlog_left_behind(
    relay_settings, engine, session, topic
):
    _register(session, topic)
    publisher = Publisher(relay_settings)
    with _sent_rows_kept(session, engine, publisher, topic):
        # while new rows wait, and statistics are fresh
        publisher.publish_batch(
            session, [Message(topic, {"n": i}, key=f"k{i}") for i in range(100)]
        )
        session.commit()
        session.execute(text("ANALYZE outbox_messages"))
        session.commit()
        (plan,) = session.execute(
            text("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + queries.RELAY_ANY_DUE.text)
        ).scalar_one()
        session.rollback()
    assert session.execute(queries.RELAY_ANY_DUE).scalar_one() is True
    # The look finds the newest waiting row at once: it does not walk the 3,000 entries
    # of sent rows first (a page of the index holds a few hundred). (With statistics taken
    # before the backlog, PostgreSQL 15 reads the index in a bitmap instead, every entry;
    # the look at rows newer than the relay claimed, below, holds whatever they say.)
    assert pages_read(plan) <= 10


def test_the_look_at_rows_newer_than_a_relay_claimed_skips_what_was_sent_before(
    relay_settings, engine, session, topic
):
    _register(session, topic)
    publisher = Publisher(relay_settings)
    with _sent_rows_kept(session, engine, publisher, topic) as newest, engine.connect() as conn:
        # Prepared and run as the relay runs them, past the plans PostgreSQL tries first
        for _ in range(6):
            execute(conn, queries.RELAY_ANY_NEW, {"after": newest}, prepare=True).scalar_one()
            execute(conn, queries.RELAY_ANY_DUE, prepare=True).scalar_one()

        def look(name: str, args: str = "") -> tuple[bool, int]:
            found = conn.execute(text(f"EXECUTE {name}{args}"), {"a": newest}).scalar_one()
            (plan,) = conn.execute(
                text(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE {name}{args}"),
                {"a": newest},
            ).scalar_one()
            conn.rollback()
            return found, pages_read(plan)

        # Nothing new: the look at newer rows says so without the 3,000 sent rows' entries
        # (at most a page or two for each bucket), which the look at every row walks
        found, pages = look("outbox_relay_any_new", " (:a)")
        found_all, pages_all = look("outbox_relay_any_due")
        assert found is found_all is False
        assert pages <= 2 * relay_settings.buckets + 5 and pages * 3 < pages_all
        # A new row: found
        publisher.publish(session, topic, {"n": -1}, key="k")
        session.commit()
        found, pages = look("outbox_relay_any_new", " (:a)")
        assert found is True and pages <= 2 * relay_settings.buckets + 5


def test_concurrent_relays_never_hold_the_same_bucket_and_a_dead_ones_expire(
    relay_settings, engine, session, topic
):
    _register(session, topic)
    Publisher(relay_settings).publish_batch(
        session, [Message(topic, {"n": i}, key=f"k{i}") for i in range(400)]
    )
    session.commit()
    sessions = make_sessionmaker(engine)
    a = Relay(relay_settings.replace(relay_lease_s=11.0), sessions=sessions)
    b = Relay(relay_settings.replace(relay_buckets_per_task=16), sessions=sessions)
    held_a = _lease(a, {})
    held_b = _lease(b, {})  # wants up to 16, gets the 8 that A does not hold
    assert len(held_a) == len(held_b) == 8
    assert not set(held_a) & set(held_b)
    # A dies: once its leases expire, B may take them, with a new fencing token.
    session.execute(
        text("UPDATE leases SET expires_at = now() - interval '1 second' WHERE owner = :owner"),
        {"owner": a.owner},
    )
    session.commit()
    taken = _lease(b, held_b)
    assert set(held_a) & set(taken)
    for bucket in set(held_a) & set(taken):
        assert taken[bucket] == held_a[bucket] + 1
    owners = session.execute(select(Lease.bucket, Lease.owner)).all()
    assert len(owners) == relay_settings.buckets


def test_a_partition_without_a_leader_backs_off_its_topic_only_and_ends_dead_after_the_grace(
    relay_settings, engine, session, topic
):
    """The embedded broker has one node and never loses a partition's leader, so that
    error is injected where the relay receives delivery reports, for one topic's rows; the
    other topic's rows go to the broker as usual."""
    sick = f"{topic}.sick"
    _register(session, topic)
    _register(session, sick)
    Publisher(relay_settings).publish_batch(
        session,
        [Message(sick, {"n": i}, key=f"k{i}") for i in range(5)]
        + [Message(topic, {"n": i}, key=f"k{i}") for i in range(5)],
    )
    session.commit()
    relay = Relay(relay_settings, sessions=make_sessionmaker(engine))
    send = relay.producer.send

    def leaderless(rows):
        healthy = send([r for r in rows if r.topic != sick])
        no_leader = KafkaError(KafkaError.LEADER_NOT_AVAILABLE, "no leader")
        return healthy + [DeliveryReport(r.id, error=no_leader) for r in rows if r.topic == sick]

    relay.producer.send = leaderless

    # When the relay meets the error for one topic
    report = relay.run(budget_s=5)

    # Then the other topic flows, the circuit stays closed, and the sick topic's rows wait
    # without spending an attempt, later rows of their keys behind them
    assert (report.sent, report.failed) == (5, 0)
    # (each at least once: a row whose jittered wait, drawn from 0 to 1 s, was nearly 0 can
    # be claimed and deferred again within the run)
    assert report.deferred >= 5
    assert relay.circuit.state == "closed"
    session.expire_all()
    rows = list(session.scalars(select(OutboxMessage).where(OutboxMessage.topic == sick)))
    assert {(r.status, r.attempts) for r in rows} == {("pending", 0)}
    assert all("LEADER_NOT_AVAILABLE" in (r.last_error or "") for r in rows)

    # And once rows have waited past the grace, each such error spends an attempt
    graceless = Relay(
        relay_settings.replace(
            relay_topic_error_grace_s=0.0, relay_max_attempts=2, relay_retry_base_s=0.0
        ),
        sessions=make_sessionmaker(engine),
    )
    graceless.producer.send = leaderless
    session.execute(text("UPDATE outbox_messages SET available_at = now()"))
    session.commit()
    for _ in range(3):
        graceless.run(budget_s=5)
    session.expire_all()
    rows = list(session.scalars(select(OutboxMessage).where(OutboxMessage.topic == sick)))
    assert {(r.status, r.attempts) for r in rows} == {("dead", 2)}
    relay.close()
    graceless.close()


def test_a_changed_bucket_count_is_refused_while_rows_spread_by_the_old_one_are_unsent(
    relay_settings, engine, session, topic
):
    _register(session, topic)
    eight = relay_settings.replace(buckets=8)
    sixteen = relay_settings.replace(buckets=16)
    Relay(eight, sessions=make_sessionmaker(engine)).run(budget_s=5)  # the relay's count: 8
    Publisher(eight).publish_batch(
        session, [Message(topic, {"n": i}, key=f"k{i}") for i in range(20)]
    )
    session.commit()

    # When the relay and a publisher start with 16 while those rows are unsent
    # Then both refuse, naming the setting, and nothing was written or stranded
    with pytest.raises(SettingsError, match=r"OUTBOX_BUCKETS=16.*spread over 8.*unfinished"):
        Relay(sixteen, sessions=make_sessionmaker(engine)).run(budget_s=5)
    with pytest.raises(SettingsError, match=r"OUTBOX_BUCKETS=16.*spread over 8"):
        Publisher(sixteen).publish(session, topic, {"n": "new"}, key="k1")
    session.rollback()
    assert session.scalar(text("SELECT count(*) FROM leases WHERE scope = 'relay'")) == 8

    # When the old count's relay drains them, the new count takes over
    assert Relay(eight, sessions=make_sessionmaker(engine)).run(budget_s=10).sent == 20
    relay = Relay(sixteen, sessions=make_sessionmaker(engine))
    relay.run(budget_s=5)
    Publisher(sixteen).publish(session, topic, {"n": "new"}, key="k1")
    session.commit()
    assert relay.run(budget_s=10).sent == 1
    assert session.scalar(text("SELECT count(*) FROM leases WHERE scope = 'relay'")) == 16


def test_a_lingering_relay_sends_rows_committed_while_it_waits_in_the_same_task(
    relay_settings, engine, session, topic
):
    _register(session, topic)
    publisher = Publisher(relay_settings)
    first = publisher.publish(session, topic, {"n": 1}, key="k")
    session.commit()
    later = []
    calls = []

    class Linger:
        waits = 100

        def hold(self) -> bool:
            calls.append("hold")
            return True

        def keep_waiting(self, idle_s: float) -> bool:
            if not later:
                with Session(engine) as other:
                    later.append(publisher.publish(other, topic, {"n": 2}, key="k"))
                    other.commit()
            self.waits -= 1
            return self.waits > 0

        def let_go(self) -> None:
            calls.append("let_go")

        def backlog(self, found: bool) -> None:
            assert not found  # two rows are no backlog: commits stay this task's

    report = Relay(relay_settings, sessions=make_sessionmaker(engine)).run(
        budget_s=30, linger=Linger()
    )

    assert report.sent == 2  # one task, no kick for the second commit
    assert calls == ["hold", "let_go"]
    received = consume_all(relay_settings.kafka_bootstrap, topic, 2)
    assert [m.message_id for m in received] == [str(first), str(later[0])]  # in key order


@pytest.mark.parametrize("prepare", [True, False], ids=["prepared", "plain"])
def test_a_relays_statements_are_prepared_once_per_connection_unless_turned_off(
    relay_settings, engine, session, topic, prepare
):
    # Prepared, PostgreSQL plans the claim and the mark once per connection rather than on
    # every pass; plain (behind PgBouncer in transaction mode), they go as written.
    _register(session, topic)
    ran: list[tuple[int, str]] = []
    event.listen(
        engine,
        "before_cursor_execute",
        lambda conn, cursor, sql, *_: ran.append((id(conn.connection.dbapi_connection), sql)),
    )
    publisher = Publisher(relay_settings)
    relay = Relay(
        relay_settings.replace(db_prepare_statements=prepare), sessions=make_sessionmaker(engine)
    )
    for n in range(6):
        publisher.publish(session, topic, {"n": n}, key="k")
        session.commit()
        assert relay.run(budget_s=30).sent == 1

    received = consume_all(relay_settings.kafka_bootstrap, topic, 6)
    assert [m.value["n"] for m in received] == list(range(6))
    for name in ("outbox_claim_batch", "outbox_mark_sent"):
        mine = [(conn, sql.split()[0]) for conn, sql in ran if sql.split()[:2][-1] == name]
        if not prepare:
            assert mine == []
            continue
        assert [verb for _, verb in mine].count("EXECUTE") == 6
        for conn in {c for c, _ in mine}:
            # On each connection: one PREPARE, before its first EXECUTE.
            verbs = [verb for c, verb in mine if c == conn]
            assert verbs[0] == "PREPARE" and verbs.count("PREPARE") == 1


def test_a_lingering_relay_looks_for_new_rows_on_one_connection_one_statement_each(
    relay_settings, engine, session, topic
):
    _register(session, topic)
    seen: list[str] = []
    event.listen(engine, "checkout", lambda *_: seen.append("checkout"))
    event.listen(engine, "rollback", lambda *_: seen.append("rollback"))
    event.listen(engine, "before_cursor_execute", lambda *a: seen.append(a[2]))
    during: list[str] = []

    class Idle:
        waits = 20

        def hold(self) -> bool:
            return True

        def keep_waiting(self, idle_s: float) -> bool:
            if self.waits == 20:
                seen.clear()  # from the first wait to the last: the looks
            self.waits -= 1
            if not self.waits:
                during.extend(seen)
            return self.waits > 0

        def let_go(self) -> None:
            pass

        def backlog(self, found: bool) -> None:
            pass

    relay = Relay(relay_settings.replace(relay_poll_ms=1), sessions=make_sessionmaker(engine))
    relay.run(budget_s=30, linger=Idle())

    # Nineteen looks of one statement each, on a connection checked out for the whole
    # wait: no check-out (with the pool's ping), BEGIN or ROLLBACK per look; with nothing
    # due anywhere, the look is the cheap one, and the one per bucket or lane never runs.
    during[:] = as_written(during)  # a prepared look: its EXECUTE, not its PREPARE
    assert len(during) == 19
    assert all("outbox_messages" in sql and "generate_series" not in sql for sql in during)


class _Arriving:
    """A relay's linger that commits a row on each of its first ``arrivals`` waits."""

    def __init__(self, engine, publisher: Publisher, topic: str, arrivals: int, waits: int):
        self.engine, self.publisher, self.topic = engine, publisher, topic
        self.arrivals, self.waits = arrivals, waits

    def hold(self) -> bool:
        return True

    def keep_waiting(self, idle_s: float) -> bool:
        if self.arrivals:
            self.arrivals -= 1
            with Session(self.engine) as other:
                self.publisher.publish(other, self.topic, {"n": self.arrivals}, key="k")
                other.commit()
        self.waits -= 1
        return self.waits > 0

    def let_go(self) -> None:
        pass

    def backlog(self, found: bool) -> None:
        pass


def test_after_a_pass_that_sent_rows_a_lingering_relay_looks_again_without_a_polls_wait(
    relay_settings, engine, session, topic, monkeypatch
):
    """A row committed during a pass goes out in the next one straight away, as in a
    loop that sleeps only once it finds nothing; an idle relay waits a poll per look."""
    _register(session, topic)
    publisher = Publisher(relay_settings)
    publisher.publish(session, topic, {"n": 0}, key="k")
    session.commit()
    relay = Relay(relay_settings.replace(relay_poll_ms=200), sessions=make_sessionmaker(engine))
    events: list[str] = []
    real_sleep, mark = time.sleep, relay._mark
    monkeypatch.setattr(time, "sleep", lambda s: (events.append("sleep"), real_sleep(s)))

    def marked(*args, **kwargs):
        events.append("mark")
        return mark(*args, **kwargs)

    relay._mark = marked  # type: ignore[method-assign]
    # The linger commits a row as it is first asked whether to wait: after the first pass
    report = relay.run(budget_s=30, linger=_Arriving(engine, publisher, topic, 1, waits=4))

    assert report.sent == 2
    assert events[:3] == ["mark", "mark", "sleep"]


def _is_bucket_by_bucket_look(sql: str) -> bool:
    return "l.owner <>" in sql  # RELAY_HAS_WORK


def test_a_lingering_relay_goes_from_the_probe_to_its_pass_after_a_pass_that_found_rows(
    relay_settings, engine, session, topic
):
    _register(session, topic)
    publisher = Publisher(relay_settings)
    publisher.publish(session, topic, {"n": 9}, key="k")
    session.commit()
    seen: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: seen.append(a[2]))
    relay = Relay(relay_settings.replace(relay_poll_ms=1), sessions=make_sessionmaker(engine))

    report = relay.run(budget_s=30, linger=_Arriving(engine, publisher, topic, 3, waits=50))

    assert report.sent == 4
    # Each row that came while it waited was found by the probe of the claim index alone:
    # its last pass found rows in nearly empty buckets, and its next lease takes every
    # bucket with work.
    assert not [sql for sql in seen if _is_bucket_by_bucket_look(sql)]


def test_a_lingering_relay_sends_a_row_that_committed_after_a_newer_one_it_sent(
    relay_settings, engine, session, topic
):
    _register(session, topic)
    publisher = Publisher(relay_settings)
    # The first row takes its id, and its transaction stays open while a second row, with
    # a higher id, commits
    late = Session(engine)
    first = publisher.publish(late, topic, {"n": 0}, key="a")
    second = publisher.publish(session, topic, {"n": 1}, key="b")
    session.commit()
    seen: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: seen.append(a[2]))

    class Linger(_Arriving):
        def keep_waiting(self, idle_s: float) -> bool:
            if self.waits == 395 and late.in_transaction():
                # after the relay sent the second row, and looked at every waiting row
                late.commit()
                late.close()
            return super().keep_waiting(idle_s)

    relay = Relay(relay_settings.replace(relay_poll_ms=1), sessions=make_sessionmaker(engine))
    linger = Linger(engine, publisher, topic, 0, waits=400)
    marked_at: list[int] = []  # the waits left at each mark
    mark = relay._mark

    def marked(*args, **kwargs):
        marked_at.append(linger.waits)
        return mark(*args, **kwargs)

    relay._mark = marked  # type: ignore[method-assign]
    started = time.monotonic()
    report = relay.run(budget_s=30, linger=linger)
    elapsed = time.monotonic() - started

    assert report.sent == 2
    # The late row went out while the relay lingered, not in the pass as its task ended
    assert len(marked_at) == 2 and marked_at[1] > 0
    received = consume_all(relay_settings.kafka_bootstrap, topic, 2)
    assert {m.message_id for m in received} == {str(first), str(second)}
    # Between its looks at every waiting row, at most one each FULL_LOOK_S, it looked at
    # the rows newer than the newest it claimed
    looks = as_written(seen)
    full = [sql for sql in looks if sql == queries.RELAY_ANY_DUE.text]
    newer = [sql for sql in looks if sql == queries.RELAY_ANY_NEW.text]
    assert 1 <= len(full) <= elapsed / relay_module.FULL_LOOK_S + 1
    assert len(newer) > len(full)


def _failed(session: Session, message_id: uuid.UUID, retry_in_s: float) -> None:
    """Make a row one whose delivery failed, to be retried in ``retry_in_s``."""
    session.execute(
        text(
            "UPDATE outbox_messages SET attempts = 1, last_error = 'boom', "
            "available_at = now() + make_interval(secs => :s) WHERE message_id = :id"
        ),
        {"id": message_id, "s": retry_in_s},
    )
    session.commit()


def _held_back(session: Session, publisher: Publisher, topic: str) -> tuple[uuid.UUID, uuid.UUID]:
    """Two rows of one key; the first failed and is retried in a minute."""
    _register(session, topic)
    first, second = (publisher.publish(session, topic, {"n": n}, key="k") for n in (0, 1))
    _failed(session, first, retry_in_s=60)
    return first, second


def test_a_row_held_back_by_its_key_costs_a_lingering_relay_no_lease_every_poll(
    relay_settings, engine, session, topic
):
    publisher = Publisher(relay_settings)
    # The first row failed and backs off for a minute; the second is due, but waits
    # behind it: the probe of the claim index sees it on every poll.
    _, second = _held_back(session, publisher, topic)
    seen: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: seen.append(a[2]))
    relay = Relay(relay_settings.replace(relay_poll_ms=1), sessions=make_sessionmaker(engine))

    linger = _Arriving(engine, publisher, topic, 0, waits=30)
    report = relay.run(budget_s=30, linger=linger)

    assert report.sent == 0 and linger.waits == 0  # it waited its thirty polls
    # The lease of the first pass and of the last look as the task ends: not one per poll
    # (each a write to the lease rows, and a claim that finds nothing)
    leases_taken = [sql for sql in as_written(seen) if "WITH with_work" in sql]  # RELAY_LEASE
    assert len(leases_taken) == 2
    session.expire_all()
    waiting = session.scalars(select(OutboxMessage).where(OutboxMessage.message_id == second))
    assert waiting.one().status == "pending"  # and the later row still waits its turn


def _held_backlog(
    session: Session, publisher: Publisher, topic: str, rows: int, retry_in_s: float
) -> uuid.UUID:
    """A failed row of key ``k``, retried in ``retry_in_s``, and ``rows`` rows of that key
    behind it; returns the failed row's id."""
    _register(session, topic)
    first = publisher.publish(session, topic, {"n": 0}, key="k")
    session.commit()
    _failed(session, first, retry_in_s=retry_in_s)
    publisher.publish_batch(
        session, [Message(topic, {"n": n}, key="k") for n in range(1, rows + 1)]
    )
    session.commit()
    return first


def test_a_lingering_relay_reads_rows_held_behind_a_failed_row_once_per_recheck_not_every_poll(
    relay_settings, engine, session, topic
):
    publisher = Publisher(relay_settings)
    _held_backlog(session, publisher, topic, rows=2000, retry_in_s=60)
    executed: list[tuple[str, object]] = []
    event.listen(engine, "before_cursor_execute", lambda *a: executed.append((a[2], a[3])))
    relay = Relay(relay_settings.replace(relay_poll_ms=1), sessions=make_sessionmaker(engine))

    # Every wait commits one more row of the failed key: the probe finds a due row at each
    # poll, and nothing may be sent
    linger = _Arriving(engine, publisher, topic, 40, waits=40)
    started = time.monotonic()
    report = relay.run(budget_s=30, linger=linger)
    elapsed = time.monotonic() - started

    assert report.sent == 0 and linger.waits == 0
    looks = [params for sql, params in executed if _is_bucket_by_bucket_look(sql)]
    assert looks
    # The looks that read every held row (from the first, after = 0) came at most once a
    # RECHECK_S; the others read only the rows committed since the look before
    whole = [params for params in looks if params.get("after", 0) == 0]  # type: ignore[attr-defined]
    assert 1 <= len(whole) <= elapsed / relay_module.RECHECK_S + 1
    assert len(looks) > len(whole)
    # and such a look reads the rows after its start, not the backlog
    newest = session.execute(text("SELECT max(id) FROM outbox_messages")).scalar_one()
    look = queries.RELAY_HAS_WORK
    assert _rows_the_look_reads(session, relay_settings, look, after=newest - 1) <= (
        relay_settings.buckets + 1
    )
    assert _rows_the_look_reads(session, relay_settings, look) >= 2000


def test_a_row_in_a_bucket_another_relay_gives_back_goes_out_at_a_lingering_relays_next_look(
    relay_settings, engine, session, topic
):
    _register(session, topic)
    publisher = Publisher(relay_settings)
    publisher.publish(session, topic, {"n": 0}, key="k")
    session.commit()
    sessions = make_sessionmaker(engine)
    other = Relay(relay_settings, sessions=sessions)
    taken = _lease(other, {})  # another relay holds the row's bucket
    assert len(taken) == 1

    class Linger(_Arriving):
        def keep_waiting(self, idle_s: float) -> bool:
            if self.waits == 380:
                with sessions.begin() as tx:  # the other relay gives its bucket back
                    leases.release(tx, leases.RELAY_SCOPE, other.owner, set(taken))
            return super().keep_waiting(idle_s)

    relay = Relay(relay_settings.replace(relay_poll_ms=1), sessions=sessions)
    linger = Linger(engine, publisher, topic, 0, waits=400)
    marked_at: list[int] = []
    mark = relay._mark

    def marked(*args, **kwargs):
        marked_at.append(linger.waits)
        return mark(*args, **kwargs)

    relay._mark = marked  # type: ignore[method-assign]
    report = relay.run(budget_s=30, linger=linger)

    # It looked at the row at each poll while the bucket was held, and sent it at the
    # first look after, not at a later look at every row
    assert report.sent == 1
    assert marked_at and marked_at[0] >= 370


def test_rows_held_behind_a_failed_row_go_out_in_order_once_its_backoff_ends_while_a_relay_lingers(
    relay_settings, engine, session, topic
):
    publisher = Publisher(relay_settings)
    _held_backlog(session, publisher, topic, rows=200, retry_in_s=1.0)

    class Linger(_Arriving):
        def keep_waiting(self, idle_s: float) -> bool:
            return idle_s < 3.0

    relay = Relay(relay_settings.replace(relay_poll_ms=1), sessions=make_sessionmaker(engine))
    report = relay.run(budget_s=30, linger=Linger(engine, publisher, topic, 0, waits=0))

    # The failed row and the 200 behind it went out while the relay lingered, in order
    assert report.sent == 201
    received = consume_all(relay_settings.kafka_bootstrap, topic, 201)
    assert [m.value["n"] for m in received] == list(range(201))


def test_a_bucket_whose_due_rows_all_wait_behind_a_failed_row_of_their_key_is_not_leased(
    relay_settings, engine, session, topic
):
    first, _ = _held_back(session, Publisher(relay_settings), topic)
    relay = Relay(relay_settings, sessions=make_sessionmaker(engine))

    # The second row is due, but nothing in its bucket can be sent: no lease, and no
    # work seen elsewhere
    with relay.sessions.begin() as tx:
        assert relay._lease(tx, {}) == ({}, False)
    # Once the failed row is due again, the bucket has work
    _failed(session, first, retry_in_s=0)
    with relay.sessions.begin() as tx:
        granted, _ = relay._lease(tx, {})
    assert len(granted) == 1


def test_a_connection_that_served_a_lingering_relays_looks_goes_back_to_the_pool_as_it_came(
    relay_settings, topic
):
    # One connection, so the relay's transactions and its looks all use it
    engine = make_engine(relay_settings, pool_size=1, max_overflow=0)
    sessions = make_sessionmaker(engine)
    with sessions() as session:
        _register(session, topic)
        Publisher(relay_settings).publish(session, topic, {"n": 1}, key="k")
        session.commit()
    with engine.connect() as conn:
        driver = conn.connection.dbapi_connection
        before = (driver.autocommit, driver.isolation_level)

    relay = Relay(relay_settings.replace(relay_poll_ms=1), sessions=sessions)
    linger = _Arriving(engine, Publisher(relay_settings), topic, 0, waits=3)
    assert relay.run(budget_s=30, linger=linger).sent == 1

    # The looks ran in autocommit, and the connection went back with the driver's own
    # settings: its next transaction starts with a plain BEGIN, not with a reset of the
    # isolation level first (a round trip more for every transaction after the looks)
    with engine.connect() as conn:
        driver = conn.connection.dbapi_connection
        assert (driver.autocommit, driver.isolation_level) == before == (False, None)
    engine.dispose()


def test_a_lingering_relay_lets_kicks_through_while_its_claims_find_a_backlog(
    relay_settings, engine, session, topic
):
    _register(session, topic)
    Publisher(relay_settings).publish_batch(
        session, [Message(topic, {"n": n}, key=f"k{n % 100}") for n in range(1000)]
    )
    session.commit()
    calls: list[object] = []

    class Linger:
        def hold(self) -> bool:
            calls.append("hold")
            return True

        def keep_waiting(self, idle_s: float) -> bool:
            calls.append("wait")
            return False

        def let_go(self) -> None:
            calls.append("let_go")

        def backlog(self, found: bool) -> None:
            calls.append(found)

    report = Relay(relay_settings, sessions=make_sessionmaker(engine)).run(
        budget_s=30, linger=Linger()
    )

    assert report.sent == 1000
    # Claims of 100 rows out of 1,000 are full: kicks go through (and their tasks help)
    # until a claim is light, and only then does the task wait, seeing commits alone.
    assert calls[:2] == ["hold", True]
    assert calls[calls.index("wait") - 1] is False
    assert calls.count(True) >= 5


def test_a_relay_task_beside_a_lingering_one_sends_what_it_finds_and_ends(
    relay_settings, engine, session, topic
):
    _register(session, topic)
    publisher = Publisher(relay_settings)
    stop = threading.Event()

    def keep_publishing() -> None:  # steady traffic over many keys, hence many buckets
        n = 0
        with Session(engine) as other:
            while not stop.is_set():
                publisher.publish(other, topic, {"n": n}, key=f"k{n % 200}")
                other.commit()
                n += 1
                time.sleep(0.002)

    class Beside:  # another task lingers: this one does not
        def hold(self) -> bool:
            return False

        def keep_waiting(self, idle_s: float) -> bool:
            raise AssertionError("a task that does not linger does not wait")

        def let_go(self) -> None:
            pass

    publishing = threading.Thread(target=keep_publishing)
    publishing.start()
    try:
        time.sleep(0.3)
        started = time.monotonic()
        report = Relay(relay_settings, sessions=make_sessionmaker(engine)).run(
            budget_s=30, linger=Beside()
        )
        took = time.monotonic() - started
    finally:
        stop.set()
        publishing.join()
    assert report.sent > 0
    # It did not stay on for the traffic, as a task alone would: the lingering one has it.
    assert took < 3, took


def test_a_claim_takes_at_most_its_share_of_the_batch_bytes_and_one_row_over_it(
    relay_settings, engine, session, topic
):
    _register(session, topic)
    publisher = Publisher(relay_settings)
    sent: list[str] = []
    # One key, so one bucket: rows of about 1,100 stored bytes (payload and headers).
    for limit, claims in ((500, 10), (2500, 4)):
        ids = publisher.publish_batch(
            session, [Message(topic, {"n": n, "pad": "x" * 1000}, key="k") for n in range(10)]
        )
        session.commit()
        sent += [str(i) for i in ids]
        small = relay_settings.replace(relay_batch_bytes=limit)
        report = Relay(small, sessions=make_sessionmaker(engine)).run(budget_s=30)
        # 500 bytes: a row over it goes alone; 2,500: three rows a claim (3 + 3 + 3 + 1)
        assert (report.sent, report.batches) == (10, claims)
    received = consume_all(relay_settings.kafka_bootstrap, topic, 20)
    assert [m.message_id for m in received] == sent  # in key order, none left behind


def test_a_relay_whose_claim_lapsed_and_was_taken_over_changes_nothing_with_its_mark(
    relay_settings, engine, session, topic
):
    """A relay stalls between its claim and its mark, past its leases; another relay
    claims the same rows. The stale relay's mark, whether it says its rows were sent or
    failed, changes neither the rows nor the new claim; the new relay's mark stands."""
    _register(session, topic)
    ids = Publisher(relay_settings).publish_batch(
        session, [Message(topic, {"n": n}, key="k") for n in range(6)]
    )
    session.commit()
    sessions = make_sessionmaker(engine)
    stale = Relay(
        relay_settings.replace(relay_lease_s=1.0, relay_delivery_timeout_ms=500), sessions=sessions
    )
    other = Relay(relay_settings, sessions=sessions)

    held, stale_claim = _lease_and_claim(stale)
    assert len(stale_claim.rows) == 6
    # Given the stale relay's leases and claim lapse, and the other relay claims the rows
    time.sleep(1.2)
    other_held, other_claim = _lease_and_claim(other)
    assert set(other_held) == set(held)
    assert [r.id for r in other_claim.rows] == [r.id for r in stale_claim.rows]

    # When the stale relay marks half its rows sent and the other half failed
    refused = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "too large", fatal=False)
    rows = stale_claim.rows
    reports = [DeliveryReport(r.id, partition=0, offset=1_000 + n) for n, r in enumerate(rows[:3])]
    reports += [DeliveryReport(r.id, error=refused) for r in rows[3:]]
    stale._mark(stale_claim, reports, RelayReport())

    # Then the rows are untouched and the other relay's claim still stands
    session.rollback()
    state = session.execute(
        select(OutboxMessage.status, OutboxMessage.attempts, OutboxMessage.last_error)
    ).all()
    assert set(state) == {("pending", 0, None)}
    claims = session.scalars(select(Lease.claim_token).where(Lease.owner == other.owner))
    assert set(claims) - {None} == {other_claim.token}

    # and the other relay's own mark settles the rows where it placed them
    other._mark(other_claim, other.producer.send(other_claim.rows), RelayReport())
    session.rollback()
    placed = session.execute(
        select(OutboxMessage.message_id, OutboxMessage.status, OutboxMessage.kafka_offset)
    ).all()
    received = {
        m.message_id: m.offset for m in consume_all(relay_settings.kafka_bootstrap, topic, 6)
    }
    assert {(str(m), status, offset) for m, status, offset in placed} == {
        (str(i), "sent", received[str(i)]) for i in ids
    }
    assert not session.scalars(
        select(Lease.claim_token).where(Lease.claim_token.is_not(None))
    ).all()
    stale.close()
    other.close()


def test_a_claim_records_itself_on_its_buckets_leases_and_rewrites_none_of_its_rows(
    relay_settings, engine, session, topic
):
    """A claim costs each row a lock, not a new version of it: the rows keep their
    versions (ctid, xmin) until the mark; the claim's token is on its buckets' leases."""
    _register(session, topic)
    Publisher(relay_settings).publish_batch(
        session, [Message(topic, {"n": n}, key=f"k{n}") for n in range(50)]
    )
    session.commit()
    versions = text("SELECT id, CAST(ctid AS text), CAST(xmin AS text) FROM outbox_messages")
    before = set(session.execute(versions).all())
    session.rollback()
    every_bucket = relay_settings.replace(relay_buckets_per_task=relay_settings.buckets)
    relay = Relay(every_bucket, sessions=make_sessionmaker(engine))
    _, claim = _lease_and_claim(relay)

    assert len(claim.rows) == 50
    assert set(session.execute(versions).all()) == before
    buckets = session.scalars(
        select(OutboxMessage.bucket).where(OutboxMessage.id.in_(claim.attempts))
    ).all()
    stamped = session.scalars(select(Lease.bucket).where(Lease.claim_token == claim.token))
    assert set(stamped) == set(buckets)
    relay.close()


class _Pair(NamedTuple):
    a: int
    b: str


def test_rows_read_as_named_tuples_must_end_with_the_tuple_s_columns_in_order(session):
    # how the relay and the lanes read the rows they claim
    rows = as_tuples(session.execute(text("SELECT 0 AS before, 1 AS a, 'x' AS b")), _Pair)
    assert rows == [_Pair(1, "x")] and rows[0].b == "x"
    with pytest.raises(RuntimeError, match="not _Pair's"):
        as_tuples(session.execute(text("SELECT 'x' AS b, 1 AS a")), _Pair)
