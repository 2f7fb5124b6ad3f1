"""``outbox bench retry``: what a targeted retry costs, and whether it slows the relay.

A real Celery worker (relay, lane and beat tasks), beat (``outbox.retry_targeted``
every ``retry_interval`` seconds), the group's consumer and the acks consumer run
the handlers of :mod:`outbox.bench.retry_handlers`. The group requires acks and gives
a message one try, so a failed message is acked as failed and comes back by a
targeted retry. Three phases:

1. first, on the fresh system: ``rounds`` rounds of ``rows`` outbox rows relayed by
   one relay alone, then again while another process runs the retry task over
   ``rows / 10`` due deliveries (it publishes their retries as the relay drains, and
   the relay sends them too). The rounds alternate, so that the machine's drift
   weighs on both sides alike; the figure compared is the median of the rounds'
   ratios of messages sent per second;
2. ``messages`` published one per transaction at ``rate`` per second, none failing;
3. the same on a second topic where ``fail_percent`` in 100 fail their first try.

The database cost of a phase is what ``pg_stat_database`` counts for the benchmark's
database (transactions, rows inserted, updated or deleted) once every backend has
flushed its statistics, less the background rate of the idle system measured first.
The extra cost of a retried message is phase 3's cost less phase 2's, per retried
message; its extra time is the median commit-to-effect latency of the retried
messages less that of phase 2's.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import statistics
import time
from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, TextClause, text

from outbox.bench.handlers import SCHEMA
from outbox.bench.latency import PUBLISHERS, offer_load, percentile
from outbox.bench.relay import drain, fill
from outbox.bench.report import Report, progress
from outbox.bench.retry_handlers import TOPIC_NONE, TOPIC_SOME
from outbox.db import autocommit, make_engine, make_sessionmaker
from outbox.devstack import processes
from outbox.kafka import admin_client, ensure_topics
from outbox.publishing import Publisher
from outbox.registry import GroupSpec, put_group, register_topic
from outbox.relay import Relay
from outbox.settings import Settings
from outbox.targeted_retry import retry_due
from outbox.wire import ACK_TOPIC

if TYPE_CHECKING:
    from multiprocessing.synchronize import Event

GROUP = "bench-retry"
# Every backend has flushed its statistics this long after it went idle (PostgreSQL
# flushes an idle backend's pending statistics after at most 10 s).
STATS_SETTLE_S = 11.0
IDLE_S = 10.0

_COUNTERS = text("""
SELECT xact_commit + xact_rollback, tup_inserted + tup_updated + tup_deleted
FROM pg_stat_database WHERE datname = current_database()
""")
_ACTIVE_WORKERS = text("SELECT count(*) FROM agents WHERE role = 'worker' AND active")
_ACKED = text("""
SELECT count(*) FROM deliveries d JOIN consumer_groups g ON g.id = d.consumer_group_id
WHERE g.topic = :topic AND d.status = 'acked'
""")
_OUTCOME = text("""
SELECT e.message_id, e.at, d.attempts
FROM deliveries d
JOIN consumer_groups g ON g.id = d.consumer_group_id
JOIN bench_effects e ON e.message_id = d.message_id
WHERE g.topic = :topic
""")
# Messages the group failed once: sent, with a failed delivery due now.
_SEED_DUE = text("""
WITH m AS (
    INSERT INTO outbox_messages (message_id, topic, key, payload, headers, bucket, status,
                                 sent_at)
    SELECT gen_random_uuid(), :topic, 'k' || (n % 100), jsonb_build_object('n', n),
           '{}'::jsonb, n % :buckets, 'sent', now()
    FROM generate_series(1, :count) AS n
    RETURNING message_id)
INSERT INTO deliveries (message_id, consumer_group_id, status, next_retry_at, instance_id)
SELECT m.message_id, g.id, 'failed', now(), 'bench@elsewhere'
FROM m, consumer_groups g WHERE g.name = :group AND g.topic = :topic
""")


class _Cost:
    """Database transactions and rows written, counted by PostgreSQL."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.at, self.xacts, self.rows = self._read()

    def _read(self) -> tuple[float, int, int]:
        with self.engine.connect() as conn:
            xacts, rows = conn.execute(_COUNTERS).one()
        return time.monotonic(), int(xacts), int(rows)

    def since(self, background: tuple[float, float]) -> tuple[float, float]:
        """Transactions and rows written since the last reading, less the background."""
        at, xacts, rows = self._read()
        elapsed = at - self.at
        spent = (
            xacts - self.xacts - background[0] * elapsed,
            rows - self.rows - background[1] * elapsed,
        )
        self.at, self.xacts, self.rows = at, xacts, rows
        return spent


def run(
    settings: Settings,
    *,
    messages: int,
    rate: float,
    fail_percent: int,
    retry_interval: float,
    rows: int,
    rounds: int,
    workers: int,
    command: str,
) -> Report:
    """The retry scenario on running services; returns the report."""
    from api.kick import Kicker  # the API's own kick; the bench drives every layer

    report = Report("retry", command)
    s = settings.replace(
        handler_modules=("outbox.bench.retry_handlers",),
        retry_interval_s=retry_interval,
        heartbeat_interval_s=5.0,
        heartbeat_inspect_timeout_s=0.5,
    )
    engine = make_engine(s, pool_size=PUBLISHERS)
    with engine.begin() as conn:
        conn.execute(text(SCHEMA))
    with make_sessionmaker(engine).begin() as session:
        for topic in (TOPIC_NONE, TOPIC_SOME):
            register_topic(session, topic)
            put_group(
                session,
                GroupSpec(
                    name=GROUP,
                    topic=topic,
                    requires_ack=True,
                    ack_timeout_s=60,
                    max_attempts=1,
                    retry_base_s=0.5,
                    retry_cap_s=5.0,
                ),
            )
    ensure_topics(admin_client(s), [TOPIC_NONE, TOPIC_SOME, ACK_TOPIC], s.kafka_topic_partitions)
    # The relay comparison runs first, on a system that has done nothing else yet.
    alone, together = _relay_rounds(s, engine, rows, rounds)
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE outbox_messages, deliveries"))
    with autocommit(engine) as conn:
        # leaves autovacuum nothing to do: its transactions would count as background
        conn.execute(text("VACUUM ANALYZE"))
    specs = [
        processes.worker(s, "bench", concurrency=workers).with_env(
            OUTBOX_BENCH_FAIL_PERCENT=str(fail_percent)
        ),
        processes.beat(s),
        processes.consumer(s, "consumer", group=GROUP, topics=[TOPIC_NONE, TOPIC_SOME]),
        processes.consumer(s, "acks", group="outbox-acks", topics=[ACK_TOPIC]),
    ]
    kicker = Kicker(s)
    publisher = Publisher(s)
    with processes.running(s, specs) as system:
        for consumer in system[2:]:
            consumer.wait_for_line(processes.CONSUMER_ASSIGNED)
        _wait(engine, _ACTIVE_WORKERS, 1, 60)
        progress(f"idle system: background database activity over {IDLE_S:g} s")
        time.sleep(STATS_SETTLE_S)
        cost = _Cost(engine)
        time.sleep(IDLE_S)
        idle_xacts, idle_rows = cost.since((0.0, 0.0))
        background = (idle_xacts / IDLE_S, idle_rows / IDLE_S)

        phases = {}
        for topic, name in ((TOPIC_NONE, "no failures"), (TOPIC_SOME, f"{fail_percent}% fail")):
            progress(f"{name}: {messages:,} messages at {rate:g}/s")
            started = time.monotonic()

            def publish_one(conn: Connection, i: int, topic: str = topic) -> str:
                return str(publisher.publish(conn, topic, {"n": i}, key=f"k{i % 100}"))

            committed = offer_load(engine, publish_one, kicker.kick, rate, messages)
            _wait(engine, _ACKED, messages, 120 + messages / rate, topic=topic)
            elapsed = time.monotonic() - started
            time.sleep(STATS_SETTLE_S)
            xacts, written = cost.since(background)
            phases[topic] = (committed, elapsed, xacts, written)

    base_committed, base_elapsed, base_xacts, base_rows = phases[TOPIC_NONE]
    some_committed, some_elapsed, some_xacts, some_rows = phases[TOPIC_SOME]
    base = _latencies(engine, TOPIC_NONE, base_committed)
    some = _latencies(engine, TOPIC_SOME, some_committed)
    retried = [ms for ms, attempts in some if attempts > 0]
    normal = [ms for ms, attempts in base]
    report.add("background (idle system)", background[0], "transactions/s")
    report.add("no failures: publish -> every delivery acked", base_elapsed, "s")
    report.add(f"{fail_percent}% fail once: publish -> every delivery acked", some_elapsed, "s")
    report.add("messages retried", len(retried), "messages", f"of {messages:,}")
    report.add("database transactions per message, no failures", base_xacts / messages, "xacts")
    report.add("rows written per message, no failures", base_rows / messages, "rows")
    extra_xacts = (some_xacts - base_xacts) / max(len(retried), 1)
    extra_rows = (some_rows - base_rows) / max(len(retried), 1)
    report.add("extra transactions per retried message", extra_xacts, "xacts")
    report.add("extra rows written per retried message", extra_rows, "rows")
    p50_normal = report.add("commit -> effect, p50, no failures", percentile(normal, 0.5), "ms")
    p50_retried = report.add("commit -> effect, p50, retried", percentile(retried, 0.5), "ms")
    report.add("commit -> effect, p99, retried", percentile(retried, 0.99), "ms")
    report.add(
        "extra time per retried message, p50",
        p50_retried - p50_normal,
        "ms",
        f"retry task every {retry_interval:g} s, backoff 0.25-0.5 s",
    )
    report.series["no failures"] = normal
    report.series["retried"] = retried

    engine.dispose()
    shown = ", ".join
    report.add(
        "relay alone, median",
        statistics.median(alone),
        "msg/s",
        f"{rows:,} rows; rounds: {shown(f'{r:,.0f}' for r in alone)}",
    )
    report.add(
        "relay with the retry task, median",
        statistics.median(together),
        "msg/s",
        f"{rows:,} rows + {rows // 10:,} retries; rounds: {shown(f'{r:,.0f}' for r in together)}",
    )
    ratios = [100 * t / a for a, t in zip(alone, together, strict=True)]
    ratio = report.add(
        "relay with / without the retry task, median",
        statistics.median(ratios),
        "%",
        f"rounds: {shown(f'{r:.0f}' for r in ratios)}",
    )
    report.target("every message's effect exactly once", len(some), messages)
    report.target(
        "retried exactly the failing messages", len(retried), messages * fail_percent / 100
    )
    report.target("relay with the retry task >= 90% of relay alone", ratio, 90.0)
    return report


def _latencies(engine: Engine, topic: str, committed: dict[str, float]) -> list[tuple[float, int]]:
    """Commit -> effect in ms, with the delivery's retries, of each message of ``topic``."""
    with engine.connect() as conn:
        done: dict[str, tuple[datetime, int]] = {
            str(m): (at, attempts) for m, at, attempts in conn.execute(_OUTCOME, {"topic": topic})
        }
    return [
        ((done[m][0].timestamp() - at) * 1000, done[m][1])
        for m, at in committed.items()
        if m in done
    ]


def _relay_rounds(
    settings: Settings, engine: Engine, rows: int, rounds: int
) -> tuple[list[float], list[float]]:
    """Relay msg/s in each round, alone and then with the retry task running in another
    process over ``rows / 10`` due deliveries (the relay sends their retries too)."""
    alone: list[float] = []
    together: list[float] = []
    for n in range(1, rounds + 1):
        progress(f"round {n}/{rounds}: relay alone, {rows:,} rows")
        alone.append(_drain_fresh(settings, rows))
        progress(f"round {n}/{rounds}: relay with the retry task, {rows // 10:,} due")
        together.append(_drain_fresh(settings, rows, engine))
    return alone, together


def _drain_fresh(settings: Settings, rows: int, seed_due: Engine | None = None) -> float:
    """Fill the outbox with ``rows`` rows and relay them; with ``seed_due``, first make a
    tenth as many deliveries due and run the retry task beside the relay."""
    fill(settings, rows, 200, 1000)
    due = 0
    if seed_due is not None:
        due = rows // 10
        with seed_due.begin() as conn:
            conn.execute(
                _SEED_DUE,
                {"topic": TOPIC_SOME, "count": due, "buckets": settings.buckets, "group": GROUP},
            )
    relay = Relay(settings)  # a new one each time: fill() clears the leases
    with contextlib.ExitStack() as running:
        if due:
            running.enter_context(_retry_task(settings))
        rate = drain(relay, rows + due)
    relay.close()
    return rate


@contextlib.contextmanager
def _retry_task(settings: Settings) -> Iterator[None]:
    """The retry task's work in a process of its own, from entry to exit."""
    spawn = multiprocessing.get_context("spawn")
    ready, go, stop = spawn.Event(), spawn.Event(), spawn.Event()
    retrier = spawn.Process(target=_retry_loop, args=(settings, ready, go, stop), daemon=True)
    retrier.start()
    try:
        if not ready.wait(60):
            raise RuntimeError("the retry process did not start")
        go.set()
        yield
    finally:
        stop.set()
        retrier.join(30)


def _retry_loop(settings: Settings, ready: Event, go: Event, stop: Event) -> None:
    """The retry task's work, every ``retry_interval_s`` from ``go`` until ``stop``."""
    sessions = make_sessionmaker(make_engine(settings, pool_size=1))
    with sessions() as session:
        session.execute(text("SELECT 1"))  # connected before the clock starts
    ready.set()
    go.wait()
    while not stop.is_set():
        retry_due(settings, sessions)
        stop.wait(settings.retry_interval_s)


def _wait(
    engine: Engine, sql: TextClause, expected: int, timeout_s: float, **params: object
) -> None:
    """Wait until ``sql`` counts at least ``expected``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            if conn.execute(sql, params).scalar_one() >= expected:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{sql} did not reach {expected} within {timeout_s:g} s")
