"""``outbox bench e2e``: from publish to the handler's effect, every process on this
machine, next to the bare pipeline (:mod:`outbox.bench.bare`) in the same run.

The system: real Celery workers (relay and lane tasks), Celery beat, a consumer process
(and the ack consumer), running the handler of :mod:`outbox.bench.handlers`, which
writes one effect row per message. The bare pipeline: the bare relay, consumer and
processor loops, whose handler writes the same row. Both get the same messages (JSON
payloads of 200 bytes over 1,000 keys) on the same services, in alternating rounds,
beside a third pipeline, the bare Celery pipeline (:mod:`outbox.bench.bare_celery`): the
bare pipeline's work with its relay and processor passes run as Celery tasks on a worker
of as many pool processes as the system's, one task of each kind at a time (per-key
order) and with attempts counted before handlers run, which shows what Celery and those
guarantees cost when done in the shortest way:

1. throughput: ``messages`` published in batches of 1,000 as fast as they commit;
   the rate is messages over the time from the first commit to the last effect (the
   system twice: for a group that needs no acks, and for one that does);
2. latency: messages published one per transaction at ``rate`` per second, then at
   ``high_rate``; each latency is the effect's time (the database clock, in the
   handler's transaction) minus the publisher's clock right after its commit. During
   the first, the CPU time of every process is read from ``/proc``.

Each side's round starts on an empty embedded broker (restarted: it keeps every message in
memory and slows as they pile up). Before each phase the pipeline has nothing in flight
and the database is vacuumed.
Figures are medians over the rounds; ratios are medians of the rounds' ratios.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, text

from outbox.bench import bare, bare_celery
from outbox.bench.cpu import CpuMeter, find_pids, postmaster_pid
from outbox.bench.env import fresh_broker
from outbox.bench.handlers import SCHEMA, TOPIC, TOPIC_ACKED
from outbox.bench.latency import PUBLISHERS, offer_load, percentile
from outbox.bench.report import Report, progress
from outbox.db import autocommit, make_engine, make_sessionmaker
from outbox.devstack import processes
from outbox.kafka import admin_client, ensure_topics
from outbox.publishing import Message, Publisher
from outbox.registry import GroupSpec, put_group, register_topic
from outbox.settings import Settings
from outbox.wire import ACK_TOPIC

if TYPE_CHECKING:
    from api.kick import Kicker

GROUP = "bench-e2e"
BARE_TOPIC = "bench.bare"
BARE_CELERY_TOPIC = "bench.bare-celery"
TOPICS = [TOPIC, TOPIC_ACKED, BARE_TOPIC, BARE_CELERY_TOPIC]
# A worker's log line once the heartbeat it asked for as it started has run.
JOINED = r"outbox\.heartbeat\[\S+\] succeeded in .*'joining': True"
BATCH = 1_000
KEYS = 1_000
WARMUP_S = 2.0
PAYLOAD_BYTES = 200


def payload(i: int) -> dict[str, Any]:
    """A JSON payload of about 200 bytes."""
    return {"n": i, "pad": "x" * (PAYLOAD_BYTES - 20)}


def key(i: int) -> str:
    return f"k{i % KEYS}"


class Side:
    """One pipeline under test: how to start it, publish to it and count its effects."""

    name: str
    effects_table: str

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine

    def effects(self) -> int:
        with self.engine.connect() as conn:
            sql = f"SELECT count(*) FROM {self.effects_table}"  # noqa: S608 (a constant)
            return int(conn.execute(text(sql)).scalar_one())

    def effect_times(self) -> dict[str, float]:
        with self.engine.connect() as conn:
            sql = f"SELECT message_id, at FROM {self.effects_table}"  # noqa: S608
            return {str(m): at.timestamp() for m, at in conn.execute(text(sql))}

    def wait_effects(self, count: int, timeout_s: float) -> float:
        """Wait until ``count`` effects exist; return the monotonic time it happened."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.effects() >= count:
                return time.monotonic()
            time.sleep(0.02)
        raise RuntimeError(
            f"{self.name}: only {self.effects():,} of {count:,} effects after {timeout_s:g} s"
        )

    def running(self) -> contextlib.AbstractContextManager[dict[str, list[int]]]:
        raise NotImplementedError

    def publish_batch(self, conn: Connection, start: int, stop: int, acked: bool) -> None:
        raise NotImplementedError

    def publish_one(self, conn: Connection, i: int) -> str:
        raise NotImplementedError

    def after_commit(self) -> None:
        """What a service does after its commit (the system kicks the relay)."""

    def settle(self, timeout_s: float = 300.0) -> None:
        """Wait until the pipeline has nothing left in flight (acks included), so that a
        phase does not measure the backlog of the one before; then vacuum the database,
        so that each phase, of either side, starts from clean tables and seldom meets an
        autovacuum of the rows that the phases before it left behind."""
        deadline = time.monotonic() + timeout_s
        while self._in_flight() and time.monotonic() < deadline:
            time.sleep(0.1)
        with autocommit(self.engine) as conn:
            conn.execute(text("VACUUM (ANALYZE)"))

    def _in_flight(self) -> int:
        return 0

    def throughput(self, messages: int, *, acked: bool = False) -> float:
        """Publish ``messages`` in batches of 1,000 and wait for their effects; msg/s from
        the first commit to the last effect."""
        already = self.effects()
        started = time.monotonic()
        for start in range(0, messages, BATCH):
            with self.engine.begin() as conn:
                self.publish_batch(conn, start, min(start + BATCH, messages), acked)
            self.after_commit()
        finished = self.wait_effects(already + messages, timeout_s=120 + messages / 100)
        return messages / (finished - started)

    def latency(self, rate: float, seconds: float) -> dict[str, float]:
        """Offer ``rate`` msg/s for ``seconds``, one per transaction; each measured
        message's commit -> effect latency, ms (after a warm-up), by message id."""
        total = int(rate * seconds)
        already = self.effects()
        committed = offer_load(self.engine, self.publish_one, self.after_commit, rate, total)
        self.wait_effects(already + total, timeout_s=120 + total / 100)
        done = self.effect_times()
        skip = int(rate * WARMUP_S)
        ordered = sorted(committed.items(), key=lambda kv: kv[1])[skip:]
        return {m: (done[m] - at) * 1000 for m, at in ordered if m in done}


class System(Side):
    """The project: workers, beat, consumers; the API's own kick after each commit."""

    name = "system"
    effects_table = "bench_effects"

    def __init__(
        self, settings: Settings, engine: Engine, concurrency: int, instances: int = 1
    ) -> None:
        super().__init__(settings, engine)
        from api.kick import Kicker  # the API's own kick: a benchmark drives every layer

        self.concurrency, self.instances = concurrency, instances
        self.kicker: Kicker = Kicker(settings)
        self.publisher = Publisher(settings)

    @contextlib.contextmanager
    def running(self) -> Iterator[dict[str, list[int]]]:
        s = self.settings
        specs = [
            *(
                processes.worker(s, f"bench{n}", concurrency=self.concurrency)
                for n in range(1, self.instances + 1)
            ),
            processes.beat(s),
            processes.consumer(s, "consumer", group=GROUP, topics=[TOPIC, TOPIC_ACKED]),
            processes.consumer(s, "acks", group="outbox-acks", topics=[ACK_TOPIC]),
        ]
        with processes.running(s, specs) as started:
            for consumer in started[-2:]:
                consumer.wait_for_line(processes.CONSUMER_ASSIGNED)
            # A new worker's own heartbeat waits a whole inspect timeout for every worker's
            # answer, in a pool process: start-up work, not what a phase measures.
            for worker in started[: self.instances]:
                worker.wait_for_line(processes.WORKER_JOINED)
            n = self.instances
            yield {
                "worker": [p.pid for p in started[:n]],
                "beat": [started[n].pid],
                "consumer": [p.pid for p in started[n + 1 :]],
            }

    def publish_batch(self, conn: Connection, start: int, stop: int, acked: bool) -> None:
        topic = TOPIC_ACKED if acked else TOPIC
        self.publisher.publish_batch(
            conn, [Message(topic, payload(i), key=key(i)) for i in range(start, stop)]
        )

    def publish_one(self, conn: Connection, i: int) -> str:
        return str(self.publisher.publish(conn, TOPIC, payload(i), key=key(i)))

    def after_commit(self) -> None:
        self.kicker.kick()

    def _in_flight(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(_IN_FLIGHT).scalar_one())


class Bare(Side):
    """The bare pipeline: relay, consumer and processor loops; nothing after a commit.
    Both bare pipelines use the same tables (one runs at a time)."""

    name = "bare"
    effects_table = "bare_effects"
    topic = BARE_TOPIC

    @contextlib.contextmanager
    def running(self) -> Iterator[dict[str, list[int]]]:
        s = self.settings
        specs = [processes.bare_loop(s, role, self.topic) for role in bare.ROLES]
        with processes.running(s, specs) as started:
            yield {role: [p.pid] for role, p in zip(bare.ROLES, started, strict=True)}

    def publish_batch(self, conn: Connection, start: int, stop: int, acked: bool) -> None:
        bare.publish_many(conn, [(self.topic, key(i), payload(i)) for i in range(start, stop)])

    def publish_one(self, conn: Connection, i: int) -> str:
        return bare.publish_one(conn, self.topic, key(i), payload(i))

    def _in_flight(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(_BARE_IN_FLIGHT).scalar_one())


class BareCelery(Bare):
    """The bare pipeline's work with its relay and processor passes as Celery tasks, one of
    each kind at a time, attempts counted before handlers run
    (:mod:`outbox.bench.bare_celery`): the same tables, its own topic, worker and consumer
    loop; the publisher kicks the relay task after each commit, as the system's does."""

    name = "bare-celery"
    topic = BARE_CELERY_TOPIC

    def __init__(self, settings: Settings, engine: Engine, concurrency: int) -> None:
        super().__init__(settings, engine)
        self.concurrency = concurrency
        self.kicks = bare_celery.Kicks(bare_celery.make_app(settings), settings)

    @contextlib.contextmanager
    def running(self) -> Iterator[dict[str, list[int]]]:
        s = self.settings
        specs = [
            processes.bare_celery_worker(s, self.concurrency),
            processes.bare_celery_consumer(s, self.topic),
        ]
        with processes.running(s, specs) as started, bare_celery.ticking(self.kicks):
            yield {"worker": [started[0].pid], "consumer": [started[1].pid]}

    def after_commit(self) -> None:
        self.kicks.kick(bare_celery.RELAY_FLAG, bare_celery.RELAY)


def prepare(settings: Settings) -> tuple[Settings, Engine]:
    """Settings with the benchmark's handler, and an engine; creates the effects table,
    the topics and the groups (one needs no acks, the other does)."""
    s = settings.replace(handler_modules=("outbox.bench.handlers",))
    engine = make_engine(s, pool_size=PUBLISHERS)
    with engine.begin() as conn:
        conn.execute(text(SCHEMA))
    bare.create_schema(engine)
    with make_sessionmaker(engine).begin() as session:
        for topic in (TOPIC, TOPIC_ACKED):
            register_topic(session, topic)
        put_group(session, GroupSpec(name=GROUP, topic=TOPIC))
        put_group(session, GroupSpec(name=GROUP, topic=TOPIC_ACKED, requires_ack=True))
    ensure_topics(admin_client(s), TOPICS, s.kafka_topic_partitions)
    return s, engine


def _fresh_broker(settings: Settings, engine: Engine) -> None:
    """Start a side's round on an empty embedded broker (:func:`outbox.bench.env.fresh_broker`):
    the topics made again, and the consumer groups' offsets, which the system keeps with its
    inbox, forgotten (they point into the old broker's logs)."""
    if fresh_broker(settings):
        ensure_topics(admin_client(settings), TOPICS, settings.kafka_topic_partitions)
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM inbox_offsets"))


def service_pids(settings: Settings, engine: Engine) -> dict[str, list[int]]:
    """The shared services' processes on this machine (none for a remote one)."""
    roles: dict[str, list[int]] = {}
    postmaster = postmaster_pid(engine)
    if postmaster is not None:
        roles["postgresql"] = [postmaster]
    if settings.kafka_bootstrap is not None:
        port = settings.kafka_bootstrap.rsplit(":", 1)[-1]
        roles["broker"] = find_pids(rf"tansu .*:{port}\b")
    if settings.redis_url is not None:
        # Celery's broker: the system's only (the bare pipeline does not use it).
        port = settings.redis_url.rsplit(":", 1)[-1].split("/")[0]
        roles["redis"] = find_pids(rf"redis-server .*:{port}\b")
    return roles


class Rounds:
    """A figure per side per round, and the per-round ratios of system to bare."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}

    def add(self, name: str, value: float) -> None:
        self.values.setdefault(name, []).append(value)

    def median(self, name: str) -> float:
        return statistics.median(self.values[name])

    def listed(self, name: str, unit: str = "") -> str:
        return "rounds: " + ", ".join(f"{v:,.0f}{unit}" for v in self.values[name])


def _one_side(
    side: Side,
    rounds: Rounds,
    cpu: dict[str, dict[str, list[float]]],
    latencies: dict[str, list[float]],
    *,
    messages: int,
    rate: float,
    high_rate: float,
    seconds: float,
    services: dict[str, list[int]],
) -> None:
    with side.running() as pids:
        n = side.name
        progress(f"{n}: throughput, {messages:,} messages in batches of {BATCH:,}")
        side.settle()
        rounds.add(f"{n} throughput", side.throughput(messages))
        if isinstance(side, System):
            progress(f"{n}: throughput, a group that needs acks")
            side.settle()
            rounds.add(f"{n} throughput, acks", side.throughput(messages, acked=True))
        side.settle()
        progress(f"{n}: latency at {rate:g} msg/s for {seconds:g} s, one per transaction")
        meter = CpuMeter({**services, **pids})
        meter.start()
        latency = side.latency(rate, seconds)
        used = meter.seconds()
        measured = list(latency.values())
        for stage, values in _stages(side, list(latency)).items():
            rounds.add(f"{n} stage {stage}", percentile(values, 0.5))
        total = int(rate * seconds)
        for role, seconds_used in used.items():
            cpu.setdefault(n, {}).setdefault(role, []).append(1000 * seconds_used / total)
        latencies.setdefault(f"{n}, {rate:g} msg/s", []).extend(measured)
        rounds.add(f"{n} p50", percentile(measured, 0.5))
        rounds.add(f"{n} p99", percentile(measured, 0.99))
        progress(f"{n}: latency at {high_rate:g} msg/s for {seconds:g} s")
        side.settle()
        high = list(side.latency(high_rate, seconds).values())
        side.settle()
        rounds.add(f"{n} high p50", percentile(high, 0.5))
        rounds.add(f"{n} high p99", percentile(high, 0.99))


# Rows the system still has to relay or process: acks of an earlier phase, say.
_IN_FLIGHT = text("""
SELECT (SELECT count(*) FROM outbox_messages WHERE status = 'pending')
     + (SELECT count(*) FROM inbox_messages WHERE status IN ('received', 'failed'))
""")

_BARE_IN_FLIGHT = text("""
SELECT (SELECT count(*) FROM bare_outbox WHERE sent_at IS NULL)
     + (SELECT count(*) FROM bare_inbox WHERE NOT done)
""")

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
_BARE_STAGES = text("""
SELECT EXTRACT(EPOCH FROM o.sent_at - o.created_at) * 1000 AS relay,
       EXTRACT(EPOCH FROM i.received_at - o.sent_at) * 1000 AS consume,
       EXTRACT(EPOCH FROM e.at - i.received_at) * 1000 AS process
FROM bare_outbox o
JOIN bare_inbox i ON i.message_id = o.message_id
JOIN bare_effects e ON e.message_id = o.message_id
WHERE o.message_id = ANY(CAST(:ids AS uuid[]))
""")
STAGES = ("commit -> sent", "sent -> inbox", "inbox -> effect")


def _stages(side: Side, ids: list[str]) -> dict[str, list[float]]:
    """Milliseconds per stage: commit -> sent (relay), sent -> inbox (Kafka and the
    consumer), inbox -> effect (the lane task or processor, and the handler)."""
    sql = _STAGES if isinstance(side, System) else _BARE_STAGES
    with side.engine.connect() as conn:
        rows = conn.execute(sql, {"group": GROUP, "ids": ids}).all()
    return {stage: [float(row[n]) for row in rows] for n, stage in enumerate(STAGES)}


def run(
    settings: Settings,
    *,
    messages: int,
    rate: float,
    high_rate: float,
    seconds: float,
    rounds: int,
    workers: int,
    command: str,
) -> Report:
    """The end-to-end scenario on running services; returns the report."""
    report = Report("e2e", command)
    s, engine = prepare(settings)
    sides: list[Side] = [
        System(s, engine, workers),
        Bare(s, engine),
        BareCelery(s, engine, workers),
    ]
    figures = Rounds()
    cpu: dict[str, dict[str, list[float]]] = {}
    latencies: dict[str, list[float]] = {}
    try:
        for n in range(rounds):
            for side in sides if n % 2 == 0 else sides[::-1]:
                progress(f"round {n + 1}/{rounds}: {side.name}")
                _fresh_broker(s, engine)
                services = service_pids(s, engine)
                _one_side(
                    side,
                    figures,
                    cpu,
                    latencies,
                    messages=messages,
                    rate=rate,
                    high_rate=high_rate,
                    seconds=seconds,
                    services=services,
                )
    finally:
        engine.dispose()
    _report(report, figures, cpu, latencies, rate=rate, high_rate=high_rate)
    return report


def _ratios(figures: Rounds, system: str, bare_name: str) -> list[float]:
    return [
        100 * a / b for a, b in zip(figures.values[system], figures.values[bare_name], strict=True)
    ]


def _report(
    report: Report,
    figures: Rounds,
    cpu: dict[str, dict[str, list[float]]],
    latencies: dict[str, list[float]],
    *,
    rate: float,
    high_rate: float,
) -> None:
    add = report.add
    add(
        "bare pipeline: publish -> effect (limit)",
        figures.median("bare throughput"),
        "msg/s",
        figures.listed("bare throughput"),
    )
    add(
        "bare Celery pipeline: publish -> effect",
        figures.median("bare-celery throughput"),
        "msg/s",
        figures.listed("bare-celery throughput"),
    )
    add(
        "publish -> handler effect, sustained",
        figures.median("system throughput"),
        "msg/s",
        figures.listed("system throughput"),
    )
    add(
        "publish -> handler effect, sustained, acks on",
        figures.median("system throughput, acks"),
        "msg/s",
        figures.listed("system throughput, acks"),
    )
    ratio = statistics.median(_ratios(figures, "system throughput", "bare throughput"))
    add("sustained / bare", ratio, "%", "median of the rounds' ratios")
    acked = statistics.median(_ratios(figures, "system throughput, acks", "bare throughput"))
    add("sustained, acks on / bare", acked, "%", "median of the rounds' ratios")
    on_celery = statistics.median(_ratios(figures, "bare-celery throughput", "bare throughput"))
    add("bare Celery / bare, sustained", on_celery, "%", "median of the rounds' ratios")
    labels = {"bare": "bare: ", "bare-celery": "bare Celery: ", "system": ""}
    for prefix, label in (("", f"{rate:g} msg/s"), ("high ", f"{high_rate:g} msg/s")):
        for q in ("p50", "p99"):
            for side, lead in labels.items():
                what = "effect" if side != "system" else "handler effect"
                add(
                    f"{lead}commit -> {what} at {label}, {q}",
                    figures.median(f"{side} {prefix}{q}"),
                    "ms",
                    figures.listed(f"{side} {prefix}{q}", " ms"),
                )
    for side, lead in labels.items():
        for stage in STAGES:
            add(
                f"{lead}stage {stage} at {rate:g} msg/s, p50",
                figures.median(f"{side} stage {stage}"),
                "ms",
                figures.listed(f"{side} stage {stage}", " ms"),
            )
    per_message = {
        side: {role: statistics.median(v) for role, v in roles.items()}
        for side, roles in cpu.items()
    }
    for side in labels:
        for role, value in sorted(per_message.get(side, {}).items()):
            add(f"CPU per message at {rate:g} msg/s, {side}: {role}", value, "ms of CPU")
    for side in labels:
        every = sum(per_message.get(side, {}).values())
        add(f"CPU per message at {rate:g} msg/s, {side}, every process", every, "ms of CPU")
    cpu_bare = report.value(f"CPU per message at {rate:g} msg/s, bare, every process")
    cpu_system = report.value(f"CPU per message at {rate:g} msg/s, system, every process")
    report.series.update(latencies)
    report.breakdown = {"CPU ms per message": per_message}
    # As the relay's: the median of the rounds' ratios (each round's sides ran back to
    # back, so a round's ratio is the least disturbed by the machine's drift).
    report.target("sustained >= 80% of the bare pipeline", ratio, 80.0)
    report.target("sustained, acks on >= 80% of the bare pipeline", acked, 80.0)
    report.target(
        f"p50 at {rate:g} msg/s <= bare p50 + 15 ms",
        figures.median("system p50"),
        figures.median("bare p50") + 15,
        at_most=True,
    )
    report.target(
        f"p99 at {rate:g} msg/s <= 100 ms", figures.median("system p99"), 100, at_most=True
    )
    report.target(
        "CPU per message <= 3x the bare pipeline's", cpu_system, 3 * cpu_bare, at_most=True
    )
