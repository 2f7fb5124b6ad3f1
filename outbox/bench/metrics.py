"""``outbox bench metrics``: what ``/metrics`` costs with a large outbox.

The outbox gets ``rows`` rows over ten topics (90 % sent, 9 % pending, 1 % dead),
and the inbox a tenth as many. Then, in the same run:

* the limit a scrape avoids: one ``GROUP BY topic, status`` over the outbox,
  which is what counting rows at scrape time would cost;
* ``outbox.heartbeat``'s snapshot, which does that counting in the background;
* ``GET /metrics`` over HTTP from the API under gunicorn (2 workers), with
  Redis counters in place: the time a Prometheus server waits.
"""

from __future__ import annotations

import statistics
import time
import urllib.request

from sqlalchemy import Engine, text

from outbox.bench.latency import percentile
from outbox.bench.report import Report, progress
from outbox.db import autocommit, make_engine, make_sessionmaker
from outbox.devstack import processes
from outbox.devstack.server import free_port
from outbox.heartbeat import record_heartbeat
from outbox.metrics import MetricsRecorder, Sent
from outbox.registry import GroupSpec, put_group, register_topic
from outbox.settings import Settings

TOPICS = 10
GROUP = "bench-metrics"
TOKEN = "bench-metrics"

_FILL_OUTBOX = text("""
INSERT INTO outbox_messages (message_id, topic, key, payload, bucket, status, sent_at)
SELECT gen_random_uuid(), 'bench.metrics.' || (n % :topics), 'k' || (n % 1000),
       jsonb_build_object('n', n), n % :buckets,
       CASE WHEN n % 100 < 90 THEN 'sent' WHEN n % 100 < 99 THEN 'pending' ELSE 'dead' END,
       CASE WHEN n % 100 < 90 THEN now() END
FROM generate_series(:first, :last) AS n
""")

_FILL_INBOX = text("""
INSERT INTO inbox_messages (consumer_group, message_id, topic, partition, "offset", lane,
                            payload, status)
SELECT :group, gen_random_uuid(), 'bench.metrics.0', 0, n, n % 64, '{}',
       CASE WHEN n % 100 < 97 THEN 'done' WHEN n % 100 < 99 THEN 'failed' ELSE 'dead' END
FROM generate_series(1, :count) AS n
""")


def _timed(engine: Engine, sql: str) -> float:
    with engine.connect() as conn:
        started = time.perf_counter()
        conn.execute(text(sql)).all()
        return (time.perf_counter() - started) * 1000


def fill(settings: Settings, engine: Engine, rows: int) -> None:
    with make_sessionmaker(engine).begin() as session:
        for n in range(TOPICS):
            register_topic(session, f"bench.metrics.{n}")
        put_group(session, GroupSpec(name=GROUP, topic="bench.metrics.0"))
    step = 200_000
    for first in range(1, rows + 1, step):
        last = min(first + step - 1, rows)
        progress(f"  outbox rows {first:,}..{last:,}")
        with engine.begin() as conn:
            conn.execute(
                _FILL_OUTBOX,
                {"topics": TOPICS, "buckets": settings.buckets, "first": first, "last": last},
            )
    with engine.begin() as conn:
        conn.execute(_FILL_INBOX, {"group": GROUP, "count": rows // 10})
    with autocommit(engine) as conn:
        conn.execute(text("VACUUM ANALYZE"))


def _gunicorn(settings: Settings) -> tuple[processes.Process, str]:
    port = free_port()
    spec = processes.gunicorn("api", "api:create_app()", port, workers=2)
    server = processes.Process(spec, settings).start()
    server.wait_ready()
    return server, f"http://127.0.0.1:{port}"


def _scrape(url: str) -> tuple[float, int]:
    request = urllib.request.Request(f"{url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=30) as response:
        body = response.read()
    return (time.perf_counter() - started) * 1000, len(body)


def run(settings: Settings, *, rows: int, scrapes: int, command: str) -> Report:
    """The metrics scenario on running services; returns the report."""
    report = Report("metrics", command)
    s = settings.replace(api_tokens=(TOKEN,))
    engine = make_engine(s)
    try:
        progress(f"filling the outbox with {rows:,} rows and the inbox with {rows // 10:,}")
        fill(s, engine, rows)
        naive = [
            _timed(engine, "SELECT topic, status, count(*) FROM outbox_messages GROUP BY 1, 2")
            for _ in range(3)
        ]
        report.add(
            "GROUP BY topic, status over the outbox (avoided)",
            statistics.median(naive),
            "ms",
            "median of 3",
        )
        sessions = make_sessionmaker(engine)
        snapshots = []
        for _ in range(3):
            started = time.perf_counter()
            record_heartbeat(s, sessions, {})
            snapshots.append((time.perf_counter() - started) * 1000)
        report.add(
            "heartbeat snapshot (background)", statistics.median(snapshots), "ms", "median of 3"
        )
        recorder = MetricsRecorder(s)
        for n in range(TOPICS):
            # 100 rows sent 20 ms after their commits (bucket 2: at most 25 ms)
            recorder.relay_batch([Sent(f"bench.metrics.{n}", 2, 100, 100 * 0.02)], [])
        recorder.circuit("relay@bench", "closed")

        server, url = _gunicorn(s)
        try:
            for _ in range(5):
                _scrape(url)  # both gunicorn workers connected
            progress(f"{scrapes} scrapes of {url}/metrics")
            timings = []
            size = 0
            for _ in range(scrapes):
                elapsed, size = _scrape(url)
                timings.append(elapsed)
                time.sleep(0.05)
        finally:
            server.stop()
    finally:
        engine.dispose()
    report.add("outbox rows", rows, "rows")
    report.add("/metrics body", size, "bytes")
    report.add("GET /metrics, p50", percentile(timings, 0.5), "ms", f"{scrapes} scrapes")
    p99 = report.add("GET /metrics, p99", percentile(timings, 0.99), "ms")
    report.add("GET /metrics, max", max(timings), "ms")
    report.series["GET /metrics"] = timings
    report.target("a scrape answers in under 200 ms (p99)", p99, 200.0, at_most=True)
    return report
