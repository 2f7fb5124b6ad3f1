"""``/metrics`` (Prometheus text format), ``/v1/stats`` and ``/v1/tasks/<name>/run``.

A scrape does a bounded amount of work whatever the table sizes, and gives the
same answer from every gunicorn process (no per-process state, so no
prometheus-client multiprocess mode):

- the gauges of rows by topic, group and status, the oldest claimable age,
  consumer lag and dead letters come from the latest health snapshot, which
  ``outbox.heartbeat`` takes every ``OUTBOX_HEARTBEAT_INTERVAL_S``; its age is
  exported too (``outbox_health_snapshot_age_seconds``);
- live agents by role are counted from the small ``agents`` table;
- the counters and the commit-to-ack histogram are read from Redis, where workers
  add to them after each commit (``outbox.metrics``).

A source that cannot be read is left out and ``outbox_metrics_source_up`` says
which; the scrape itself still answers 200.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, jsonify
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from api.auth import v1_blueprint
from api.operations import TAG
from api.schemas import ErrorOut, StatsOut, StatsQuery, TaskPath, TaskRunOut
from api.state import ApiState, state
from outbox import queries
from outbox.heartbeat import latest_snapshot
from outbox.metrics import CIRCUIT_STATES, circuit_summary, published_series, read_counters
from outbox.tasknames import BEAT_TASKS

log = logging.getLogger(__name__)

# The text format every Prometheus server reads (generate_latest writes it).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

prometheus = Blueprint("prometheus", __name__)
stats = v1_blueprint("stats", __name__, TAG)


@prometheus.get("/metrics")
def metrics() -> Response:
    """Prometheus text exposition (bearer token, like ``/v1``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(OutboxCollector(state()))
    return Response(generate_latest(registry), content_type=CONTENT_TYPE)


@stats.get("/stats", responses={200: StatsOut, 422: ErrorOut})
def get_stats(query: StatsQuery) -> tuple[Response, int]:
    """The relay's counters, its circuits and messages published per second (from Redis,
    where workers count them after each commit)."""
    s = state()
    view = read_counters(s.redis, circuit_max_age_s=s.settings.agent_inactive_after_s)
    view["circuit"] = circuit_summary(view["circuits"])
    view["published_per_s"] = published_series(s.redis, query.minutes)
    return jsonify(view), 200


@stats.post("/tasks/<name>/run", responses={202: TaskRunOut, 422: ErrorOut})
def run_task(path: TaskPath) -> tuple[Response, int]:
    """Run a beat task now (publish, retry_targeted, cleanup, heartbeat or sweep) on any worker."""
    s = state()
    name = BEAT_TASKS[path.name].task
    result = s.celery.send_task(name, expires=60)
    return jsonify(task=name, task_id=result.id), 202


class OutboxCollector(Collector):
    """The metrics of one scrape."""

    def __init__(self, api: ApiState) -> None:
        self.api = api

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "outbox_metrics_source_up",
            "1 if this scrape could read the source (database, redis)",
            labels=["source"],
        )
        for source, read in (("database", self._from_database), ("redis", self._from_redis)):
            try:
                families = list(read())
            except Exception as exc:
                log.warning("/metrics: %s not read: %s: %s", source, type(exc).__name__, exc)
                up.add_metric([source], 0)
            else:
                up.add_metric([source], 1)
                yield from families
        yield up

    def _from_database(self) -> Iterator[Metric]:
        with self.api.sessions() as session:
            snapshot = latest_snapshot(session)
            agents: dict[str, int] = dict(session.execute(queries.ACTIVE_AGENTS_BY_ROLE).all())
        live = GaugeMetricFamily(
            "outbox_agents_active", "Agents heartbeating as active, by role", labels=["role"]
        )
        for role in ("api", "worker", "beat", "consumer"):
            live.add_metric([role], agents.get(role, 0))
        yield live
        if snapshot is None:
            return
        yield from _snapshot_families(snapshot)

    def _from_redis(self) -> Iterator[Metric]:
        view = read_counters(
            self.api.redis, circuit_max_age_s=self.api.settings.agent_inactive_after_s
        )
        for name, help_text, label, values in (
            (
                "outbox_relay_published",
                "Messages relayed to Kafka (broker acked, row marked sent)",
                "topic",
                view["published"],
            ),
            (
                "outbox_relay_failed",
                "Relay attempts that Kafka refused for the message itself",
                "topic",
                view["failed"],
            ),
            ("outbox_retries_published", "Targeted retries published", "group", view["retries"]),
            (
                "outbox_relay_producer_replaced",
                "Relay producers replaced after an error that left them unusable (fenced, "
                "fatal), by error",
                "error",
                view["producer_replaced"],
            ),
        ):
            counter = CounterMetricFamily(name, help_text, labels=[label])
            for value, n in sorted(values.items()):
                counter.add_metric([value], n)
            yield counter
        latency = view["latency"]
        yield HistogramMetricFamily(
            "outbox_relay_commit_to_ack_seconds",
            "From a row's commit (its transaction's start) to its mark as sent after the "
            "broker's ack",
            buckets=[
                *((_le(bound), n) for bound, n in latency["buckets"]),
                ("+Inf", latency["count"]),
            ],
            sum_value=latency["sum"],
        )
        circuit = GaugeMetricFamily(
            "outbox_relay_circuit_state",
            "Each live relay's broker circuit: 1 on its current state",
            labels=["relay", "state"],
        )
        for relay, current in sorted(view["circuits"].items()):
            for name in CIRCUIT_STATES:
                circuit.add_metric([relay, name], 1 if name == current else 0)
        yield circuit


def _le(bound: float) -> str:
    return repr(float(bound))


def _snapshot_families(snapshot: dict[str, Any]) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "outbox_health_snapshot_age_seconds",
        "Age of the health snapshot that the gauges below come from",
        value=snapshot["age_s"],
    )
    oldest = snapshot["oldest_claimable_age_s"]
    yield GaugeMetricFamily(
        "outbox_oldest_claimable_age_seconds",
        "Age of the oldest outbox row the relay could send now (0: none)",
        value=oldest or 0.0,
    )
    counts = snapshot["counts"]
    for name, help_text, label, side in (
        ("outbox_messages", "Outbox rows by topic and status", "topic", "outbox"),
        ("outbox_inbox_messages", "Inbox rows by consumer group and status", "group", "inbox"),
        (
            "outbox_deliveries",
            "Deliveries awaiting an ack, failed or dead, by consumer group",
            "group",
            "deliveries",
        ),
    ):
        gauge = GaugeMetricFamily(name, help_text, labels=[label, "status"])
        for owner, statuses in sorted(counts.get(side, {}).items()):
            for status, n in sorted(statuses.items()):
                gauge.add_metric([owner, status], n)
        yield gauge
    dead = GaugeMetricFamily(
        "outbox_dead_letters",
        "Dead letters by consumer group: inbox rows (side=inbox) and deliveries (side=delivery)",
        labels=["group", "side"],
    )
    for side, key in (("inbox", "inbox"), ("delivery", "deliveries")):
        for group, statuses in sorted(counts.get(key, {}).items()):
            dead.add_metric([group, side], statuses.get("dead", 0))
    yield dead
    lag = GaugeMetricFamily(
        "outbox_consumer_lag",
        "Messages in Kafka not yet committed by the group",
        labels=["group", "topic", "partition"],
    )
    for group, topics in sorted(snapshot["consumer_lag"].items()):
        if "error" in topics:
            continue
        for topic, partitions in sorted(topics.items()):
            for partition, n in sorted(partitions.items(), key=lambda kv: int(kv[0])):
                lag.add_metric([group, topic, partition], n)
    yield lag
