"""``outbox.heartbeat`` run by real Celery workers: workers answer over the broker and
become agents, a stopped one goes inactive after the window, and each heartbeat stores a
snapshot that the API serves."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from confluent_kafka import Producer
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from api import create_app
from outbox.agents import list_agents
from outbox.db import make_sessionmaker
from outbox.kafka import admin_client, ensure_topics
from outbox.registry import GroupSpec, put_group, register_topic
from outbox.settings import Settings
from outbox.targeted_retry import retry_due
from tasks.factory import make_celery
from tests.processes import start_worker

TOKEN = "ops-token"
BEAT = "beat@test-host:1"


def _agents(engine: Engine) -> dict[str, dict]:
    with Session(engine) as session:
        return {a["instance_id"]: a for a in list_agents(session)}


def _wait_for(predicate, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def test_workers_become_agents_and_a_silent_one_goes_inactive(
    settings: Settings, engine: Engine, session: Session, tmp_path: Path
):
    s = settings.replace(agent_inactive_after_s=3.0, api_tokens=(TOKEN,))
    topic = f"ops.{uuid.uuid4().hex[:8]}"
    register_topic(session, topic)
    put_group(session, GroupSpec(name="billing", topic=topic, requires_ack=True))
    session.commit()
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO outbox_messages (message_id, topic, payload, bucket, status)"
                " SELECT gen_random_uuid(), :t, '{}', 0, s"
                " FROM unnest(ARRAY['pending','pending','pending','dead','dead']) AS s"
            ),
            {"t": topic},
        )
    # Four messages in Kafka that the group never committed: a lag of four.
    ensure_topics(admin_client(s), [topic], s.kafka_topic_partitions)
    producer = Producer({"bootstrap.servers": s.kafka_bootstrap})
    for n in range(4):
        producer.produce(topic, key=f"k{n}", value=b"{}")
    assert producer.flush(10) == 0

    keeper = start_worker(s, "keeper", tmp_path)
    leaver = start_worker(s, "leaver", tmp_path)
    app = make_celery(s)
    try:
        keeper.wait_ready()
        leaver.wait_ready()
        app.send_task("outbox.heartbeat", kwargs={"beat": BEAT})
        assert _wait_for(lambda: len([a for a in _agents(engine) if "@" in a]) >= 3)
        agents = _agents(engine)
        workers = {i: a for i, a in agents.items() if a["role"] == "worker"}
        assert {i.split("@")[0] for i in workers} == {"keeper", "leaver"}
        for agent in workers.values():
            assert agent["active"] and agent["pid"] > 0
            assert agent["health"]["pool"] == "prefork"
            assert agent["health"]["concurrency"] == 1
        assert agents[BEAT]["role"] == "beat"

        # The heartbeat stores its snapshot after the agents, once the lag is read. Each
        # new worker's own heartbeat stores one too, perhaps before the other worker
        # answered: the latest snapshot counts both workers once every heartbeat is in.
        client = create_app(s).test_client()
        auth = {"Authorization": f"Bearer {TOKEN}"}

        def summary() -> dict:
            response = client.get("/v1/health/summary", headers=auth)
            return response.get_json() if response.status_code == 200 else {}

        assert _wait_for(lambda: summary().get("agents", {}).get("beat") == 1)
        assert _wait_for(lambda: summary()["agents"].get("worker") == 2)
        body = summary()
        assert body["backlog"]["outbox_pending"] == 3
        assert body["backlog"]["outbox_dead"] == 2
        assert body["dead_letters"] == 2
        assert body["counts"]["outbox"] == {topic: {"pending": 3, "dead": 2}}
        assert sum(body["consumer_lag"]["billing"][topic].values()) == 4
        # (the API serving these requests registers itself too, as soon as it serves one)
        assert {role: n for role, n in body["agents"].items() if role != "api"} == {
            "worker": 2,
            "beat": 1,
        }
        assert 0 <= body["age_s"] < 30

        # The leaver stops; after the window, the next heartbeat marks it inactive.
        leaver.stop()
        time.sleep(3.5)
        app.send_task("outbox.heartbeat", kwargs={"beat": BEAT})

        def leaver_inactive() -> bool:
            now = {i.split("@")[0]: a["active"] for i, a in _agents(engine).items()}
            return now.get("leaver") is False

        assert _wait_for(leaver_inactive)
        listed = client.get("/v1/agents?role=worker&active=false", headers=auth).get_json()
        assert [a["instance_id"].split("@")[0] for a in listed["items"]] == ["leaver"]
        active = client.get("/v1/agents?role=worker&active=true", headers=auth).get_json()
        assert [a["instance_id"].split("@")[0] for a in active["items"]] == ["keeper"]
        assert client.get("/v1/agents?role=nobody", headers=auth).status_code == 422

        # A delivery that failed on the keeper: the retry prefers another worker, but
        # the only other one is inactive, so it goes back to the keeper.
        keeper_id = next(i for i in active_ids(engine) if i.startswith("keeper@"))
        with engine.begin() as conn:
            conn.execute(
                text(
                    "WITH m AS (INSERT INTO outbox_messages"
                    " (message_id, topic, payload, bucket, status, sent_at)"
                    " VALUES (gen_random_uuid(), :t, '{}', 0, 'sent', now())"
                    " RETURNING message_id)"
                    " INSERT INTO deliveries"
                    " (message_id, consumer_group_id, status, next_retry_at, instance_id)"
                    " SELECT m.message_id, g.id, 'failed', now(), :keeper"
                    " FROM m, consumer_groups g WHERE g.name = 'billing'"
                ),
                {"t": topic, "keeper": keeper_id},
            )
        # a fresh heartbeat: the keeper is well within the (3 s) window when it is chosen
        app.send_task("outbox.heartbeat", kwargs={"beat": BEAT})
        fresh = text(
            "SELECT now() - last_seen_at < interval '1 s' FROM agents WHERE instance_id = :k"
        )

        def keeper_fresh() -> bool:
            with engine.connect() as conn:
                return bool(conn.execute(fresh, {"k": keeper_id}).scalar())

        assert _wait_for(keeper_fresh)
        assert retry_due(s, make_sessionmaker(engine)).retried == 1
        with engine.connect() as conn:
            targets = conn.execute(
                text("SELECT target_instance FROM outbox_messages WHERE is_retry")
            ).scalars()
            assert list(targets) == [keeper_id]
    finally:
        keeper.stop()
        leaver.stop()


def active_ids(engine: Engine) -> list[str]:
    return [i for i, a in _agents(engine).items() if a["active"]]


def test_deliveries_are_listed_by_group_status_and_message(
    settings: Settings, engine: Engine, session: Session
):
    s = settings.replace(api_tokens=(TOKEN,))
    topic = f"ops.{uuid.uuid4().hex[:8]}"
    register_topic(session, topic)
    put_group(session, GroupSpec(name="billing", topic=topic, requires_ack=True))
    put_group(session, GroupSpec(name="audit", topic=topic, requires_ack=True))
    session.commit()
    acked, waiting = uuid.uuid4(), uuid.uuid4()
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO deliveries (message_id, consumer_group_id, status)"
                " SELECT m, g.id, st FROM (VALUES (CAST(:a AS uuid), 'acked'),"
                " (CAST(:w AS uuid), 'awaiting_ack')) AS v(m, st), consumer_groups g"
            ),
            {"a": str(acked), "w": str(waiting)},
        )
    client = create_app(s).test_client()
    auth = {"Authorization": f"Bearer {TOKEN}"}

    def listed(query: str) -> list[tuple[str, str, str]]:
        response = client.get(f"/v1/deliveries{query}", headers=auth)
        assert response.status_code == 200, response.get_json()
        return sorted(
            (d["message_id"], d["group"], d["status"]) for d in response.get_json()["items"]
        )

    assert len(listed("")) == 4
    assert listed("?group=audit&status=awaiting_ack") == [(str(waiting), "audit", "awaiting_ack")]
    assert listed(f"?message_id={acked}") == [
        (str(acked), "audit", "acked"),
        (str(acked), "billing", "acked"),
    ]
    bad = client.get("/v1/deliveries?status=lost", headers=auth)
    assert bad.status_code == 422
    assert "status" in str(bad.get_json()["error"])


def test_a_heartbeat_stops_waiting_once_the_workers_seen_lately_answered(
    settings: Settings, engine: Engine, tmp_path: Path
):
    # It waits in a pool process (here the only one): a wait of the whole timeout would
    # keep every relay and lane task of the worker waiting as long.
    s = settings.replace(heartbeat_inspect_timeout_s=8.0)
    worker = start_worker(s, "prompt", tmp_path)
    app = make_celery(s)
    try:
        worker.wait_ready()
        # A new worker asks for a heartbeat of its own, which waits for every answer.
        assert _wait_for(lambda: any(i.startswith("prompt@") for i in active_ids(engine)))
        with engine.connect() as conn:
            before = conn.execute(text("SELECT count(*) FROM health_snapshots")).scalar_one()
        started = time.monotonic()
        app.send_task("outbox.heartbeat", kwargs={"beat": BEAT})

        def stored() -> bool:
            with engine.connect() as conn:
                sql = text("SELECT count(*) FROM health_snapshots")
                return conn.execute(sql).scalar_one() > before

        assert _wait_for(stored)
        assert time.monotonic() - started < 6
    finally:
        worker.stop()


def test_consumer_lag_counts_from_the_group_s_committed_offsets(settings: Settings):
    from confluent_kafka import Consumer, TopicPartition

    from outbox.heartbeat import consumer_lag

    topic = f"lag.{uuid.uuid4().hex[:8]}"
    ensure_topics(admin_client(settings), [topic], 2)
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    for partition in (0, 0, 0, 0, 0, 1):
        producer.produce(topic, value=b"{}", partition=partition)
        assert producer.flush(10) == 0  # a batch each: offsets 0 to 4 on partition 0
    # The group committed 3 of partition 0's 5 records, and nothing of partition 1.
    committer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "lagging"})
    committer.commit(offsets=[TopicPartition(topic, 0, 3)], asynchronous=False)
    committer.close()
    lag = consumer_lag(settings, {"lagging": [topic], "absent": [f"{topic}.none"]})
    assert lag == {"lagging": {topic: {"0": 2, "1": 1}}, "absent": {}}
