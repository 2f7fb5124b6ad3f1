"""``outbox bench latency``: commit-to-Kafka latency at a fixed offered load.

Messages are published one per transaction at ``rate`` per second through the
library, and each commit kicks the relay the way the API does. A real Celery
worker relays them. Latency is the relay's ``sent_at`` (the database clock,
read after the broker acknowledged the message) minus the publisher's clock
right after its commit; both are this machine's clock.

Like the CLI, a benchmark drives the whole system, so it reaches every layer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, select

from outbox.bench.report import Report, progress
from outbox.db import make_engine, make_sessionmaker
from outbox.devstack import processes
from outbox.kafka import admin_client, ensure_topics
from outbox.models import OutboxMessage
from outbox.publishing import Publisher
from outbox.registry import register_topic
from outbox.settings import Settings

if TYPE_CHECKING:
    # The API's own kick: like the CLI, a benchmark drives every layer.
    pass

TOPIC = "bench.latency"
WARMUP_S = 2.0
# Commits wait for the disk; several publishers keep the offered rate steady.
PUBLISHERS = 8


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def offer_load(
    engine: Engine,
    publish_one: Callable[[Connection, int], str],
    after_commit: Callable[[], None] | None,
    rate: float,
    total: int,
) -> dict[str, float]:
    """Publish ``total`` messages at ``rate`` per second, one per transaction
    (``publish_one(conn, i)`` returns the message id), calling ``after_commit`` after each
    commit (the API's kick); return each message id's commit time."""
    committed: dict[str, float] = {}
    started = time.monotonic()

    def publish_share(first: int) -> None:
        # Each thread keeps its own schedule, so one slow commit delays only its thread.
        for i in range(first, total, PUBLISHERS):
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            with engine.begin() as conn:
                message_id = publish_one(conn, i)
            committed[message_id] = time.time()
            if after_commit is not None:
                after_commit()

    threads = [threading.Thread(target=publish_share, args=(n,)) for n in range(PUBLISHERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return committed


def run(settings: Settings, *, rate: float, seconds: float, workers: int, command: str) -> Report:
    """The latency scenario on running services; returns the report."""
    from api.kick import Kicker

    report = Report("latency", command)
    engine = make_engine(settings, pool_size=PUBLISHERS)
    sessions = make_sessionmaker(engine)
    with sessions.begin() as session:
        register_topic(session, TOPIC)
    ensure_topics(admin_client(settings), [TOPIC], settings.kafka_topic_partitions)
    worker = processes.Process(processes.worker(settings, "bench", concurrency=workers), settings)
    worker.start().wait_ready()
    kicker = Kicker(settings)
    publisher = Publisher(settings)
    total = int(rate * seconds)
    progress(f"publishing {total:,} messages at {rate:g}/s, one per transaction")

    try:
        started = time.monotonic()
        committed = offer_load(
            engine,
            lambda conn, i: str(publisher.publish(conn, TOPIC, {"n": i}, key=f"k{i % 100}")),
            kicker.kick,
            rate,
            total,
        )
        offered = total / (time.monotonic() - started)
        progress("waiting for the relay to finish")
        deadline = time.monotonic() + 60
        sent: dict[str, datetime | None] = {}
        while time.monotonic() < deadline:
            with sessions() as session:
                sent = {
                    str(m): at
                    for m, at in session.execute(
                        select(OutboxMessage.message_id, OutboxMessage.sent_at).where(
                            OutboxMessage.topic == TOPIC, OutboxMessage.sent_at.is_not(None)
                        )
                    )
                }
            if len(sent) >= total:
                break
            time.sleep(0.5)
    finally:
        worker.stop()
        engine.dispose()
    skip = int(rate * WARMUP_S)
    ordered = sorted(committed.items(), key=lambda kv: kv[1])[skip:]
    latencies = [(ack.timestamp() - at) * 1000 for m, at in ordered if (ack := sent.get(m))]
    report.add("offered load", offered, "msg/s")
    report.add(
        "messages measured",
        len(latencies),
        "messages",
        f"after {WARMUP_S:g} s warm-up; {len(ordered) - len(latencies)} not sent",
    )
    p50 = report.add("commit -> Kafka ack, p50", percentile(latencies, 0.50), "ms")
    report.add("commit -> Kafka ack, p90", percentile(latencies, 0.90), "ms")
    p99 = report.add("commit -> Kafka ack, p99", percentile(latencies, 0.99), "ms")
    report.add("commit -> Kafka ack, max", max(latencies), "ms")
    report.series["commit -> Kafka ack"] = latencies
    report.target("p50 under 20 ms", p50, 20.0, at_most=True)
    report.target("p99 under 100 ms", p99, 100.0, at_most=True)
    report.target("every message sent", len(latencies), len(ordered))
    return report
