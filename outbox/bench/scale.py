"""``outbox bench scale``: relay and end-to-end throughput with 1 and 2 worker processes.

Each worker is a Celery worker of its own with one pool process, the way
``docker compose up --scale worker=N`` runs them. In alternating rounds:

* relay: ``rows`` outbox rows relayed by the workers (``bench relay``'s worker
  relay); the relays share the key buckets through their leases;
* end to end: ``messages`` published in batches, through a consumer process, to
  the handler's effect by the workers' lane tasks (``bench e2e``'s throughput).

All processes and the services share this machine's cores, so a second worker
gains only what the first left idle.
"""

from __future__ import annotations

import statistics

from outbox.bench.e2e import System, prepare
from outbox.bench.relay import TOPIC as RELAY_TOPIC
from outbox.bench.relay import worker_relay
from outbox.bench.report import Report, progress
from outbox.kafka import admin_client, ensure_topics
from outbox.settings import Settings

INSTANCES = (1, 2)


def run(settings: Settings, *, rows: int, messages: int, rounds: int, command: str) -> Report:
    """The scaling scenario on running services; returns the report."""
    report = Report("scale", command)
    ensure_topics(admin_client(settings), [RELAY_TOPIC], settings.kafka_topic_partitions)
    relay: dict[int, list[float]] = {n: [] for n in INSTANCES}
    e2e: dict[int, list[float]] = {n: [] for n in INSTANCES}
    s, engine = prepare(settings)
    try:
        for r in range(1, rounds + 1):
            for n in INSTANCES:
                progress(f"round {r}/{rounds}: relay, {n} worker process(es), {rows:,} rows")
                relay[n].append(worker_relay(s, rows, 200, 1000, n))
            for n in INSTANCES:
                progress(f"round {r}/{rounds}: end to end, {n} worker process(es)")
                system = System(s, engine, concurrency=1, instances=n)
                with system.running():
                    e2e[n].append(system.throughput(messages))
    finally:
        engine.dispose()
    for name, results in (("relay", relay), ("publish -> handler effect", e2e)):
        for n in INSTANCES:
            shown = ", ".join(f"{v:,.0f}" for v in results[n])
            report.add(
                f"{name}, {n} worker process{'es' if n > 1 else ''}",
                statistics.median(results[n]),
                "msg/s",
                f"median; rounds: {shown}",
            )
        gain = statistics.median(results[2]) / statistics.median(results[1])
        report.add(f"{name}: 2 workers / 1", 100 * gain, "%")
    report.target(
        "relay with 2 workers at least as fast as with 1",
        statistics.median(relay[2]),
        statistics.median(relay[1]) * 0.9,
    )
    return report
