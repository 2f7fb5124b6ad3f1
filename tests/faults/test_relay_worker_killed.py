"""A relay worker SIGKILLed after producing a batch and before marking it sent."""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from outbox import Message, Publisher
from outbox.models import OutboxMessage
from outbox.registry import register_topic
from outbox.settings import Settings
from tasks.factory import make_celery
from tests.kafka_helpers import consume_all
from tests.processes import start_worker

LEASE_S = 5.0


def _pending(session: Session) -> int:
    session.rollback()
    return (
        session.scalar(
            select(func.count()).select_from(OutboxMessage).where(OutboxMessage.status != "sent")
        )
        or 0
    )


def test_nothing_is_lost_only_the_killed_batch_repeats_and_its_leases_move_in_time(
    settings: Settings, session: Session, topic: str, tmp_path: Path
):
    s = settings.replace(
        relay_lease_s=LEASE_S,
        relay_delivery_timeout_ms=3000,
        buckets=8,
        relay_buckets_per_task=8,
        relay_batch_size=500,
    )
    register_topic(session, topic)
    ids = Publisher(s).publish_batch(
        session, [Message(topic, {"seq": i // 10}, key=f"k{i % 10}") for i in range(1500)]
    )
    session.commit()
    app = make_celery(s)
    marker = tmp_path / "paused.json"

    # Given a worker whose relay stops between produce and mark
    first = start_worker(
        s,
        "doomed",
        tmp_path,
        env={
            "OUTBOX_HANDLER_MODULES": "tests.faults.pause_relay",
            "OUTBOX_TEST_PAUSE_FILE": str(marker),
        },
    )
    second = None
    try:
        first.wait_ready()
        app.send_task("outbox.publish")
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), first.text()[-3000:]
        paused = json.loads(marker.read_text())
        in_flight = set(paused["ids"])
        assert 0 < len(in_flight) <= 500
        # Its batch is in Kafka, yet not marked sent
        assert len(consume_all(s.kafka_bootstrap, topic, len(in_flight), timeout_s=30)) >= len(
            in_flight
        )
        # and its claim stands on the leases of exactly its rows' buckets
        rows = session.execute(
            select(OutboxMessage.status, OutboxMessage.bucket).where(
                OutboxMessage.id.in_(in_flight)
            )
        ).all()
        assert {status for status, _ in rows} == {"pending"}
        claimed = session.scalars(
            text(
                "SELECT bucket FROM leases WHERE scope = 'relay' AND claim_token = :token "
                "AND claims_until > now()"
            ),
            {"token": paused["token"]},
        )
        assert set(claimed) == {bucket for _, bucket in rows}

        # When it is killed and another worker relays
        first.kill()
        killed_at = session.scalar(text("SELECT clock_timestamp()"))
        session.rollback()
        second = start_worker(s, "survivor", tmp_path)
        second.wait_ready()
        deadline = time.monotonic() + 90
        while _pending(session) and time.monotonic() < deadline:
            app.send_task("outbox.publish")
            time.sleep(0.2)
        session.rollback()
        # The killed batch went out again once its claim and bucket leases had lapsed.
        resent_at = session.scalar(
            select(func.min(OutboxMessage.sent_at)).where(OutboxMessage.id.in_(in_flight))
        )
        taken_over_after = (resent_at - killed_at).total_seconds() if resent_at else None
        doomed_leases = session.scalar(
            text("SELECT count(*) FROM leases WHERE owner = :owner AND expires_at > now()"),
            {"owner": paused["owner"]},
        )

        # Then every row is sent, its leases moved within the lease time (plus slack for
        # the worker's start), and only the killed batch may have gone out twice
        assert _pending(session) == 0, second.text()[-3000:]
        assert taken_over_after is not None and taken_over_after <= LEASE_S + 10
        assert doomed_leases == 0
        received = consume_all(s.kafka_bootstrap, topic, 1500)
        counts = collections.Counter(m.message_id for m in received)
        assert set(counts) == {str(i) for i in ids}
        repeated = {mid for mid, n in counts.items() if n > 1}
        in_flight_ids = {
            str(m)
            for m in session.scalars(
                select(OutboxMessage.message_id).where(OutboxMessage.id.in_(in_flight))
            )
        }
        assert repeated <= in_flight_ids
        assert sum(counts.values()) - len(counts) <= 500
    finally:
        first.stop()
        if second is not None:
            second.stop()
