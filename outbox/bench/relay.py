"""``outbox bench relay``: relay throughput next to the two limits it sits between.

* PostgreSQL claim-and-mark: the relay's own lease, claim and mark statements,
  with a producer that reports every message delivered at once (no Kafka);
* bare produce: a confluent-kafka loop with the relay's producer settings and
  the same messages, waiting for every delivery report (no database);
* the relay: both together, as a worker runs it.

Then the cost of observability: the relay in a real Celery worker process, with
the metrics (Redis counters) and Celery task events on, and with both off, in
alternating rounds.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator, Sequence
from typing import Any

from confluent_kafka import Producer
from sqlalchemy import Engine, text

from outbox.bench.report import Report, progress
from outbox.db import make_engine, make_sessionmaker
from outbox.devstack import processes
from outbox.kafka import admin_client, ensure_topics, producer_config
from outbox.producer import DeliveryReport, Outgoing
from outbox.publishing import Message, Publisher
from outbox.registry import register_topic
from outbox.relay import Relay
from outbox.settings import Settings

TOPIC = "bench.relay"


class NullProducer:
    """Reports every message delivered without sending it: the database alone is measured."""

    brokers_down = False
    fatal = None

    def __init__(self) -> None:
        self.offset = 0
        self.replaced: list[str] = []  # never: it has no broker to fence it

    def ping(self) -> bool:
        return True

    def send(self, rows: Sequence[Outgoing]) -> list[DeliveryReport]:
        out = [DeliveryReport(r.id, 0, self.offset + i) for i, r in enumerate(rows)]
        self.offset += len(rows)
        return out

    def close(self) -> None:
        pass


def _payload(payload_bytes: int, i: int) -> dict[str, Any]:
    return {"n": i, "pad": "x" * max(payload_bytes - 20, 0)}


def fill(settings: Settings, rows: int, payload_bytes: int, keys: int) -> float:
    """Empty the outbox and publish ``rows`` messages; return rows/s of publish_batch."""
    engine = make_engine(settings)
    sessions = make_sessionmaker(engine)
    with sessions.begin() as session:
        session.execute(text("TRUNCATE outbox_messages"))
        session.execute(text("DELETE FROM leases"))
        register_topic(session, TOPIC)
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE"))
    publisher = Publisher(settings)
    started = time.perf_counter()
    for start in range(0, rows, 1000):
        with sessions.begin() as session:
            publisher.publish_batch(
                session,
                [
                    Message(TOPIC, _payload(payload_bytes, i), key=f"key-{i % keys}")
                    for i in range(start, min(start + 1000, rows))
                ],
            )
    elapsed = time.perf_counter() - started
    engine.dispose()
    return rows / elapsed


def drain(relay: Relay, rows: int) -> float:
    """Run the relay until ``rows`` are sent; return messages/s."""
    sent = 0
    started = time.perf_counter()
    while sent < rows:
        report = relay.run(budget_s=60)
        sent += report.sent
        if report.sent == 0 and report.circuit != "closed":
            raise RuntimeError(f"relay stopped: circuit {report.circuit}")
        progress(f"  {sent:,}/{rows:,} sent")
    return sent / (time.perf_counter() - started)


def bare_produce(settings: Settings, rows: int, payload_bytes: int, keys: int) -> float:
    """confluent-kafka alone, same settings and messages as the relay; messages/s."""
    import json

    producer = Producer(producer_config(settings))
    delivered = [0]

    def on_delivery(error: Any, _msg: Any) -> None:
        if error is None:
            delivered[0] += 1

    values = [json.dumps(_payload(payload_bytes, i)).encode() for i in range(rows)]
    started = time.perf_counter()
    for i, value in enumerate(values):
        while True:
            try:
                producer.produce(
                    TOPIC,
                    value=value,
                    key=f"key-{i % keys}",
                    headers=[("message_id", b"0" * 36)],
                    on_delivery=on_delivery,
                )
                break
            except BufferError:
                producer.poll(0.01)
    producer.flush(60)
    elapsed = time.perf_counter() - started
    if delivered[0] != rows:
        raise RuntimeError(f"bare produce delivered {delivered[0]} of {rows}")
    return rows / elapsed


def _any_pending(engine: Engine) -> bool:
    with engine.connect() as conn:
        sql = "SELECT EXISTS (SELECT 1 FROM outbox_messages WHERE status = 'pending')"
        return bool(conn.execute(text(sql)).scalar_one())


@contextlib.contextmanager
def relay_workers(settings: Settings, instances: int) -> Iterator[None]:
    """``instances`` real worker processes (concurrency 1 each, as compose scales them)."""
    specs = [
        processes.worker(settings, f"bench{n}", concurrency=1) for n in range(1, instances + 1)
    ]
    with processes.running(settings, specs):
        yield


def worker_relay(
    settings: Settings, rows: int, payload_bytes: int, keys: int, instances: int
) -> float:
    """Fill the outbox, then let ``instances`` worker processes relay it, each kicked every
    0.2 s (as the API's kicks and beat's ticks would); msg/s from the first kick to the
    last row sent. Worker start-up is not timed."""
    from celery import Celery  # a benchmark drives the workers the way the API does

    import celeryconfig

    fill(settings, rows, payload_bytes, keys)
    engine = make_engine(settings, pool_size=1)
    app = Celery("outbox-bench")
    app.conf.update(celeryconfig.from_settings(settings))
    try:
        with relay_workers(settings, instances):
            started = time.perf_counter()
            next_kick = 0.0
            while _any_pending(engine):
                if time.perf_counter() >= next_kick:
                    for _ in range(instances):
                        app.send_task("outbox.publish", expires=0.5, ignore_result=True)
                    next_kick = time.perf_counter() + 0.2
                time.sleep(0.05)
            elapsed = time.perf_counter() - started
    finally:
        engine.dispose()
    return rows / elapsed


def observability_rounds(
    settings: Settings, rows: int, payload_bytes: int, keys: int, rounds: int
) -> tuple[list[float], list[float]]:
    """Relay msg/s in a worker with metrics and task events on, then off, ``rounds`` times."""
    on: list[float] = []
    off: list[float] = []
    for n in range(1, rounds + 1):
        for enabled, rates in ((True, on), (False, off)):
            state = "on" if enabled else "off"
            progress(f"round {n}/{rounds}: worker relay, metrics and task events {state}")
            s = settings.replace(metrics=enabled, task_events=enabled)
            rates.append(worker_relay(s, rows, payload_bytes, keys, 1))
    return on, off


def run(
    settings: Settings,
    *,
    rows: int,
    payload_bytes: int,
    keys: int,
    rounds: int,
    command: str,
) -> Report:
    """The relay scenario on running services; returns the report."""
    report = Report("relay", command)
    ensure_topics(admin_client(settings), [TOPIC], settings.kafka_topic_partitions)

    progress(f"bare confluent-kafka produce of {rows:,} messages")
    produce = report.add(
        "bare produce (limit)", bare_produce(settings, rows, payload_bytes, keys), "msg/s"
    )
    progress(f"filling the outbox with {rows:,} rows")
    report.add(
        "publish_batch insert",
        fill(settings, rows, payload_bytes, keys),
        "rows/s",
        "1,000 per transaction",
    )
    progress("PostgreSQL claim-and-mark, no Kafka")
    null_relay = Relay(settings, producer=NullProducer())  # type: ignore[arg-type]
    claim_mark = report.add("PostgreSQL claim-and-mark (limit)", drain(null_relay, rows), "msg/s")

    progress(f"refilling, then relaying {rows:,} rows to Kafka")
    fill(settings, rows, payload_bytes, keys)
    relay = Relay(settings)
    relay_rate = report.add("relay (one process)", drain(relay, rows), "msg/s")
    relay.close()

    limit = min(produce, claim_mark)
    report.add("relay / smaller limit", 100 * relay_rate / limit, "%")
    report.target("relay >= 70% of the smaller limit", relay_rate, 0.7 * limit)

    on, off = observability_rounds(settings, rows // 2, payload_bytes, keys, rounds)
    rounds_of = ", ".join
    report.add(
        "worker relay, metrics + task events on",
        statistics.median(on),
        "msg/s",
        f"median; rounds: {rounds_of(f'{r:,.0f}' for r in on)}",
    )
    report.add(
        "worker relay, metrics + task events off",
        statistics.median(off),
        "msg/s",
        f"median; rounds: {rounds_of(f'{r:,.0f}' for r in off)}",
    )
    ratios = [a / b for a, b in zip(on, off, strict=True)]
    report.add(
        "on / off",
        100 * statistics.median(ratios),
        "%",
        f"median of the rounds' ratios: {rounds_of(f'{100 * r:.0f}' for r in ratios)}",
    )
    return report
