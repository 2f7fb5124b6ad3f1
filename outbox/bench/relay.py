"""``outbox bench relay``: relay throughput next to the bare relay, in the same run.

In alternating rounds, the same rows (JSON payloads over ``keys`` keys) are written and
then relayed to Kafka twice: into the outbox with ``publish_batch`` and by the relay (one
process, every guarantee on), and into the bare relay's table with one multi-row INSERT
and by the bare relay (:mod:`outbox.bench.bare`). Both write 1,000 rows per transaction.

Then the cost of observability: the relay in a real Celery worker process, with
the metrics (Redis counters) and Celery task events on, and with both off, in
alternating rounds.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Engine, text

from outbox.bench import bare
from outbox.bench.report import Report, progress
from outbox.db import autocommit, make_engine, make_sessionmaker
from outbox.devstack import processes
from outbox.kafka import admin_client, ensure_topics
from outbox.publishing import Message, Publisher
from outbox.registry import register_topic
from outbox.relay import Relay
from outbox.settings import Settings

TOPIC = "bench.relay"


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
    with autocommit(engine) as conn:
        conn.execute(text("VACUUM ANALYZE"))
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


def _any_pending(engine: Engine) -> bool:
    with engine.connect() as conn:
        sql = "SELECT EXISTS (SELECT 1 FROM outbox_messages WHERE status = 'pending')"
        return bool(conn.execute(text(sql)).scalar_one())


@contextlib.contextmanager
def relay_workers(settings: Settings, instances: int) -> Iterator[None]:
    """``instances`` real worker processes (concurrency 1 each, as compose scales them),
    each past its start-up: it has run the heartbeat it asks for as it starts."""
    specs = [
        processes.worker(settings, f"bench{n}", concurrency=1) for n in range(1, instances + 1)
    ]
    with processes.running(settings, specs) as started:
        for worker in started:
            worker.wait_for_line(processes.WORKER_JOINED)
        yield


def worker_relay(
    settings: Settings, rows: int, payload_bytes: int, keys: int, instances: int
) -> float:
    """Fill the outbox, then let ``instances`` worker processes relay it, each kicked every
    0.2 s (as the API's kicks and beat's ticks would); msg/s from the first kick to the
    last row sent. Worker start-up is not timed: the workers have run the heartbeat they
    ask for as they start (it holds a pool process for a whole inspect timeout)."""
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


def bare_fill(settings: Settings, rows: int, payload_bytes: int, keys: int) -> float:
    """Empty the bare relay's table and insert ``rows`` rows; return rows/s."""
    engine = make_engine(settings)
    bare.create_schema(engine)
    bare.truncate(engine)
    with autocommit(engine) as conn:
        conn.execute(text("VACUUM ANALYZE"))
    started = time.perf_counter()
    for start in range(0, rows, 1000):
        with engine.begin() as conn:
            bare.publish_many(
                conn,
                [
                    (TOPIC, f"key-{i % keys}", _payload(payload_bytes, i))
                    for i in range(start, min(start + 1000, rows))
                ],
            )
    elapsed = time.perf_counter() - started
    engine.dispose()
    return rows / elapsed


def bare_drain(settings: Settings, rows: int) -> float:
    """The bare relay sends ``rows`` rows; msg/s."""
    engine = make_engine(settings, pool_size=1)
    relay = bare.BareRelay(settings, engine)
    try:
        return relay.drain(rows)
    finally:
        relay.producer.flush(10)
        engine.dispose()


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
    rates: dict[str, list[float]] = {}

    def measured(name: str, value: float) -> float:
        rates.setdefault(name, []).append(value)
        return value

    for n in range(1, rounds + 1):
        for side in ("bare", "system") if n % 2 else ("system", "bare"):
            progress(f"round {n}/{rounds}: {side}: writing {rows:,} rows, then relaying them")
            if side == "bare":
                measured("bare publish", bare_fill(settings, rows, payload_bytes, keys))
                measured("bare relay", bare_drain(settings, rows))
            else:
                measured("publish_batch", fill(settings, rows, payload_bytes, keys))
                relay = Relay(settings)
                measured("relay", drain(relay, rows))
                relay.close()

    def ratios(a: str, b: str) -> list[float]:
        return [100 * x / y for x, y in zip(rates[a], rates[b], strict=True)]

    def listed(values: list[float], unit: str = "") -> str:
        return "rounds: " + ", ".join(f"{v:,.0f}{unit}" for v in values)

    for name, label, unit in (
        ("bare relay", "bare relay (limit)", "msg/s"),
        ("relay", "relay (one process)", "msg/s"),
        ("bare publish", "bare publish, 1,000 rows per INSERT (limit)", "rows/s"),
        ("publish_batch", "publish_batch, 1,000 rows per transaction", "rows/s"),
    ):
        report.add(label, statistics.median(rates[name]), unit, listed(rates[name]))
    relay_ratio = statistics.median(ratios("relay", "bare relay"))
    report.add("relay / bare relay", relay_ratio, "%", listed(ratios("relay", "bare relay"), " %"))
    publish_ratio = statistics.median(ratios("publish_batch", "bare publish"))
    report.add(
        "publish_batch / bare publish",
        publish_ratio,
        "%",
        listed(ratios("publish_batch", "bare publish"), " %"),
    )
    report.target("relay >= 70% of the bare relay (median of rounds)", relay_ratio, 70.0)
    report.target("publish_batch >= 70% of the bare publish", publish_ratio, 70.0)

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
    ratios_on_off = [a / b for a, b in zip(on, off, strict=True)]
    report.add(
        "on / off",
        100 * statistics.median(ratios_on_off),
        "%",
        f"median of the rounds' ratios: {rounds_of(f'{100 * r:.0f}' for r in ratios_on_off)}",
    )
    return report
