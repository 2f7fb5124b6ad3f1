"""A broker paused for longer than the delivery timeout fences the relay's producer."""

from __future__ import annotations

import os
import signal
import time

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from outbox import Message, Publisher
from outbox.db import make_sessionmaker
from outbox.devstack.broker import EmbeddedKafka
from outbox.health import redis_client
from outbox.metrics import read_counters
from outbox.models import OutboxMessage
from outbox.registry import register_topic
from outbox.relay import Relay
from outbox.settings import Settings
from tests.kafka_helpers import consume_all


def _publish(publisher: Publisher, session: Session, topic: str, start: int, n: int) -> None:
    publisher.publish_batch(
        session, [Message(topic, {"n": i}, key=f"k{i % 7}") for i in range(start, start + n)]
    )
    session.commit()


def test_a_fenced_producer_is_replaced_and_no_row_spends_an_attempt(
    settings: Settings, engine, session: Session, topic: str, own_broker: EmbeddedKafka
):
    """The Tansu broker answers every produce of an idempotent producer with PRODUCER_FENCED
    once it was paused past the producer's delivery timeout; librdkafka reports that in
    each delivery report only (not as a fatal error), so the producer stays unusable."""
    s = settings.replace(
        kafka_bootstrap=own_broker.bootstrap,
        relay_delivery_timeout_ms=1500,
        relay_lease_s=5.0,
        relay_circuit_open_s=0.2,
        relay_max_attempts=3,
    )
    register_topic(session, topic)
    session.commit()
    publisher = Publisher(s)
    relay = Relay(s, sessions=make_sessionmaker(engine))
    try:
        _publish(publisher, session, topic, 0, 50)
        assert relay.run(budget_s=10).sent == 50

        # Given the broker stops answering for longer than the delivery timeout mid-batch
        _publish(publisher, session, topic, 50, 200)
        assert own_broker.proc is not None
        os.kill(own_broker.proc.pid, signal.SIGSTOP)
        try:
            relay.run(budget_s=5)
            time.sleep(1.0)
        finally:
            os.kill(own_broker.proc.pid, signal.SIGCONT)

        # When the relay goes on after the broker is back, more passes than attempts
        _publish(publisher, session, topic, 250, 200)
        deadline = time.monotonic() + 60
        passes = 0
        while time.monotonic() < deadline:
            relay.run(budget_s=5)
            passes += 1
            session.rollback()
            left = session.scalar(select(func.count()).where(OutboxMessage.status != "sent"))
            if not left and passes > s.relay_max_attempts:
                break
            time.sleep(0.3)

        # Then every row is sent, none spent an attempt, and the producer was replaced
        session.rollback()
        rows = session.execute(select(OutboxMessage.status, OutboxMessage.attempts)).all()
        assert {(status, attempts) for status, attempts in rows} == {("sent", 0)}
        assert len(rows) == 450
        received = consume_all(s.kafka_bootstrap, topic, 450)
        assert {m.value["n"] for m in received} == set(range(450))
        # and an operator sees the replacement in the metrics
        assert s.redis_url is not None
        counters = read_counters(redis_client(s.redis_url), circuit_max_age_s=60)
        assert sum(counters["producer_replaced"].values()) >= 1
    finally:
        relay.close()
