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

import sys
import time
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import Engine, text

from outbox.bench.handlers import SCHEMA, TOPIC
from outbox.bench.latency import (
    PUBLISHERS,
    offer_load,
    percentile,
    start_process,
    start_worker,
    stop_process,
)
from outbox.bench.report import Report, progress
from outbox.db import make_engine, make_sessionmaker
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


def run(
    settings: Settings, *, messages: int, rate: float, seconds: float, workers: int, command: str
) -> Report:
    """The end-to-end scenario on running services; returns the report."""
    from api.kick import Kicker  # the API's own kick; the bench drives every layer

    report = Report("e2e", command)
    s = settings.replace(handler_modules=("outbox.bench.handlers",))
    engine = make_engine(s, pool_size=PUBLISHERS)
    with engine.begin() as conn:
        conn.execute(text(SCHEMA))
    with make_sessionmaker(engine).begin() as session:
        register_topic(session, TOPIC)
        put_group(session, GroupSpec(name=GROUP, topic=TOPIC))
    ensure_topics(admin_client(s), [TOPIC], s.kafka_topic_partitions)
    py = [sys.executable, "-m"]
    processes = [
        start_worker(s, workers),
        start_process([*py, "celery", "-A", "tasks", "beat"], s, b"beat: Starting"),
        start_process(
            [*py, "outbox", "consume", "--group", GROUP, "--topics", TOPIC],
            s,
            b"assigned " + TOPIC.encode(),
        ),
    ]
    kicker = Kicker(s)
    publisher = Publisher(s)
    try:
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
        finished = _wait_effects(engine, messages, timeout_s=600)
        report.add("publish (batches of 1,000)", messages / (published - started), "msg/s", "alone")
        throughput = report.add(
            "publish -> handler effect, sustained",
            messages / (finished - started),
            "msg/s",
            f"{messages:,} messages, first commit to last effect",
        )

        latencies = _latency_phase(engine, publisher, kicker, rate, seconds, messages)
    finally:
        for proc in processes:
            stop_process(proc)
        engine.dispose()
    report.add("offered load (latency phase)", rate, "msg/s")
    report.add("messages measured", len(latencies), "messages", f"after {WARMUP_S:g} s warm-up")
    p50 = report.add("commit -> handler effect, p50", percentile(latencies, 0.50), "ms")
    report.add("commit -> handler effect, p90", percentile(latencies, 0.90), "ms")
    p99 = report.add("commit -> handler effect, p99", percentile(latencies, 0.99), "ms")
    report.add("commit -> handler effect, max", max(latencies), "ms")
    report.series["commit -> handler effect"] = latencies
    report.target("at least 10,000 msg/s sustained", throughput, 10_000.0)
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
) -> list[float]:
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
    return [(done[m].timestamp() - at) * 1000 for m, at in ordered if m in done]
