"""20,000 messages over the API, relayed by four concurrent relay tasks on a real worker."""

from __future__ import annotations

import collections
import re
import time
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api import create_app
from outbox.models import OutboxMessage
from outbox.settings import Settings
from tasks.factory import make_celery
from tests.kafka_helpers import consume_all
from tests.processes import start_worker

TOKEN = "e2e"
TOTAL = 20_000
KEYS = 200


def _unsent(session: Session) -> int:
    session.rollback()
    return (
        session.scalar(
            select(func.count()).select_from(OutboxMessage).where(OutboxMessage.status != "sent")
        )
        or 0
    )


def _senders(log: str) -> set[str]:
    """The relays whose tasks logged rows sent."""
    return set(re.findall(r"relay (relay@\S+): \{'sent': [1-9]", log))


def test_twenty_thousand_messages_arrive_once_each_in_order_per_key(
    settings: Settings, session: Session, topic: str, tmp_path: Path
):
    # Relay tasks that do not linger: four kicked at once share the buckets. (A lingering
    # task lets others in only while its claims find a backlog, and a fast machine may
    # send all 20,000 rows before any joins it: that sharing is tested in test_relay.)
    s = settings.replace(
        api_tokens=(TOKEN,), relay_buckets_per_task=16, buckets=64, relay_linger_ms=0
    )
    client = create_app(s).test_client()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert client.post("/v1/topics", json={"name": topic}, headers=auth).status_code == 201

    # Given 20,000 messages accepted by the API, 100 per key
    ids: list[str] = []
    for start in range(0, TOTAL, 500):
        batch = [
            {"topic": topic, "key": f"key-{i % KEYS}", "payload": {"seq": i // KEYS}}
            for i in range(start, start + 500)
        ]
        response = client.post("/v1/messages", json={"messages": batch}, headers=auth)
        assert response.status_code == 202
        ids += response.get_json()["message_ids"]
    assert _unsent(session) == TOTAL

    # When four relay tasks run at once on a worker with four processes
    worker = start_worker(s, "relay", tmp_path, concurrency=4)
    try:
        worker.wait_ready()
        app = make_celery(s)
        for _ in range(4):
            app.send_task("outbox.publish")
        deadline = time.monotonic() + 180
        while _unsent(session) and time.monotonic() < deadline:
            time.sleep(0.5)
            if _unsent(session):
                app.send_task("outbox.publish")  # as beat would, every tick
        assert _unsent(session) == 0, worker.text()[-3000:]
        # A task logs what it sent as it ends (a lingering one, a second after its work).
        deadline = time.monotonic() + 30
        while len(_senders(worker.text())) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        log = worker.text()
    finally:
        worker.stop()

    # Then more than one relay did the work, none holding another's buckets
    assert len(_senders(log)) >= 2, log[-3000:]
    # And every message is in Kafka exactly once, in order per key
    received = consume_all(s.kafka_bootstrap, topic, TOTAL, timeout_s=120)
    counts = collections.Counter(m.message_id for m in received)
    assert set(counts) == set(ids)
    duplicates = sum(counts.values()) - len(counts)
    assert duplicates == 0
    per_key: dict[str, list[int]] = collections.defaultdict(list)
    for m in sorted(received, key=lambda m: (m.partition, m.offset)):
        per_key[m.key].append(m.value["seq"])
    assert len(per_key) == KEYS
    assert all(seqs == list(range(TOTAL // KEYS)) for seqs in per_key.values())
