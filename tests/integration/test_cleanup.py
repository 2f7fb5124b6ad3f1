"""Cleanup on a real PostgreSQL, run by a real Celery worker: finished rows past their
retention go in bounded batches while publishing goes on; nothing unfinished is touched."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from outbox.db import make_engine
from outbox.publishing import Publisher
from outbox.registry import GroupSpec, put_group, register_topic
from outbox.settings import Settings
from tests.processes import ROOT, start_worker

TOPIC = "cleanup.orders"
OLD = "now() - interval '8 days'"

# Finished and past retention: all of it must go (100,000 rows).
SEED_FINISHED = f"""
INSERT INTO outbox_messages (message_id, topic, payload, bucket, status, sent_at, created_at)
SELECT gen_random_uuid(), '{TOPIC}', '{{}}', n % 16, 'sent', {OLD}, {OLD}
FROM generate_series(1, 60000) n;

-- sent, and acked by the group that needs acks: goes with its deliveries
WITH m AS (
    INSERT INTO outbox_messages (message_id, topic, payload, bucket, status, sent_at, created_at)
    SELECT gen_random_uuid(), '{TOPIC}', '{{}}', n % 16, 'sent', {OLD}, {OLD}
    FROM generate_series(1, 19000) n RETURNING message_id
)
INSERT INTO deliveries (message_id, consumer_group_id, status, updated_at)
SELECT m.message_id, g.id, 'acked', {OLD} FROM m, consumer_groups g WHERE g.name = 'billing';

INSERT INTO outbox_messages (message_id, topic, payload, bucket, status, created_at)
SELECT gen_random_uuid(), '{TOPIC}', '{{}}', 0, 'dead', now() - interval '40 days'
FROM generate_series(1, 1000) n;

INSERT INTO inbox_messages (consumer_group, message_id, topic, partition, "offset", lane,
                            payload, status, processed_at)
SELECT 'billing', gen_random_uuid(), '{TOPIC}', 0, n, n % 16, '{{}}', 'done', {OLD}
FROM generate_series(1, 20000) n;
"""
FINISHED = 100_000

# Not finished, or not past retention: every row must stay.
SEED_KEPT = f"""
INSERT INTO outbox_messages (message_id, topic, payload, bucket, status, created_at)
SELECT gen_random_uuid(), '{TOPIC}', '{{"kept": true}}', n % 16, 'pending', {OLD}
FROM generate_series(1, 1000) n;

INSERT INTO outbox_messages (message_id, topic, payload, bucket, status, sent_at)
SELECT gen_random_uuid(), '{TOPIC}', '{{"kept": true}}', n % 16, 'sent', now()
FROM generate_series(1, 500) n;

INSERT INTO outbox_messages (message_id, topic, payload, bucket, status, created_at)
SELECT gen_random_uuid(), '{TOPIC}', '{{"kept": true}}', 0, 'dead', now() - interval '2 days'
FROM generate_series(1, 100) n;

-- old and sent, but a delivery still waits for its ack, failed, or is a recent dead letter
WITH m AS (
    INSERT INTO outbox_messages (message_id, topic, payload, bucket, status, sent_at, created_at)
    SELECT gen_random_uuid(), '{TOPIC}', '{{"kept": true}}', n % 16, 'sent', {OLD}, {OLD}
    FROM generate_series(1, 600) n RETURNING message_id
)
INSERT INTO deliveries (message_id, consumer_group_id, status, updated_at)
SELECT m.message_id, g.id, (ARRAY['awaiting_ack', 'failed', 'dead'])[1 + (random() * 2)::int],
       now()
FROM m, consumer_groups g WHERE g.name = 'billing';

INSERT INTO inbox_messages (consumer_group, message_id, topic, partition, "offset", lane,
                            payload, status, received_at)
SELECT 'billing', gen_random_uuid(), '{TOPIC}', 1, n, n % 16, '{{"kept": true}}',
       (ARRAY['received', 'failed'])[1 + n % 2], {OLD}
FROM generate_series(1, 1000) n;
"""
KEPT_OUTBOX = 1000 + 500 + 100 + 600
KEPT_INBOX = 1000


def _count(engine: Engine, sql: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(sql)).scalar_one())


def _old_finished(engine: Engine) -> int:
    return _count(
        engine,
        "SELECT (SELECT count(*) FROM outbox_messages WHERE payload = '{}')"
        " + (SELECT count(*) FROM inbox_messages WHERE status = 'done')",
    )


def test_cleanup_deletes_old_finished_rows_in_bounded_batches_while_publishing_goes_on(
    settings: Settings, engine: Engine, session: Session, tmp_path: Path
):
    s = settings.replace(cleanup_batch_size=5000, cleanup_pause_ms=20)
    register_topic(session, TOPIC)
    put_group(session, GroupSpec(name="billing", topic=TOPIC, requires_ack=True))
    session.commit()
    with engine.begin() as conn:
        conn.execute(text(SEED_FINISHED))
        conn.execute(text(SEED_KEPT))
    assert _old_finished(engine) == FINISHED

    # A dry run counts what would go and deletes nothing.
    dry = subprocess.run(
        [sys.executable, "-m", "outbox", "cleanup", "--dry-run"],
        cwd=ROOT,
        env={**os.environ, **s.as_env()},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dry.returncode == 0, dry.stderr
    would = {
        line.split()[0]: int(line.split()[-1].replace(",", ""))
        for line in dry.stdout.split("\n")
        if line
    }
    assert would["outbox_sent"] == 79_000 and would["outbox_dead"] == 1000
    assert would["inbox_done"] == 20_000 and would["inbox_dead"] == 0
    assert _old_finished(engine) == FINISHED

    # Publishing goes on throughout; each commit is timed.
    stop = threading.Event()
    waits: list[float] = []
    publisher, publish_engine = Publisher(s), make_engine(s, pool_size=1)

    def publish() -> None:
        while not stop.is_set():
            started = time.monotonic()
            with publish_engine.begin() as conn:
                publisher.publish(conn, TOPIC, {"live": True}, key="k")
            waits.append(time.monotonic() - started)

    publishing = threading.Thread(target=publish)
    publishing.start()
    worker = start_worker(s, "cleaner", tmp_path)
    try:
        worker.wait_ready()
        from tasks.factory import make_celery

        make_celery(s).send_task("outbox.cleanup")
        deadline = time.monotonic() + 120
        while _old_finished(engine) and time.monotonic() < deadline:
            time.sleep(0.2)
        done = re.search(r"outbox\.cleanup\[[^\]]+\] succeeded in [\d.]+s: (\{.*\})", worker.text())
        deadline = time.monotonic() + 30
        while done is None and time.monotonic() < deadline:
            time.sleep(0.2)
            done = re.search(
                r"outbox\.cleanup\[[^\]]+\] succeeded in [\d.]+s: (\{.*\})", worker.text()
            )
    finally:
        stop.set()
        publishing.join(30)
        worker.stop()
        publish_engine.dispose()

    # Every old finished row is gone, with the acked deliveries of its messages; each
    # processed message's id stays for the dedup window.
    assert _old_finished(engine) == 0
    assert _count(engine, "SELECT count(*) FROM inbox_dedup") == 20_000
    assert _count(engine, "SELECT count(*) FROM deliveries WHERE status = 'acked'") == 0
    # Nothing unfinished (or finished too recently) was touched.
    assert (
        _count(engine, """SELECT count(*) FROM outbox_messages WHERE payload = '{"kept": true}'""")
        == KEPT_OUTBOX
    )
    assert _count(engine, "SELECT count(*) FROM deliveries") == 600
    assert (
        _count(engine, """SELECT count(*) FROM inbox_messages WHERE payload = '{"kept": true}'""")
        == KEPT_INBOX
    )
    assert _count(
        engine, """SELECT count(*) FROM outbox_messages WHERE payload = '{"live": true}'"""
    ) == len(waits)
    # Publishing never waited on cleanup; no single DELETE went past the batch size.
    assert waits and max(waits) < 1.0, max(waits)
    assert done is not None, worker.text()[-3000:]
    report = ast.literal_eval(done.group(1))
    assert report["deleted"]["outbox_sent"] == 79_000
    assert 0 < report["largest_batch"] <= 5000
    assert report["batches"] >= FINISHED // 5000
