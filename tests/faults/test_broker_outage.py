"""The broker goes away: rows wait with their attempts unspent, then drain when it is back."""

from __future__ import annotations

import collections
import time
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from outbox import Message, Publisher
from outbox.db import make_sessionmaker
from outbox.devstack.broker import EmbeddedKafka
from outbox.models import Lease, OutboxMessage
from outbox.registry import register_topic
from outbox.relay import Relay
from outbox.settings import Settings
from tests.kafka_helpers import consume_all


def _states(session: Session) -> collections.Counter[tuple[str, int]]:
    session.expire_all()
    return collections.Counter(
        (r.status, r.attempts) for r in session.scalars(select(OutboxMessage))
    )


def _claims(session: Session) -> int:
    """Claims recorded on the relay's bucket leases and not settled."""
    return len(session.scalars(select(Lease.bucket).where(Lease.claim_token.is_not(None))).all())


def test_an_outage_opens_the_circuit_spends_no_attempt_and_the_relay_drains_after(
    settings: Settings,
    engine,
    session: Session,
    topic: str,
    own_broker: EmbeddedKafka,
    tmp_path: Path,
):
    s = settings.replace(
        kafka_bootstrap=own_broker.bootstrap,
        relay_delivery_timeout_ms=2000,
        relay_lease_s=5.0,
        relay_circuit_open_s=0.5,
        relay_max_attempts=2,
    )
    register_topic(session, topic)
    session.commit()
    publisher = Publisher(s)
    relay = Relay(s, sessions=make_sessionmaker(engine))
    first = publisher.publish_batch(
        session, [Message(topic, {"n": i}, key=f"k{i % 5}") for i in range(10)]
    )
    session.commit()
    assert relay.run(budget_s=10).sent == 10

    # Given the broker stops while rows keep being committed
    own_broker.stop()
    rest = publisher.publish_batch(
        session, [Message(topic, {"n": i}, key=f"k{i % 5}") for i in range(10, 310)]
    )
    session.commit()

    # When the relay runs during the outage, more often than there are attempts
    for _ in range(4):
        report = relay.run(budget_s=10)
        assert report.sent == 0 and report.failed == 0
        time.sleep(0.6)
    # Then the circuit is open and no row spent an attempt or kept a claim
    assert relay.circuit.state == "open"
    assert _states(session) == {("sent", 0): 10, ("pending", 0): 300}
    assert _claims(session) == 0

    # When the broker returns (empty: it keeps nothing in memory across a restart)
    again = EmbeddedKafka(tmp_path / "again", own_broker.port)
    again.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _states(session)[("sent", 0)] < 310:
            relay.run(budget_s=10)
            time.sleep(0.2)
        # Then everything drains, and every message committed during the outage arrives
        assert _states(session) == {("sent", 0): 310}
        assert _claims(session) == 0
        assert relay.circuit.state == "closed"
        received = consume_all(s.kafka_bootstrap, topic, 300)
        assert {m.message_id for m in received} == {str(i) for i in rest}
        assert not {m.message_id for m in received} & {str(i) for i in first}
    finally:
        relay.close()
        again.stop()
