"""Acknowledgements on real PostgreSQL and Kafka: the relay opens one delivery per group
that requires acks, the consumer's handler transaction writes an ack to its own outbox,
and the built-in ack handler moves the delivery forward only."""

from __future__ import annotations

import collections
import json
import uuid

from sqlalchemy import event, func, select, text
from sqlalchemy.orm import Session

import consumer
from consumer.acks import apply_ack, apply_acks, register_ack_topic, write_acks
from consumer.lanes import LaneProcessor
from outbox import Publisher, queries
from outbox.db import make_sessionmaker
from outbox.models import ConsumerGroup, Delivery, InboxMessage, OutboxMessage, Topic
from outbox.relay import Relay
from outbox.settings import Settings
from outbox.wire import ACK_TOPIC
from tests.inbox import receive
from tests.plans import rows_read


def _topic_with_groups(session: Session, topic: str) -> None:
    session.add(Topic(name=topic))
    session.flush()
    session.add_all(
        [
            ConsumerGroup(name="billing", topic=topic, requires_ack=True, ack_timeout_s=120),
            ConsumerGroup(name="audit", topic=topic, requires_ack=False),
            ConsumerGroup(name="legacy", topic=topic, requires_ack=True, active=False),
        ]
    )
    session.commit()


def _ack(message_id: uuid.UUID, topic: str, status: str, instance: str) -> consumer.Message:
    payload = {
        "message_id": str(message_id),
        "topic": topic,
        "group": "billing",
        "status": status,
        "instance": instance,
        "attempt": 1,
        "error": None if status == "success" else "boom",
    }
    return consumer.Message(uuid.uuid4(), ACK_TOPIC, str(message_id), payload, {}, 1, 0, 0)


def test_sending_opens_one_delivery_per_active_group_that_requires_acks(
    settings: Settings, engine, session: Session, topic: str
):
    _topic_with_groups(session, topic)
    message_id = Publisher(settings).publish(session, topic, {"order": 1}, key="o-1")
    session.commit()

    assert Relay(settings, sessions=make_sessionmaker(engine)).run().sent == 1

    deliveries = session.execute(
        select(ConsumerGroup.name, Delivery.status, text("deliveries.next_retry_at - now()"))
        .join(ConsumerGroup, ConsumerGroup.id == Delivery.consumer_group_id)
        .where(Delivery.message_id == message_id)
    ).all()
    assert [(name, status) for name, status, _ in deliveries] == [("billing", "awaiting_ack")]
    assert 100 < deliveries[0][2].total_seconds() <= 120  # due at the group's ack timeout


def test_the_handler_transaction_writes_a_success_or_failure_ack_to_the_outbox(
    settings: Settings, engine, session: Session
):
    topic = f"t.{uuid.uuid4().hex[:8]}"
    _topic_with_groups(session, topic)

    @consumer.handler(topic)
    def handle(message: consumer.Message, tx: Session) -> None:
        if message.payload.get("fail"):
            raise RuntimeError("ledger locked")

    good, bad = receive(session, "billing", topic, [("k0", {}), ("k1", {"fail": True})], lane=1)

    LaneProcessor(settings, make_sessionmaker(engine), "worker-7").run("billing", 1)

    # One ack message for the lane's batch, keyed by the group and lane
    (row,) = session.scalars(select(OutboxMessage).where(OutboxMessage.topic == ACK_TOPIC))
    assert row.key == "billing/1"
    success, failure = row.payload["acks"]
    assert [success["message_id"], failure["message_id"]] == [str(good), str(bad)]
    assert (success["status"], success["group"], success["instance"]) == (
        "success",
        "billing",
        "worker-7",
    )
    assert (failure["status"], failure["attempt"]) == ("failure", 1)
    assert "ledger locked" in failure["error"]


def test_the_acks_of_a_batch_go_in_few_messages_per_lane_in_order_and_are_all_applied(
    settings: Settings, engine, session: Session
):
    topic = f"t.{uuid.uuid4().hex[:8]}"
    _topic_with_groups(session, topic)

    @consumer.handler(topic)
    def handle(message: consumer.Message, tx: Session) -> None:
        pass

    # 250 messages in lane 2 and 3 in lane 5, each with a delivery waiting for its ack
    many = receive(session, "billing", topic, [(f"k{n}", {}) for n in range(250)], lane=2)
    few = receive(session, "billing", topic, [(f"k{n}", {}) for n in range(3)], lane=5)
    billing = session.scalars(select(ConsumerGroup.id).where(ConsumerGroup.name == "billing")).one()
    session.add_all(Delivery(message_id=m, consumer_group_id=billing) for m in many + few)
    session.commit()

    report = LaneProcessor(settings, make_sessionmaker(engine), "w7").run("billing", [2, 5])
    assert report.done == 253

    # Then the acks go 100 to a message, each lane's in its own messages, in order
    rows = session.scalars(
        select(OutboxMessage).where(OutboxMessage.topic == ACK_TOPIC).order_by(OutboxMessage.id)
    ).all()
    by_key: dict[str, list[str]] = {}
    for row in rows:
        by_key.setdefault(row.key, []).extend(a["message_id"] for a in row.payload["acks"])
    assert by_key == {"billing/2": [str(m) for m in many], "billing/5": [str(m) for m in few]}
    assert [len(row.payload["acks"]) for row in rows] == [100, 100, 50, 3]

    # and the ack handler applies every one of them (and an ack in a message of its own,
    # as acks were written before, too)
    single = _ack(uuid.uuid4(), topic, "success", "w1")
    session.add(
        Delivery(message_id=uuid.UUID(single.payload["message_id"]), consumer_group_id=billing)
    )
    session.commit()
    receive(
        session,
        "outbox-acks",
        ACK_TOPIC,
        [(row.key, row.payload) for row in rows] + [(single.key, single.payload)],
    )
    report = LaneProcessor(settings, make_sessionmaker(engine), "w").run("outbox-acks", 0)
    assert (report.done, report.dead) == (5, 0)
    session.expire_all()
    statuses = collections.Counter(
        (d.status, d.instance_id) for d in session.scalars(select(Delivery))
    )
    assert statuses == {("acked", "w7"): 253, ("acked", "w1"): 1}


def test_acks_with_long_errors_go_in_messages_within_the_payload_limit(
    settings: Settings, session: Session
):
    small = settings.replace(max_payload_bytes=5_000)
    acks = [
        {**_ack(uuid.uuid4(), "orders", "failure", "w1").payload, "error": "e" * 2_000}
        for _ in range(7)
    ]
    register_ack_topic(session)
    write_acks(session, Publisher(small), [("billing/3", ack) for ack in acks])
    session.commit()

    rows = session.scalars(
        select(OutboxMessage).where(OutboxMessage.topic == ACK_TOPIC).order_by(OutboxMessage.id)
    ).all()
    # as many as fit in each, in order
    fit = (5_000 - len('{"acks":[]}')) // (len(json.dumps(acks[0], separators=(",", ":"))) + 1)
    assert fit == 2
    assert [len(row.payload["acks"]) for row in rows] == [2, 2, 2, 1]
    assert [a for row in rows for a in row.payload["acks"]] == acks
    assert all(len(json.dumps(row.payload, separators=(",", ":"))) <= 5_000 for row in rows)


def test_acks_move_a_delivery_forward_only(
    settings: Settings, engine, session: Session, topic: str
):
    _topic_with_groups(session, topic)
    first, second = uuid.uuid4(), uuid.uuid4()
    billing = session.scalars(select(ConsumerGroup.id).where(ConsumerGroup.name == "billing")).one()
    session.add_all(
        [
            Delivery(message_id=first, consumer_group_id=billing),
            Delivery(message_id=second, consumer_group_id=billing),
        ]
    )
    session.commit()

    def status(message_id: uuid.UUID) -> tuple[str, str | None]:
        session.expire_all()
        row = session.scalars(select(Delivery).where(Delivery.message_id == message_id)).one()
        return row.status, row.instance_id

    # A success, its duplicate, then a late failure: acked, by the first instance
    for ack in (("success", "w1"), ("success", "w1"), ("failure", "w2")):
        apply_ack(_ack(first, topic, *ack), session)
        session.commit()
    assert status(first) == ("acked", "w1")

    # A failure, repeated, then the success of a later attempt: failed, then acked
    apply_ack(_ack(second, topic, "failure", "w1"), session)
    session.commit()
    assert status(second) == ("failed", "w1")
    apply_ack(_ack(second, topic, "failure", "w1"), session)
    apply_ack(_ack(second, topic, "success", "w2"), session)
    session.commit()
    assert status(second) == ("acked", "w2")


def test_an_ack_that_comes_before_the_relay_marks_its_message_sent_still_counts(
    settings: Settings, engine, session: Session, topic: str
):
    _topic_with_groups(session, topic)
    publisher = Publisher(settings)
    early_success = publisher.publish(session, topic, {"order": 1}, key="o-1")
    early_failure = publisher.publish(session, topic, {"order": 2}, key="o-2")
    session.commit()

    # Given a consumer fast enough that its acks are applied before the relay's mark
    # commits (here the mark simply comes later)
    apply_ack(_ack(early_success, topic, "success", "w1"), session)
    apply_ack(_ack(early_failure, topic, "failure", "w1"), session)
    # and an ack of a message that is not ours, which must open nothing
    apply_ack(_ack(uuid.uuid4(), topic, "success", "w1"), session)
    session.commit()

    # When the relay marks them sent
    assert Relay(settings, sessions=make_sessionmaker(engine)).run().sent == 2

    # Then the success stands (no retry, no false dead letter), the failure waits for its
    # retry, and nothing else was opened
    session.expire_all()
    deliveries = dict(session.execute(select(Delivery.message_id, Delivery.status)).all())
    assert deliveries == {early_success: "acked", early_failure: "failed"}


def test_a_lane_batch_of_acks_moves_each_delivery_as_one_by_one_would(
    settings: Settings, engine, session: Session, topic: str
):
    _topic_with_groups(session, topic)
    publisher = Publisher(settings)
    acked, retried, failing = (
        publisher.publish(session, topic, {"n": n}, key=f"o-{n}") for n in range(3)
    )
    session.commit()
    assert Relay(settings, sessions=make_sessionmaker(engine)).run().sent == 3
    unmarked = publisher.publish(session, topic, {"n": 3}, key="o-3")  # its mark comes later
    session.commit()

    def ack(message_id: uuid.UUID, status: str, instance: str) -> tuple[str, dict]:
        return str(message_id), _ack(message_id, topic, status, instance).payload

    # One lane batch of the acks group, in this order
    rows = receive(
        session,
        "outbox-acks",
        ACK_TOPIC,
        [
            ack(acked, "success", "w1"),
            ack(acked, "success", "w2"),  # a second success: the first one stands
            ack(retried, "failure", "w1"),
            ack(retried, "success", "w2"),  # a later attempt's success wins
            ack(failing, "failure", "w3"),
            ack(unmarked, "success", "w4"),  # before the relay's mark opens the delivery
            ack(uuid.uuid4(), "success", "w5"),  # not ours: opens nothing
            ("x", {"status": "success", "group": "billing"}),  # not an ack
        ],
    )
    report = LaneProcessor(settings, make_sessionmaker(engine), "w").run("outbox-acks", 0)
    assert (report.done, report.dead) == (7, 1)
    session.expire_all()
    statuses = dict(
        session.execute(
            select(InboxMessage.message_id, InboxMessage.status).where(
                InboxMessage.consumer_group == "outbox-acks"
            )
        ).all()
    )
    assert [statuses[r] for r in rows] == ["done"] * 7 + ["dead"]

    assert Relay(settings, sessions=make_sessionmaker(engine)).run().sent >= 1
    session.expire_all()
    deliveries = {
        d.message_id: (d.status, d.instance_id, d.error) for d in session.scalars(select(Delivery))
    }
    assert deliveries == {
        acked: ("acked", "w1", None),
        retried: ("acked", "w2", None),
        failing: ("failed", "w3", "boom"),
        unmarked: ("acked", "w4", None),
    }


def test_a_burst_of_acks_reads_each_delivery_once_whatever_the_statistics_say(
    engine, session: Session, topic: str
):
    _topic_with_groups(session, topic)
    billing = session.scalars(select(ConsumerGroup.id).where(ConsumerGroup.name == "billing")).one()
    # Statistics taken in a quiet moment: no delivery waits
    session.add_all(
        Delivery(message_id=uuid.uuid4(), consumer_group_id=billing, status="acked")
        for _ in range(200)
    )
    session.commit()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE deliveries"))
    # then a burst: 5,000 deliveries wait, and the acks of 500 of them come in one batch
    waiting = [uuid.uuid4() for _ in range(5_000)]
    session.add_all(Delivery(message_id=m, consumer_group_id=billing) for m in waiting)
    session.commit()
    acks = [
        {"message_id": str(m), "group": "billing", "topic": topic, "instance": "w1"}
        for m in waiting[:500]
    ]

    (plan,) = session.execute(
        text("EXPLAIN (ANALYZE, FORMAT JSON) " + queries.APPLY_SUCCESS_ACKS.text),
        {"acks": json.dumps(acks)},
    ).scalar_one()
    session.commit()

    # Each ack finds its delivery by index: a few rows read per ack, not a scan of the
    # waiting deliveries per ack (or of the acks per delivery)
    assert rows_read(plan, "deliveries") <= 3 * len(acks)
    acked = select(func.count()).select_from(Delivery).where(Delivery.instance_id == "w1")
    assert session.scalar(acked) == 500


def test_a_batch_of_success_acks_moves_its_waiting_deliveries_in_one_statement(
    engine, session: Session, topic: str
):
    _topic_with_groups(session, topic)
    billing = session.scalars(select(ConsumerGroup.id).where(ConsumerGroup.name == "billing")).one()
    waiting = [uuid.uuid4() for _ in range(50)]
    session.add_all(Delivery(message_id=m, consumer_group_id=billing) for m in waiting)
    session.commit()
    statements: list[str] = []

    def seen(conn, cursor, statement, parameters, context, executemany) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", seen)
    try:
        apply_acks([_ack(m, topic, "success", "w1") for m in waiting], session)
        session.commit()
    finally:
        event.remove(engine, "before_cursor_execute", seen)

    # Every delivery was found and moved by the first statement: none is tried again
    assert sum("UPDATE deliveries" in s for s in statements) == 1
    session.expire_all()
    moved = session.execute(select(Delivery.status, Delivery.instance_id)).all()
    assert collections.Counter(moved) == {("acked", "w1"): 50}
