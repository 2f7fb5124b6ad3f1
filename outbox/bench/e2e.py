"""``outbox bench e2e``: from publish to the handler's effect, every process on this machine.

A real Celery worker (relay and lane tasks), Celery beat and a consumer process
run the handler of :mod:`outbox.bench.handlers`, which writes one effect row per
message. Two phases:

1. throughput: ``messages`` published in batches of 1,000 as fast as they commit;
   the rate is messages over the time from the first commit to the last effect;
2. latency: messages published one per transaction at ``rate`` per second; each
   latency is the effect's time (the database clock, in the handler's transaction)
   minus the publisher's clock right after its commit.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import Engine, text

from outbox.bench.handlers import SCHEMA, TOPIC
from outbox.bench.latency import PUBLISHERS, offer_load, percentile
from outbox.bench.report import Report, progress
from outbox.db import make_engine, make_sessionmaker
from outbox.devstack import processes
from outbox.kafka import admin_client, ensure_topics
from outbox.publishing import Message, Publisher
from outbox.registry import GroupSpec, put_group, register_topic
from outbox.settings import Settings

if TYPE_CHECKING:
    from api.kick import Kicker

GROUP = "bench-e2e"
BATCH = 1_000
WARMUP_S = 2.0


def _effects(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM bench_effects")).scalar_one())


def _wait_effects(engine: Engine, count: int, timeout_s: float) -> float:
    """Wait until ``count`` effects exist; return the monotonic time it happened."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _effects(engine) >= count:
            return time.monotonic()
        time.sleep(0.05)
    raise RuntimeError(f"only {_effects(engine):,} of {count:,} effects after {timeout_s:g} s")


def prepare(settings: Settings) -> tuple[Settings, Engine]:
    """Settings with the benchmark's handler, and an engine; creates the effects table,
    the topic and the group."""
    s = settings.replace(handler_modules=("outbox.bench.handlers",))
    engine = make_engine(s, pool_size=PUBLISHERS)
    with engine.begin() as conn:
        conn.execute(text(SCHEMA))
    with make_sessionmaker(engine).begin() as session:
        register_topic(session, TOPIC)
        put_group(session, GroupSpec(name=GROUP, topic=TOPIC))
    ensure_topics(admin_client(s), [TOPIC], s.kafka_topic_partitions)
    return s, engine


@contextlib.contextmanager
def running(settings: Settings, *, concurrency: int, instances: int = 1) -> Iterator[None]:
    """``instances`` Celery workers of ``concurrency`` pool processes, beat and a consumer."""
    specs = [
        *(
            processes.worker(settings, f"bench{n}", concurrency=concurrency)
            for n in range(1, instances + 1)
        ),
        processes.beat(settings),
        processes.consumer(settings, "consumer", group=GROUP, topics=[TOPIC]),
    ]
    with processes.running(settings, specs) as started:
        started[-1].wait_for_line(processes.CONSUMER_ASSIGNED)
        yield


def throughput(
    engine: Engine, publisher: Publisher, kicker: Kicker, messages: int
) -> tuple[float, float]:
    """Publish ``messages`` in batches of ``BATCH`` (kicking the relay as the API does) and
    wait for their effects; returns msg/s of the publishing alone and of first commit to
    last effect."""
    already = _effects(engine)
    progress(f"throughput: {messages:,} messages in batches of {BATCH:,}")
    started = time.monotonic()
    for start in range(0, messages, BATCH):
        batch = [
            Message(TOPIC, {"n": i}, key=f"k{i % 1000}")
            for i in range(start, min(start + BATCH, messages))
        ]
        with engine.begin() as conn:
            publisher.publish_batch(conn, batch)
        kicker.kick()
    published = time.monotonic()
    finished = _wait_effects(engine, already + messages, timeout_s=600)
    return messages / (published - started), messages / (finished - started)


def run(
    settings: Settings, *, messages: int, rate: float, seconds: float, workers: int, command: str
) -> Report:
    """The end-to-end scenario on running services; returns the report."""
    from api.kick import Kicker  # the API's own kick; the bench drives every layer

    report = Report("e2e", command)
    s, engine = prepare(settings)
    kicker = Kicker(s)
    publisher = Publisher(s)
    try:
        with running(s, concurrency=workers):
            publish_rate, sustained = throughput(engine, publisher, kicker, messages)
            report.add("publish (batches of 1,000)", publish_rate, "msg/s", "alone")
            report.add(
                "publish -> handler effect, sustained",
                sustained,
                "msg/s",
                f"{messages:,} messages, first commit to last effect",
            )
            latencies, measured = _latency_phase(engine, publisher, kicker, rate, seconds, messages)
        stages = _stages(engine, measured)
    finally:
        engine.dispose()
    report.add("offered load (latency phase)", rate, "msg/s")
    report.add("messages measured", len(latencies), "messages", f"after {WARMUP_S:g} s warm-up")
    p50 = report.add("commit -> handler effect, p50", percentile(latencies, 0.50), "ms")
    report.add("commit -> handler effect, p90", percentile(latencies, 0.90), "ms")
    p99 = report.add("commit -> handler effect, p99", percentile(latencies, 0.99), "ms")
    report.add("commit -> handler effect, max", max(latencies), "ms")
    for stage, values in stages.items():
        report.add(
            f"stage {stage}, p50 / p99",
            percentile(values, 0.50),
            "ms",
            f"p99 {percentile(values, 0.99):,.0f} ms",
        )
    report.series["commit -> handler effect"] = latencies
    report.target("at least 10,000 msg/s sustained", sustained, 10_000.0)
    report.target("p50 under 50 ms", p50, 50.0, at_most=True)
    report.target("p99 under 250 ms", p99, 250.0, at_most=True)
    return report


def _latency_phase(
    engine: Engine,
    publisher: Publisher,
    kicker: Kicker,
    rate: float,
    seconds: float,
    already: int,
) -> tuple[list[float], list[str]]:
    """Offer ``rate`` msg/s for ``seconds``; returns each measured message's latency (ms)
    and the measured messages' ids."""
    total = int(rate * seconds)
    progress(f"latency: {total:,} messages at {rate:g}/s, one per transaction")
    committed = offer_load(engine, publisher, kicker, TOPIC, rate, total)
    _wait_effects(engine, already + total, timeout_s=120)
    with engine.connect() as conn:
        done: dict[str, datetime] = {
            str(m): at for m, at in conn.execute(text("SELECT message_id, at FROM bench_effects"))
        }
    skip = int(rate * WARMUP_S)
    ordered = sorted(committed.items(), key=lambda kv: kv[1])[skip:]
    return [(done[m].timestamp() - at) * 1000 for m, at in ordered if m in done], [
        m for m, _ in ordered
    ]


# Each measured message's time in each stage, from its rows' timestamps (database clock).
_STAGES = text("""
SELECT EXTRACT(EPOCH FROM o.sent_at - o.created_at) * 1000 AS relay,
       EXTRACT(EPOCH FROM i.received_at - o.sent_at) * 1000 AS consume,
       EXTRACT(EPOCH FROM e.at - i.received_at) * 1000 AS process
FROM outbox_messages o
JOIN inbox_messages i ON i.message_id = o.message_id AND i.consumer_group = :group
JOIN bench_effects e ON e.message_id = o.message_id
WHERE o.message_id = ANY(CAST(:ids AS uuid[]))
""")


def _stages(engine: Engine, ids: list[str]) -> dict[str, list[float]]:
    """Milliseconds per stage: commit -> sent (relay), sent -> inbox (Kafka and the
    consumer), inbox -> effect (the lane task and the handler)."""
    with engine.connect() as conn:
        rows = conn.execute(_STAGES, {"group": GROUP, "ids": ids}).all()
    return {
        stage: [float(row[n]) for row in rows]
        for n, stage in enumerate(("commit -> sent", "sent -> inbox", "inbox -> effect"))
    }
