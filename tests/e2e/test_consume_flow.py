"""From the API to a handler's effect, through the relay, Kafka, a consumer process, the
inbox and Celery lane tasks on a real worker: every effect once, in order per key;
failures back off with growing gaps; a poison message goes dead and blocks nobody."""

from __future__ import annotations

import collections
import itertools
import time

import pytest
from confluent_kafka import Consumer as KafkaConsumer
from confluent_kafka import Producer, TopicPartition
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from outbox.models import InboxMessage
from tests.flow import AUTH, Flow


def test_ten_thousand_messages_reach_their_handler_once_each_in_order_per_key(
    flow: Flow, session: Session
):
    # Given 10,000 messages over 100 keys, published through the API
    total, keys = 10_000, 100
    ids = flow.publish(
        [{"key": f"k{i % keys}", "payload": {"seq": i // keys}} for i in range(total)]
    )

    # When the relay, the consumer and the lane tasks have done their work
    flow.wait(lambda: flow.scalar("SELECT count(*) FROM effects") >= total, 180, "10,000 effects")
    time.sleep(1.0)  # anything extra would show up now

    # Then each message had exactly one effect, on its first attempt
    effects = flow.scalar("SELECT count(*) FROM effects")
    assert effects == total
    effect_ids = {str(i) for i in session.scalars(text("SELECT message_id FROM effects"))}
    assert effect_ids == set(ids)
    statuses = dict(
        session.execute(
            select(InboxMessage.status, func.count())
            .where(InboxMessage.consumer_group == flow.group)
            .group_by(InboxMessage.status)
        ).all()
    )
    assert statuses == {"done": total}
    assert flow.scalar("SELECT max(attempt) FROM attempts") == 1
    # And in the order of publication within each key
    per_key: dict[str, list[int]] = collections.defaultdict(list)
    for key, seq in session.execute(text("SELECT key, seq FROM effects ORDER BY at, seq")):
        per_key[key].append(seq)
    assert len(per_key) == keys
    assert all(seqs == list(range(total // keys)) for seqs in per_key.values())


def test_a_failing_message_succeeds_on_attempt_four_with_growing_gaps_and_a_poison_one_goes_dead(
    flow: Flow, session: Session
):
    # Given a message failing three times, a poison message, and messages of other keys
    flaky, poison, *_others = flow.publish(
        [
            {"key": "flaky", "payload": {"fail_times": 3, "seq": 0}},
            {"key": "poison", "payload": {"poison": True, "seq": 0}},
        ]
        + [{"key": f"k{i}", "payload": {"seq": i}} for i in range(50)]
    )

    # Then the other keys flow at once, whatever the poison message does
    flow.wait(
        lambda: flow.scalar("SELECT count(*) FROM effects WHERE key LIKE 'k%'") == 50,
        60,
        "the other keys' effects",
    )
    assert flow.scalar("SELECT count(*) FROM effects WHERE message_id = :id", id=poison) == 0

    # And the flaky message succeeds on its fourth attempt, the waits between attempts growing
    flow.wait(
        lambda: flow.scalar("SELECT attempt FROM effects WHERE message_id = :id", id=flaky) == 4,
        60,
        "the flaky message's effect",
    )
    times = [
        at.timestamp()
        for at in session.scalars(
            text(
                "SELECT min(at) FROM attempts WHERE message_id = :id "
                "GROUP BY attempt ORDER BY attempt"
            ),
            {"id": flaky},
        )
    ]
    assert len(times) == 4
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # Each wait falls in its backoff band, and the bands grow: 0-0.3 s, 0.3-0.9 s,
    # 0.9-2.7 s (base 0.3 s, factor 3; the first wait is drawn from zero up). A row is
    # never taken before its band's time (counted from when its failure was recorded,
    # after its handler ran); it may be taken later, by up to a lane task's pick-up on a
    # busy machine.
    for gap, (low, high) in zip(gaps, [(0.0, 0.3), (0.3, 0.9), (0.9, 2.7)], strict=True):
        assert low <= gap <= high + 1.5, gaps

    # And the poison message is dead after its five attempts, once each
    flow.wait(
        lambda: (
            flow.scalar("SELECT status FROM inbox_messages WHERE message_id = :id", id=poison)
            == "dead"
        ),
        60,
        "the poison message to go dead",
    )
    assert flow.scalar("SELECT count(*) FROM attempts WHERE message_id = :id", id=poison) == 5
    error = flow.scalar("SELECT last_error FROM inbox_messages WHERE message_id = :id", id=poison)
    assert "cannot process this message" in error
    assert flow.scalar("SELECT count(*) FROM effects") == 51

    # When the handler is fixed and the dead letter requeued through the API
    dead = flow.client.get(f"/v1/dead-letters?group={flow.group}", headers=AUTH).get_json()
    assert [d["message_id"] for d in dead["items"]] == [poison]
    with flow.engine.begin() as conn:
        conn.execute(text("INSERT INTO fixes VALUES (:id)"), {"id": poison})
    requeued = flow.client.post(f"/v1/dead-letters/{dead['items'][0]['id']}/requeue", headers=AUTH)
    assert requeued.status_code == 200

    # Then it is processed once, keeping its id, and leaves the dead letters
    flow.wait(
        lambda: flow.scalar("SELECT count(*) FROM effects WHERE message_id = :id", id=poison) == 1,
        30,
        "the requeued message's effect",
    )
    assert flow.scalar("SELECT status FROM inbox_messages WHERE message_id = :id", id=poison) == (
        "done"
    )
    time.sleep(1.0)
    assert flow.scalar("SELECT count(*) FROM effects") == 52
    left = flow.client.get(f"/v1/dead-letters?group={flow.group}", headers=AUTH).get_json()
    assert left["items"] == []


# Lane tasks yield after 0.2 s, so that a lane with rows left gets a task of its own,
# which either worker may take (with the default budget one task can run a whole burst).
@pytest.mark.parametrize(
    "flow",
    [{"workers": 2, "requires_ack": True, "settings": {"lane_budget_s": 0.2}}],
    indirect=True,
)
def test_two_workers_keep_per_key_order_a_kafka_duplicate_has_one_effect_and_acks_land(
    flow: Flow, session: Session
):
    # Given 2,000 messages over 20 keys for an ordered group that requires acks, each
    # taking its handler a millisecond or two: more than one lane task's budget in all
    total, keys = 2_000, 20
    ids = flow.publish(
        [
            {"key": f"k{i % keys}", "payload": {"seq": i // keys, "sleep_ms": 2}}
            for i in range(total)
        ]
    )
    # And one of them delivered by Kafka a second time (an upstream producer's retry)
    flow.wait(lambda: flow.scalar("SELECT count(*) FROM effects") >= 1, 60, "a first effect")
    duplicate = Producer({"bootstrap.servers": flow.settings.kafka_bootstrap})
    duplicate.produce(
        flow.topic,
        key=b"k0",
        value=b'{"seq": 0}',
        headers=[("message_id", ids[0].encode())],
    )
    assert duplicate.flush(10) == 0

    # When everything has been processed and acknowledged
    def acked() -> int:
        return flow.scalar(
            "SELECT count(*) FROM deliveries d JOIN consumer_groups g "
            "ON g.id = d.consumer_group_id WHERE g.name = :group AND d.status = 'acked'",
            group=flow.group,
        )

    def consumed() -> int:
        # The group's committed offsets: every message read, the duplicate included.
        probe = KafkaConsumer(
            {"bootstrap.servers": flow.settings.kafka_bootstrap, "group.id": flow.group}
        )
        partitions = probe.list_topics(flow.topic, timeout=10).topics[flow.topic].partitions
        committed = probe.committed([TopicPartition(flow.topic, p) for p in partitions], 10)
        probe.close()
        return sum(max(tp.offset, 0) for tp in committed)

    flow.wait(lambda: acked() >= total, 180, "every delivery acked")
    flow.wait(lambda: consumed() == total + 1, 30, "the duplicate to be read")
    time.sleep(1.0)

    # Then each message had one effect, the duplicate none, in order per key
    assert flow.scalar("SELECT count(*) FROM effects") == total
    assert flow.scalar("SELECT count(DISTINCT message_id) FROM effects") == total
    per_key: dict[str, list[int]] = collections.defaultdict(list)
    for key, seq in session.execute(text("SELECT key, seq FROM effects ORDER BY at, seq")):
        per_key[key].append(seq)
    assert all(seqs == list(range(total // keys)) for seqs in per_key.values())
    # And both workers ran the group's messages, and every delivery ended acked, by the
    # instance that ran it
    workers = "SELECT count(DISTINCT worker) FROM inbox_messages WHERE consumer_group = :group"
    assert flow.scalar(workers, group=flow.group) == 2
    assert acked() == total
    mismatched = flow.scalar(
        "SELECT count(*) FROM deliveries d JOIN inbox_messages i USING (message_id) "
        "WHERE d.instance_id IS DISTINCT FROM i.worker"
    )
    assert mismatched == 0


# Beat's relay tick a minute apart: only a kick relays a row in time.
@pytest.mark.parametrize(
    "flow", [{"requires_ack": True, "settings": {"publish_interval_s": 60.0}}], indirect=True
)
def test_an_ack_goes_back_at_once_not_at_the_relays_next_tick(flow: Flow):
    # Given a message for a group that requires acks (the API's kick relays it)
    (message_id,) = flow.publish([{"key": "k0", "payload": {"seq": 0}}])

    # Then its ack is relayed, consumed and applied within seconds: the lane task that
    # wrote it kicked the relay
    def status() -> str | None:
        return flow.scalar(
            "SELECT status FROM deliveries WHERE message_id = CAST(:m AS uuid)", m=message_id
        )

    flow.wait(lambda: status() == "acked", 20, "the delivery acked")
