"""A relay stalls past its lease in the middle of one key's backlog; another takes over."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from outbox import Message, Publisher
from outbox.db import make_sessionmaker
from outbox.models import OutboxMessage
from outbox.producer import DeliveryReport, Outgoing
from outbox.registry import register_topic
from outbox.relay import Relay
from outbox.settings import Settings
from tests.kafka_helpers import consume_all

ROWS = 200
LEASE_S = 3.0


def _unsent(session: Session) -> int:
    session.rollback()
    return session.scalar(select(func.count()).where(OutboxMessage.status != "sent")) or 0


def test_a_relay_stalled_after_its_third_claim_never_lets_later_rows_of_the_key_overtake(
    settings: Settings, engine, session: Session, topic: str
):
    """The stall is injected where the relay hands its claimed batch to the (real)
    producer: its third batch waits there, as a process stopped by SIGSTOP or a long GC
    pause would, until well after its lease ran out. Between its claims it also waits a
    moment, so that its claims are spread over a third of the lease."""
    s = settings.replace(
        relay_batch_size=10,
        relay_lease_s=LEASE_S,
        relay_delivery_timeout_ms=2000,
        buckets=4,
        relay_buckets_per_task=4,
    )
    register_topic(session, topic)
    session.commit()
    Publisher(s).publish_batch(
        session, [Message(topic, {"n": i}, key="one-key") for i in range(ROWS)]
    )
    session.commit()

    stalled = Relay(s, sessions=make_sessionmaker(engine))
    send = stalled.producer.send
    calls = 0
    in_stall = threading.Event()
    resume = threading.Event()

    def slow_send(rows: Sequence[Outgoing]) -> list[DeliveryReport]:
        nonlocal calls
        calls += 1
        if calls < 3:
            time.sleep(0.3)
        elif calls == 3:
            in_stall.set()
            resume.wait(60)
        return send(rows)

    stalled.producer.send = slow_send  # type: ignore[method-assign]
    first = threading.Thread(target=lambda: stalled.run(budget_s=60))
    first.start()
    other = Relay(s, sessions=make_sessionmaker(engine))
    try:
        # Given the first relay stalls right after its third claim committed
        assert in_stall.wait(30)
        # When another relay keeps running through the stall, past both leases
        deadline = time.monotonic() + 60
        stall_ends = time.monotonic() + 2.5 * LEASE_S
        while time.monotonic() < deadline and (_unsent(session) or time.monotonic() < stall_ends):
            other.run(budget_s=2)
            time.sleep(0.05)
        # and the first one wakes up and sends its stale batch
        resume.set()
        first.join(60)
        assert not first.is_alive()

        # Then every row was sent, and in Kafka the first copy of each message comes in
        # the order of publication (a later copy of the stale batch is a harmless repeat)
        assert _unsent(session) == 0
        received = consume_all(s.kafka_bootstrap, topic, ROWS)
        firsts: list[int] = []
        for m in sorted(received, key=lambda m: (m.partition, m.offset)):
            if m.value["n"] not in firsts:
                firsts.append(m.value["n"])
        assert firsts == list(range(ROWS))
    finally:
        resume.set()
        first.join(60)
        stalled.close()
        other.close()
