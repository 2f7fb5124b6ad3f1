"""The bare loops: the shortest hand-written pipeline that does the system's work, the
limit every benchmark figure is compared with.

They run on the same services, with the same payloads, keys and Kafka settings as the
system, and share nothing with it but the settings object:

* **bare relay** (one process): claim up to 5,000 unsent rows with one ``UPDATE ...
  WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED) RETURNING``, commit; produce each row
  (idempotent, ``acks=all``) with a delivery callback; one ``flush()``; mark the
  delivered rows sent in one ``UPDATE``, commit. Its table has one partial index on
  unsent rows.
* **bare consumer**: poll up to 5,000 records (``fetch.wait.max.ms`` = 10), store them
  with one ``INSERT ... ON CONFLICT DO NOTHING`` into an inbox table, commit, then
  commit the offsets to Kafka.
* **bare processor**: claim up to 1,000 received rows ``FOR UPDATE SKIP LOCKED``, call
  a Python handler per row that runs one ``INSERT`` on a SQLAlchemy session (one
  savepoint for the batch), mark the rows done in one ``UPDATE``, commit.
* **bare publish**: one multi-row ``INSERT`` per 1,000 rows.

Idle loops poll every 5 ms. Each long-running loop is a process of its own
(``python -m outbox.bench.bare relay|consume|process TOPIC``), started by the launcher.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from confluent_kafka import OFFSET_STORED, Consumer, Producer, TopicPartition
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from outbox.db import make_engine
from outbox.kafka import admin_client, consumer_config, producer_config
from outbox.settings import Settings

# The long-running loops, each a process of its own.
ROLES = ("relay", "consume", "process")
RELAY_BATCH = 5_000
CONSUME_BATCH = 5_000
PROCESS_BATCH = 1_000
IDLE_S = 0.005
LEASE_S = 30

SCHEMA = """
CREATE TABLE IF NOT EXISTS bare_outbox (
    id bigserial PRIMARY KEY,
    message_id uuid NOT NULL,
    topic text NOT NULL,
    key text,
    payload jsonb NOT NULL,
    lease_until timestamptz,
    sent_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS bare_outbox_unsent ON bare_outbox (id) WHERE sent_at IS NULL;
CREATE TABLE IF NOT EXISTS bare_inbox (
    id bigserial PRIMARY KEY,
    message_id uuid NOT NULL UNIQUE,
    key text,
    payload jsonb NOT NULL,
    done boolean NOT NULL DEFAULT false,
    attempts int NOT NULL DEFAULT 0,
    received_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS bare_inbox_received ON bare_inbox (id) WHERE NOT done;
CREATE TABLE IF NOT EXISTS bare_effects (
    message_id uuid PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
"""

CLAIM = text(f"""
UPDATE bare_outbox SET lease_until = now() + interval '{LEASE_S} seconds'
WHERE id IN (
    SELECT id FROM bare_outbox
    WHERE sent_at IS NULL AND (lease_until IS NULL OR lease_until < now())
    ORDER BY id LIMIT :limit FOR UPDATE SKIP LOCKED
)
RETURNING id, message_id, topic, key, CAST(payload AS text) AS payload
""")  # noqa: S608 (a constant)
MARK_SENT = text("UPDATE bare_outbox SET sent_at = now() WHERE id = ANY(:ids)")
STORE = text("""
INSERT INTO bare_inbox (message_id, key, payload)
SELECT r.message_id, r.key, r.payload
FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS r(message_id uuid, key text, payload jsonb)
ON CONFLICT (message_id) DO NOTHING
""")
CLAIM_RECEIVED = text("""
SELECT id, message_id, key, payload FROM bare_inbox
WHERE NOT done ORDER BY id LIMIT :limit FOR UPDATE SKIP LOCKED
""")
MARK_DONE = text("UPDATE bare_inbox SET done = true WHERE id = ANY(:ids)")
EFFECT = text("INSERT INTO bare_effects (message_id) VALUES (:id)")
INSERT_MANY = text("""
INSERT INTO bare_outbox (message_id, topic, key, payload)
SELECT r.message_id, r.topic, r.key, r.payload
FROM jsonb_to_recordset(CAST(:rows AS jsonb))
     AS r(message_id uuid, topic text, key text, payload jsonb)
""")
INSERT_ONE = text(
    "INSERT INTO bare_outbox (message_id, topic, key, payload)"
    " VALUES (:message_id, :topic, :key, CAST(:payload AS jsonb))"
)


def create_schema(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text(SCHEMA))


def truncate(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE bare_outbox, bare_inbox, bare_effects"))


def publish_many(conn: Any, messages: list[tuple[str, str | None, Any]]) -> None:
    """Insert ``(topic, key, payload)`` rows with one multi-row INSERT, in the caller's
    transaction (the benchmarks give it 1,000 at a time)."""
    rows = [
        {"message_id": str(uuid.uuid4()), "topic": t, "key": k, "payload": p}
        for t, k, p in messages
    ]
    conn.execute(INSERT_MANY, {"rows": json.dumps(rows)})


def publish_one(conn: Any, topic: str, key: str | None, payload: Any) -> str:
    """One row, in the caller's transaction; returns its message id."""
    message_id = str(uuid.uuid4())
    conn.execute(
        INSERT_ONE,
        {"message_id": message_id, "topic": topic, "key": key, "payload": json.dumps(payload)},
    )
    return message_id


class BareRelay:
    """The bare relay: claim, produce, flush, mark."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.engine = engine
        self.producer = Producer(producer_config(settings))

    def pass_once(self) -> int:
        """Relay one claim of up to 5,000 rows; return how many were sent."""
        with self.engine.begin() as conn:
            rows = conn.execute(CLAIM, {"limit": RELAY_BATCH}).all()
        if not rows:
            return 0
        delivered: list[int] = []
        for row in rows:

            def callback(error: Any, _msg: Any, row_id: int = row.id) -> None:
                if error is None:
                    delivered.append(row_id)

            while True:
                try:
                    self.producer.produce(
                        row.topic,
                        value=row.payload.encode(),
                        key=row.key,
                        headers=[("message_id", str(row.message_id).encode())],
                        on_delivery=callback,
                    )
                    break
                except BufferError:
                    self.producer.poll(0.01)
        self.producer.flush(60)
        with self.engine.begin() as conn:
            conn.execute(MARK_SENT, {"ids": delivered})
        return len(delivered)

    def drain(self, rows: int, timeout_s: float = 600.0) -> float:
        """Send ``rows`` rows; return messages/s."""
        sent = 0
        started = time.perf_counter()
        while sent < rows:
            sent += self.pass_once()
            if time.perf_counter() - started > timeout_s:
                raise RuntimeError(f"the bare relay sent {sent:,} of {rows:,} rows")
        return sent / (time.perf_counter() - started)


def _relay_forever(settings: Settings, engine: Engine, stop: threading.Event) -> None:
    relay = BareRelay(settings, engine)
    while not stop.is_set():
        if not relay.pass_once():
            stop.wait(IDLE_S)
    relay.producer.flush(10)


def consume_forever(
    settings: Settings,
    engine: Engine,
    topic: str,
    stop: threading.Event,
    after_store: Callable[[], None] | None = None,
) -> None:
    """The bare consumer loop; ``after_store`` runs after each inbox commit (the bare
    Celery pipeline kicks its processor task there)."""
    config = consumer_config(settings, f"bare-{topic}")
    config["fetch.wait.max.ms"] = 10
    kafka = Consumer(config)
    metadata = admin_client(settings).list_topics(topic, timeout=10).topics[topic]
    # From the offsets committed by the loop before it (none: the beginning).
    kafka.assign([TopicPartition(topic, p, OFFSET_STORED) for p in metadata.partitions])
    try:
        while not stop.is_set():
            batch = kafka.consume(1, 0.1)
            if batch:
                batch += kafka.consume(CONSUME_BATCH - 1, 0)
            records = [m for m in batch if m.error() is None]
            if not records:
                continue
            rows = []
            for m in records:
                headers = dict(m.headers() or [])
                key = m.key()
                message_id = headers["message_id"] or b""
                rows.append(
                    {
                        "message_id": _text(message_id),
                        "key": None if key is None else _text(key),
                        "payload": json.loads(m.value() or b"null"),
                    }
                )
            with engine.begin() as conn:
                conn.execute(STORE, {"rows": json.dumps(rows)})
            if after_store is not None:
                after_store()
            # Then the offsets: a loop started later resumes after what the inbox holds.
            ends = {m.partition() or 0: m.offset() or 0 for m in records}  # the last of each
            kafka.commit(
                offsets=[TopicPartition(topic, p, o + 1) for p, o in ends.items()],
                asynchronous=True,
            )
    finally:
        kafka.close()


def _text(value: str | bytes) -> str:
    return value if isinstance(value, str) else value.decode()


def handle(message_id: str, session: Session) -> None:
    """The bare handler: one effect row, as the benchmark's handler writes."""
    session.execute(EFFECT, {"id": message_id})


def process_once(engine: Engine) -> int:
    """Process one claim of up to 1,000 received rows; return how many."""
    with Session(engine) as session, session.begin():
        rows = session.execute(CLAIM_RECEIVED, {"limit": PROCESS_BATCH}).all()
        if rows:
            with session.begin_nested():
                for row in rows:
                    handle(row.message_id, session)
            session.execute(MARK_DONE, {"ids": [row.id for row in rows]})
    return len(rows)


def _process_forever(engine: Engine, stop: threading.Event) -> None:
    while not stop.is_set():
        if not process_once(engine):
            stop.wait(IDLE_S)


def main(argv: list[str]) -> None:
    """``python -m outbox.bench.bare relay|consume|process [TOPIC]``: run one loop
    until SIGTERM."""
    role = argv[1]
    settings = Settings.from_env()
    engine = make_engine(settings, pool_size=1)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"bare {role} ready", flush=True)
    if role == "relay":
        _relay_forever(settings, engine, stop)
    elif role == "consume":
        consume_forever(settings, engine, argv[2], stop)
    elif role == "process":
        _process_forever(engine, stop)
    else:
        raise SystemExit(f"unknown bare loop {role!r}")


if __name__ == "__main__":
    main(sys.argv)
