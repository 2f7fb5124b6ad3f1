"""``/metrics`` and ``/v1/stats`` against real PostgreSQL, Redis and a Kafka-protocol broker:
a relay run counts what it sent, a heartbeat's snapshot gives the gauges, and the
exposition parses as Prometheus reads it."""

from __future__ import annotations

import base64
import bisect
import time
import uuid

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from api import create_app
from outbox import Message, Publisher, queries
from outbox.db import make_sessionmaker
from outbox.heartbeat import record_heartbeat
from outbox.metrics import LATENCY_BUCKETS, MetricsRecorder
from outbox.registry import GroupSpec, put_group, register_topic
from outbox.relay import Relay
from outbox.settings import Settings

TOKEN = "metrics-token"
SECRET_KEY = "customer-4711"
SECRET_PAYLOAD = "card-number-4242"


def _samples(body: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample as ``(name, sorted labels) -> value``."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def _scrape(client, **headers) -> str:
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.data[:500]
    assert response.content_type.startswith("text/plain; version=0.0.4")
    return response.get_data(as_text=True)


def test_metrics_report_what_the_relay_sent_and_the_snapshot_counted(
    settings: Settings, engine: Engine, session: Session, topic: str
):
    s = settings.replace(api_tokens=(TOKEN,))
    register_topic(session, topic)
    put_group(session, GroupSpec(name="billing", topic=topic, requires_ack=True))
    session.commit()
    Publisher(s).publish_batch(
        session,
        [Message(topic, {"card": SECRET_PAYLOAD}, key=SECRET_KEY) for _ in range(30)],
    )
    session.commit()
    relay = Relay(s, sessions=make_sessionmaker(engine))
    assert relay.run(budget_s=30).sent == 30
    with engine.begin() as conn:
        # a pending row, a dead one, and inbox rows of the group in three states
        conn.execute(
            text(
                "INSERT INTO outbox_messages (message_id, topic, payload, bucket, status)"
                " SELECT gen_random_uuid(), :t, '{}', 0, s"
                " FROM unnest(ARRAY['pending', 'dead']) AS s"
            ),
            {"t": topic},
        )
        conn.execute(
            text(
                "INSERT INTO inbox_messages (consumer_group, message_id, topic, partition,"
                ' "offset", lane, payload, status)'
                " SELECT 'billing', gen_random_uuid(), :t, 0, n, 0, '{}', s"
                " FROM unnest(ARRAY['done', 'done', 'failed', 'dead']) WITH ORDINALITY AS u(s, n)"
            ),
            {"t": topic},
        )
    MetricsRecorder(s).retries(["billing", "billing"])
    record_heartbeat(s, make_sessionmaker(engine), {}, beat="beat@test:1")

    client = create_app(s).test_client()
    assert client.get("/metrics").status_code == 401
    body = _scrape(client, Authorization=f"Bearer {TOKEN}")
    basic = base64.b64encode(f"prometheus:{TOKEN}".encode()).decode()
    assert _scrape(client, Authorization=f"Basic {basic}")  # Prometheus' basic_auth works too
    samples = _samples(body)

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("outbox_relay_published_total", topic=topic) == 30
    assert value("outbox_messages", topic=topic, status="sent") == 30
    assert value("outbox_messages", topic=topic, status="pending") == 1
    assert value("outbox_messages", topic=topic, status="dead") == 1
    assert value("outbox_deliveries", group="billing", status="awaiting_ack") == 30
    assert value("outbox_inbox_messages", group="billing", status="done") == 2
    assert value("outbox_inbox_messages", group="billing", status="failed") == 1
    assert value("outbox_dead_letters", group="billing", side="inbox") == 1
    assert value("outbox_retries_published_total", group="billing") == 2
    assert value("outbox_agents_active", role="beat") == 1
    assert value("outbox_metrics_source_up", source="database") == 1
    assert value("outbox_metrics_source_up", source="redis") == 1
    assert 0 <= value("outbox_health_snapshot_age_seconds") < 30
    assert value("outbox_oldest_claimable_age_seconds") >= 0
    # the histogram: every sent row once, and the buckets cumulative up to +Inf
    assert value("outbox_relay_commit_to_ack_seconds_count") == 30
    assert value("outbox_relay_commit_to_ack_seconds_bucket", le="+Inf") == 30
    assert 0 < value("outbox_relay_commit_to_ack_seconds_sum") < 30 * 30
    assert value("outbox_relay_commit_to_ack_seconds_bucket", le="60.0") == 30
    assert value("outbox_relay_circuit_state", relay=relay.owner, state="closed") == 1
    assert value("outbox_relay_circuit_state", relay=relay.owner, state="open") == 0
    # no key, payload or token in any label or value
    for secret in (SECRET_KEY, SECRET_PAYLOAD, TOKEN):
        assert secret not in body

    stats = client.get("/v1/stats?minutes=1", headers={"Authorization": f"Bearer {TOKEN}"})
    assert stats.status_code == 200
    view = stats.get_json()
    assert view["published"] == {topic: 30}
    assert view["retries"] == {"billing": 2}
    assert view["circuit"] == "closed" and view["circuits"] == {relay.owner: "closed"}
    assert len(view["published_per_s"]) == 60 // 5
    refused = client.get("/v1/stats?minutes=99", headers={"Authorization": f"Bearer {TOKEN}"})
    assert refused.status_code == 422
    assert [f["field"] for f in refused.get_json()["error"]["details"]["fields"]] == ["minutes"]


def test_metrics_off_records_nothing(settings: Settings, engine: Engine, session: Session, topic):
    s = settings.replace(api_tokens=(TOKEN,), metrics=False)
    register_topic(session, topic)
    session.commit()
    Publisher(s).publish_batch(session, [Message(topic, {"n": n}) for n in range(5)])
    session.commit()
    assert Relay(s, sessions=make_sessionmaker(engine)).run(budget_s=30).sent == 5
    body = _scrape(create_app(s).test_client(), Authorization=f"Bearer {TOKEN}")
    assert ("outbox_relay_published_total", (("topic", topic),)) not in _samples(body)


def test_a_scrape_answers_without_redis_and_says_so(settings: Settings):
    s = settings.replace(api_tokens=(TOKEN,), redis_url="redis://127.0.0.1:1/0")
    started = time.monotonic()
    samples = _samples(_scrape(create_app(s).test_client(), Authorization=f"Bearer {TOKEN}"))
    assert time.monotonic() - started < 10
    assert samples[("outbox_metrics_source_up", (("source", "redis"),))] == 0
    assert samples[("outbox_metrics_source_up", (("source", "database"),))] == 1
    # no snapshot yet: the gauges of a snapshot are simply absent
    assert not any(name == "outbox_messages" for name, _ in samples)
    # the dashboard's JSON says which service is down, with a 503 rather than a 500
    stats = (
        create_app(s).test_client().get("/v1/stats", headers={"Authorization": f"Bearer {TOKEN}"})
    )
    assert stats.status_code == 503
    assert stats.get_json()["error"]["details"] == {"service": "redis"}


def test_run_now_names_only_the_beat_tasks(settings: Settings):
    client = create_app(settings.replace(api_tokens=(TOKEN,))).test_client()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    response = client.post(f"/v1/tasks/{uuid.uuid4().hex}/run", headers=auth)
    assert response.status_code == 422
    assert [f["field"] for f in response.get_json()["error"]["details"]["fields"]] == ["name"]
    assert client.post("/v1/tasks/heartbeat/run").status_code == 401


def test_a_latency_falls_in_the_first_bucket_at_or_above_it_as_prometheus_reads_le(
    engine: Engine,
):
    # the relay's marks count latencies per bucket in PostgreSQL: a bound itself is in its
    # own bucket (le), anything past the last bound only in +Inf
    latencies = [0.0, 0.001, 0.005, 0.0050001, 0.01, 2.4999, 2.5, 59.9, 60.0, 60.0001, 3600.0]
    bounds = list(LATENCY_BUCKETS)
    with engine.connect() as conn:
        placed = conn.execute(
            text(
                f"SELECT {queries.LATENCY_BUCKET_OF.format(seconds='s')}"
                " FROM unnest(CAST(:seconds AS float8[])) WITH ORDINALITY AS u(s, n) ORDER BY n"
            ),
            {"seconds": latencies, "latency_bounds": bounds},
        ).scalars()
        assert list(placed) == [bisect.bisect_left(bounds, s) for s in latencies]


def test_the_relay_counts_each_row_in_its_commit_to_ack_bucket(
    settings: Settings, engine: Engine, session: Session, topic: str
):
    s = settings.replace(api_tokens=(TOKEN,))
    register_topic(session, topic)
    session.commit()
    ages = [0, 0, 3, 7, 20, 45, 120]  # seconds since commit when the relay takes them
    Publisher(s).publish_batch(session, [Message(topic, {"n": n}) for n in range(len(ages))])
    session.commit()
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE outbox_messages m SET created_at = now() - make_interval(secs => a.age)"
                " FROM (SELECT id, row_number() OVER (ORDER BY id) AS n FROM outbox_messages"
                "       WHERE topic = :t) AS r,"
                " unnest(CAST(:ages AS float8[])) WITH ORDINALITY AS a(age, n)"
                " WHERE m.id = r.id AND r.n = a.n"
            ),
            {"t": topic, "ages": ages},
        )
    assert Relay(s, sessions=make_sessionmaker(engine)).run(budget_s=30).sent == len(ages)
    samples = _samples(_scrape(create_app(s).test_client(), Authorization=f"Bearer {TOKEN}"))

    def bucket(le: str) -> float:
        return samples[("outbox_relay_commit_to_ack_seconds_bucket", (("le", le),))]

    # cumulative, with two seconds to spare for the relay's own time
    cumulative = {le: bucket(le) for le in ("2.5", "5.0", "10.0", "30.0", "60.0", "+Inf")}
    assert cumulative == {"2.5": 2, "5.0": 3, "10.0": 4, "30.0": 5, "60.0": 6, "+Inf": 7}
    assert samples[("outbox_relay_commit_to_ack_seconds_count", ())] == 7
    total = samples[("outbox_relay_commit_to_ack_seconds_sum", ())]
    assert sum(ages) <= total < sum(ages) + 7 * 2
    assert samples[("outbox_relay_published_total", (("topic", topic),))] == 7
