"""Targeted retry on a real PostgreSQL: due deliveries get one retry row each, aimed at
a healthy worker other than the one that failed; max_retries ends them dead (-1 never);
two retry runs at once never publish a retry twice; failure acks back off."""

from __future__ import annotations

import threading
import uuid

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api import create_app
from consumer.acks import apply_ack
from consumer.handlers import Message
from consumer.inbox import absorb_retries, record
from outbox import queries
from outbox.agents import upsert_agent
from outbox.cleanup import cleanup
from outbox.db import make_sessionmaker
from outbox.models import ConsumerGroup, InboxMessage
from outbox.publishing import Publisher
from outbox.registry import GroupSpec, put_group, register_topic
from outbox.retry import RetryPolicy
from outbox.settings import Settings
from outbox.targeted_retry import choose_target, retry_due
from tests.inbox import receive

TOPIC = "retry.orders"


@pytest.fixture
def published(settings: Settings, session: Session) -> uuid.UUID:
    """One message sent to a topic with group ``billing`` (acks, 2 retries) and group
    ``audit`` (acks, retries forever); both deliveries wait for their ack."""
    register_topic(session, TOPIC)
    put_group(session, GroupSpec(name="billing", topic=TOPIC, requires_ack=True, max_retries=2))
    put_group(session, GroupSpec(name="audit", topic=TOPIC, requires_ack=True, max_retries=-1))
    message_id = Publisher(settings).publish(
        session, TOPIC, {"total": 5}, key="order-1", idempotency_key="pay-1"
    )
    session.execute(
        text("UPDATE outbox_messages SET status = 'sent', sent_at = now() WHERE message_id = :m"),
        {"m": message_id},
    )
    session.execute(
        text(
            "INSERT INTO deliveries (message_id, consumer_group_id, status, next_retry_at)"
            " SELECT :m, id, 'awaiting_ack', now() + interval '1 hour' FROM consumer_groups"
        ),
        {"m": message_id},
    )
    session.commit()
    return message_id


def _fail(session: Session, message_id: uuid.UUID, group: str, instance: str) -> None:
    """A failure ack from ``instance``, and its backoff skipped: the delivery is due."""
    ack = {
        "message_id": str(message_id),
        "topic": TOPIC,
        "group": group,
        "status": "failure",
        "instance": instance,
        "attempt": 1,
        "error": "boom",
    }
    apply_ack(Message(uuid.uuid4(), "outbox.acks", None, ack, {}, 1, 0, 0), session)
    session.execute(text("UPDATE deliveries SET next_retry_at = now() WHERE status = 'failed'"))
    session.commit()


def _retries(session: Session) -> list[dict]:
    session.expire_all()
    rows = session.execute(
        text(
            "SELECT message_id, original_message_id, target_group, target_instance, key,"
            " payload, headers, idempotency_key, status FROM outbox_messages"
            " WHERE is_retry ORDER BY id"
        )
    ).mappings()
    return [dict(r) for r in rows]


def _delivery(session: Session, group: str) -> dict:
    session.expire_all()
    return dict(
        session.execute(
            text(
                "SELECT d.status, d.attempts, d.next_retry_at > now() AS waits FROM deliveries d"
                " JOIN consumer_groups g ON g.id = d.consumer_group_id WHERE g.name = :g"
            ),
            {"g": group},
        )
        .mappings()
        .one()
    )


def test_a_failed_delivery_is_retried_at_a_healthy_worker_other_than_the_one_that_failed(
    settings: Settings, engine: Engine, session: Session, published: uuid.UUID
):
    for worker in ("w1@host", "w2@host", "w3@host"):
        upsert_agent(session, worker, "worker")
    session.execute(text("UPDATE agents SET active = false WHERE instance_id = 'w3@host'"))
    session.commit()
    _fail(session, published, "billing", "w1@host")

    report = retry_due(settings, make_sessionmaker(engine))

    assert report.as_dict() == {"retried": 1, "untargeted": 0, "dead": 0}
    (retry,) = _retries(session)
    assert retry["original_message_id"] == published != retry["message_id"]
    assert (retry["target_group"], retry["target_instance"]) == ("billing", "w2@host")
    assert (retry["key"], retry["payload"], retry["idempotency_key"]) == (
        "order-1",
        {"total": 5},
        "pay-1",
    )
    assert retry["status"] == "pending"
    headers = retry["headers"]
    assert headers["message_id"] == str(published)  # the group's inbox knows it
    assert (headers["target_group"], headers["target_instance"]) == ("billing", "w2@host")
    assert headers["retry_attempt"] == "1"
    assert _delivery(session, "billing") == {"status": "awaiting_ack", "attempts": 1, "waits": True}
    # The other group still waits for its ack; nothing was due for it.
    assert _delivery(session, "audit")["attempts"] == 0
    # Not due again: a second run publishes nothing.
    assert retry_due(settings, make_sessionmaker(engine)).retried == 0


def test_a_retry_with_no_healthy_worker_goes_to_any_instance_and_never_to_an_inactive_one():
    message_id = uuid.uuid4()
    assert choose_target(message_id, "w1", []) is None
    assert choose_target(message_id, "w1", ["w1"]) == "w1"  # the only one left
    assert {choose_target(uuid.uuid4(), "w1", ["w1", "w2", "w3"]) for _ in range(50)} == {
        "w2",
        "w3",
    }


def test_max_retries_ends_dead_after_exactly_three_attempts_and_minus_one_never(
    settings: Settings, engine: Engine, session: Session, published: uuid.UUID
):
    sessions = make_sessionmaker(engine)
    attempts = 1  # the first delivery
    for _ in range(10):
        _fail(session, published, "billing", "w1@host")
        _fail(session, published, "audit", "w1@host")
        report = retry_due(settings, sessions)
        if report.dead:
            break
        attempts += 1
    assert attempts == 3  # the first delivery and two retries
    assert _delivery(session, "billing")["status"] == "dead"
    # The audit group retries forever: still retrying after as many rounds again.
    for _ in range(8):
        _fail(session, published, "audit", "w1@host")
        assert retry_due(settings, sessions).retried == 1
    assert _delivery(session, "audit")["status"] == "awaiting_ack"
    assert _delivery(session, "audit")["attempts"] >= 10
    assert len([r for r in _retries(session) if r["target_group"] == "billing"]) == 2


def test_two_retry_runs_at_once_never_publish_the_same_retry_twice(
    settings: Settings, engine: Engine, session: Session
):
    register_topic(session, TOPIC)
    put_group(session, GroupSpec(name="billing", topic=TOPIC, requires_ack=True, max_retries=5))
    session.commit()
    with engine.begin() as conn:
        conn.execute(
            text(
                "WITH m AS (INSERT INTO outbox_messages (message_id, topic, payload, bucket,"
                " status, sent_at) SELECT gen_random_uuid(), :t, '{}', 0, 'sent', now()"
                " FROM generate_series(1, 3000) RETURNING message_id)"
                " INSERT INTO deliveries (message_id, consumer_group_id, status, next_retry_at)"
                " SELECT m.message_id, g.id, 'failed', now() FROM m, consumer_groups g"
            ),
            {"t": TOPIC},
        )
    s = settings.replace(retry_batch_size=200)
    reports = []
    runs = [
        threading.Thread(target=lambda: reports.append(retry_due(s, make_sessionmaker(engine))))
        for _ in range(2)
    ]
    for run in runs:
        run.start()
    for run in runs:
        run.join(60)
    assert sum(r.retried for r in reports) == 3000
    duplicates = session.scalar(
        text(
            "SELECT count(*) FROM (SELECT original_message_id FROM outbox_messages WHERE is_retry"
            " GROUP BY original_message_id HAVING count(*) > 1) d"
        )
    )
    assert duplicates == 0
    assert session.scalar(text("SELECT count(*) FROM outbox_messages WHERE is_retry")) == 3000


def test_a_failure_ack_waits_the_groups_backoff_and_a_late_failure_never_undoes_success(
    settings: Settings, engine: Engine, session: Session, published: uuid.UUID
):
    session.execute(
        text("UPDATE consumer_groups SET retry_base_s = 60, retry_factor = 2 WHERE name = 'audit'")
    )
    session.commit()
    ack = {
        "message_id": str(published),
        "topic": TOPIC,
        "group": "audit",
        "status": "failure",
        "instance": "w1@host",
        "attempt": 1,
        "error": "boom",
    }
    wait_sql = text(
        "SELECT EXTRACT(EPOCH FROM d.next_retry_at - now()) FROM deliveries d"
        " JOIN consumer_groups g ON g.id = d.consumer_group_id WHERE g.name = 'audit'"
    )
    policy = RetryPolicy(base_s=60, factor=2)
    apply_ack(Message(uuid.uuid4(), "outbox.acks", None, ack, {}, 1, 0, 0), session)
    session.commit()
    wait = float(session.scalar(wait_sql))
    assert policy.floor(1) - 1 <= wait <= policy.ceiling(1)  # [0, base]: the first band
    # After two targeted retries, a failure waits the third band: [120, 240] s.
    session.execute(text("UPDATE deliveries SET status = 'awaiting_ack', attempts = 2"))
    apply_ack(Message(uuid.uuid4(), "outbox.acks", None, ack, {}, 1, 0, 0), session)
    session.commit()
    wait = float(session.scalar(wait_sql))
    assert policy.floor(3) - 1 <= wait <= policy.ceiling(3)
    session.execute(text("UPDATE deliveries SET status = 'awaiting_ack'"))
    session.commit()
    for status in ("success", "success", "failure"):  # a duplicate, then a late failure
        apply_ack(
            Message(uuid.uuid4(), "outbox.acks", None, dict(ack, status=status), {}, 1, 0, 0),
            session,
        )
        session.commit()
    assert _delivery(session, "audit")["status"] == "acked"


def test_a_retry_is_forced_over_http_and_an_acked_delivery_is_refused(
    settings: Settings, engine: Engine, session: Session, published: uuid.UUID
):
    client = create_app(settings.replace(api_tokens=("t",))).test_client()
    auth = {"Authorization": "Bearer t"}
    forced = client.post(f"/v1/deliveries/{published}/billing/retry", headers=auth)
    assert forced.status_code == 200, forced.get_json()
    assert forced.get_json()["status"] == "awaiting_ack"
    assert _delivery(session, "billing")["waits"] is False  # due now
    missing = client.post(f"/v1/deliveries/{published}/nobody/retry", headers=auth)
    assert missing.status_code == 404
    session.execute(text("UPDATE deliveries SET status = 'acked'"))
    session.commit()
    refused = client.post(f"/v1/deliveries/{published}/billing/retry", headers=auth)
    assert refused.status_code == 409
    assert refused.get_json()["error"]["details"]["group"] == "billing"


def test_a_groups_inbox_settles_a_retry_by_what_it_already_did(
    settings: Settings, engine: Engine, session: Session
):
    register_topic(session, TOPIC)
    session.commit()
    (done,) = receive(
        session, "billing", TOPIC, [("k1", {})], status="done", worker="w1@host", attempts=1, lane=1
    )
    (dead,) = receive(session, "billing", TOPIC, [("k2", {})], status="dead", attempts=10, lane=2)
    fresh = uuid.uuid4()  # not in the inbox: recording it is record()'s work

    def retry(message_id: uuid.UUID, target: str) -> dict:
        return {
            "message_id": message_id,
            "headers": {
                "message_id": str(message_id),
                "target_group": "billing",
                "target_instance": target,
                "retry_attempt": "1",
            },
        }

    with make_sessionmaker(engine).begin() as tx:
        lanes = absorb_retries(
            tx,
            "billing",
            [retry(done, "w2@host"), retry(dead, "w2@host"), retry(fresh, "w9@host")],
            Publisher(settings),
            {"w2@host"},
        )
    # The processed one is not run again; its success ack goes out again.
    assert lanes == {2: "w2@host"}
    rows = {r.message_id: r for r in session.scalars(select(InboxMessage))}
    assert (rows[done].status, rows[done].retries) == ("done", 0)
    # the dead one runs again with a fresh budget, and its handler is told it is a retry
    assert (rows[dead].status, rows[dead].attempts, rows[dead].retries) == ("received", 0, 1)
    acks = [
        ack
        for payload in session.execute(
            text("SELECT payload FROM outbox_messages WHERE topic = 'outbox.acks'")
        ).scalars()
        for ack in payload["acks"]
    ]
    assert [(a["message_id"], a["status"], a["instance"]) for a in acks] == [
        (str(done), "success", "w1@host")
    ]


def test_a_dead_delivery_is_a_dead_letter_and_its_requeue_retries_it(
    settings: Settings, engine: Engine, session: Session, published: uuid.UUID
):
    session.execute(
        text(
            "UPDATE deliveries d SET status = 'dead', attempts = 2, error = 'no ack'"
            " FROM consumer_groups g WHERE g.id = d.consumer_group_id AND g.name = 'billing'"
        )
    )
    session.commit()
    client = create_app(settings.replace(api_tokens=("t",))).test_client()
    auth = {"Authorization": "Bearer t"}
    listed = client.get("/v1/dead-letters?side=delivery&group=billing", headers=auth).get_json()
    (letter,) = listed["items"]
    assert (letter["message_id"], letter["group"], letter["topic"]) == (
        str(published),
        "billing",
        TOPIC,
    )
    assert (letter["payload"], letter["key"], letter["error"]) == (
        {"total": 5},
        "order-1",
        "no ack",
    )
    requeued = client.post(f"/v1/dead-letters/{letter['id']}/requeue", headers=auth)
    assert requeued.get_json() == {"requeued": {"delivery": 1}}
    assert _delivery(session, "billing") == {"status": "failed", "attempts": 0, "waits": False}
    assert retry_due(settings, make_sessionmaker(engine)).retried == 1


def test_an_inbox_row_keeps_the_workers_of_its_last_hundred_attempts(session: Session):
    register_topic(session, TOPIC)
    (message_id,) = receive(session, "billing", TOPIC, [("k1", {})])
    session.execute(
        text("UPDATE inbox_messages SET attempt_workers = :workers"),
        {"workers": [f"w{n}@host" for n in range(100)]},
    )
    row_id = session.scalars(select(InboxMessage.id)).one()
    session.execute(queries.MARK_INBOX_DONE, {"ids": [row_id], "worker": "w100@host", "add": 1})
    row = session.scalars(select(InboxMessage)).one()
    session.refresh(row)
    assert row.message_id == message_id
    assert row.attempt_workers == [f"w{n}@host" for n in range(1, 101)]


def test_a_processed_message_is_known_past_its_inbox_rows_cleanup_for_the_dedup_window(
    settings: Settings, engine: Engine, session: Session
):
    register_topic(session, TOPIC)
    session.commit()
    (done,) = receive(
        session,
        "billing",
        TOPIC,
        [("k1", {})],
        status="done",
        attempts=1,
        idempotency_key="pay-9",
        processed_at=text("now() - interval '8 days'"),
    )
    # Given cleanup removed the processed row after its retention (7 days)
    report = cleanup(settings, make_sessionmaker(engine))
    assert report.deleted["inbox_done"] == 1
    assert session.scalar(select(func.count()).select_from(InboxMessage)) == 0

    # When Kafka redelivers it, a copy with its idempotency key comes, and a targeted
    # retry of it arrives
    def row(message_id: uuid.UUID, idempotency_key: str | None, **headers: str) -> dict:
        return {
            "consumer_group": "billing",
            "message_id": message_id,
            "idempotency_key": idempotency_key,
            "topic": TOPIC,
            "partition": 0,
            "offset": 7,
            "key": "k1",
            "lane": 1,
            "payload": {},
            "headers": {"message_id": str(message_id), **headers},
        }

    retry = row(done, "pay-9", target_group="billing", retry_attempt="1")
    with make_sessionmaker(engine).begin() as tx:
        lanes = record(tx, [row(done, None), row(uuid.uuid4(), "pay-9"), retry])
        absorb_retries(tx, "billing", [retry], Publisher(settings), set())

    # Then none of them is recorded to run again, and the retry's success ack goes out
    assert lanes == []
    assert session.scalar(select(func.count()).select_from(InboxMessage)) == 0
    acks = [
        ack
        for payload in session.scalars(
            text("SELECT payload FROM outbox_messages WHERE topic = 'outbox.acks'")
        )
        for ack in payload["acks"]
    ]
    assert [(a["message_id"], a["status"]) for a in acks] == [(str(done), "success")]


def test_no_targeted_retry_goes_out_past_the_consumers_dedup_window(
    settings: Settings, engine: Engine, session: Session, published: uuid.UUID
):
    session.execute(
        text(
            "UPDATE outbox_messages SET created_at = now() - interval '91 days';"
            " UPDATE deliveries SET next_retry_at = now()"
        )
    )
    session.commit()
    report = retry_due(settings, make_sessionmaker(engine))
    assert (report.retried, report.dead) == (0, 2)
    errors = session.scalars(text("SELECT error FROM deliveries")).all()
    assert all("dedup window" in e for e in errors)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("retry_base_s", float("inf")),
        ("retry_cap_s", float("nan")),
        ("retry_factor", 1e9),
        ("max_attempts", 0),
        ("handler_timeout_s", 1e6),
    ],
)
def test_the_database_refuses_a_group_whose_backoff_could_not_be_computed(
    session: Session, field: str, value: float
):
    """The library writes groups without the API's validation; the table's own bounds
    keep a backoff that would overflow PostgreSQL's interval (and fail every sweep) out."""
    register_topic(session, TOPIC)
    put_group(session, GroupSpec(name="billing", topic=TOPIC, requires_ack=True))
    session.commit()
    with pytest.raises(IntegrityError, match=f"ck_consumer_groups_{field.removesuffix('_s')}"):
        put_group(session, GroupSpec(name="billing", topic=TOPIC, **{field: value}))
    session.rollback()
    group = session.scalars(select(ConsumerGroup)).one()
    assert (group.requires_ack, getattr(group, field)) == (True, getattr(GroupSpec, field))
