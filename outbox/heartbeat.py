"""Heartbeats: which processes are alive (``agents``), and a health snapshot.

``outbox.heartbeat`` asks every Celery worker for its stats over the broker and
hands them to :func:`record_heartbeat`, which upserts a ``worker`` agent per
answer (and the ``beat`` agent that scheduled the tick), marks agents silent
past ``OUTBOX_AGENT_INACTIVE_AFTER`` inactive, and stores a snapshot: backlog
by status, the oldest claimable row's age, dead letters, consumer lag per
group, topic and partition, live agents by role, and rows by topic or group
and status (the gauges of ``/metrics``). Consumer processes and
the API heartbeat themselves. Every time is the database clock's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec
from sqlalchemy.orm import Session, sessionmaker

from outbox import queries
from outbox.agents import upsert_agent
from outbox.kafka import admin_client, bootstrap
from outbox.settings import Settings

log = logging.getLogger(__name__)

KAFKA_TIMEOUT_S = 2.0
# The backlog totals of a snapshot: side -> statuses, summed over topics or groups.
BACKLOG_STATUSES = {
    "outbox": ("pending", "dead"),
    "inbox": ("received", "failed", "dead"),
    "deliveries": ("awaiting_ack", "failed", "dead"),
}


@dataclasses.dataclass
class HeartbeatReport:
    """What one heartbeat saw and recorded."""

    workers: list[str] = dataclasses.field(default_factory=list)
    inactive: list[str] = dataclasses.field(default_factory=list)
    snapshot_id: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def worker_agent(node: str, stats: Mapping[str, Any]) -> dict[str, Any]:
    """An agent row's fields from one worker's ``inspect().stats()`` answer."""
    pool = stats.get("pool") or {}
    implementation = str(pool.get("implementation", ""))
    return {
        "instance": node,
        "host": node.partition("@")[2] or node,
        "pid": int(stats.get("pid") or 0),
        "health": {
            # "celery.concurrency.prefork:TaskPool" -> "prefork"
            "pool": implementation.rpartition(":")[0].rpartition(".")[2] or implementation,
            "concurrency": pool.get("max-concurrency"),
            "processed": sum((stats.get("total") or {}).values()),
        },
    }


_admin: tuple[int, str, AdminClient] | None = None


def _admin_for(settings: Settings) -> AdminClient:
    """This process's admin client, made on first use after fork and kept: a new one
    takes some 50 ms to find a group's coordinator, a kept one a round trip."""
    global _admin
    key = (os.getpid(), bootstrap(settings))
    if _admin is None or _admin[:2] != key:
        _admin = (*key, admin_client(settings))
    return _admin[2]


def consumer_lag(settings: Settings, groups: Mapping[str, list[str]]) -> dict[str, Any]:
    """Per group, topic and partition: messages in Kafka not yet committed by the group.

    One admin client asks for the topics, each group's committed offsets (a request per
    group) and every partition's end offsets (one request per broker), so a heartbeat
    holds its pool process for a few round trips. A group that cannot be read (broker
    down, say) gets ``{"error": ...}`` instead.
    """
    lag: dict[str, Any] = {}
    if not groups:
        return lag
    admin = _admin_for(settings)
    try:
        metadata = admin.list_topics(timeout=KAFKA_TIMEOUT_S).topics
    except Exception as exc:
        return {group: {"error": f"{type(exc).__name__}: {exc}"} for group in groups}
    wanted = {
        group: [
            TopicPartition(topic, p)
            for topic in topics
            if topic in metadata
            for p in sorted(metadata[topic].partitions)
        ]
        for group, topics in groups.items()
    }
    committed: dict[str, dict[tuple[str, int], int]] = {}
    for group, partitions in wanted.items():
        if not partitions:
            lag[group] = {}
            continue
        try:
            (future,) = admin.list_consumer_group_offsets(
                [ConsumerGroupTopicPartitions(group, partitions)],
                request_timeout=KAFKA_TIMEOUT_S,
            ).values()
            offsets = future.result().topic_partitions
            committed[group] = {(tp.topic, tp.partition): tp.offset for tp in offsets}
        except Exception as exc:
            lag[group] = {"error": f"{type(exc).__name__}: {exc}"}
    try:
        ends = _offsets(admin, {k for c in committed.values() for k in c}, OffsetSpec.latest())
        # A partition the group never committed counts from its first offset.
        unstarted = {k for c in committed.values() for k, o in c.items() if o < 0}
        starts = _offsets(admin, unstarted, OffsetSpec.earliest())
    except Exception as exc:
        return {**lag, **{g: {"error": f"{type(exc).__name__}: {exc}"} for g in committed}}
    for group, offsets in committed.items():
        per_topic: dict[str, dict[str, int]] = {}
        try:
            for (topic, partition), offset in sorted(offsets.items()):
                key = (topic, partition)
                position = offset if offset >= 0 else starts[key].result().offset
                high = ends[key].result().offset
                per_topic.setdefault(topic, {})[str(partition)] = max(high - position, 0)
            lag[group] = per_topic
        except Exception as exc:
            lag[group] = {"error": f"{type(exc).__name__}: {exc}"}
    return lag


def _offsets(
    admin: AdminClient, partitions: set[tuple[str, int]], spec: OffsetSpec
) -> dict[tuple[str, int], Any]:
    """Futures of the offsets ``spec`` names, by (topic, partition)."""
    if not partitions:
        return {}
    futures = admin.list_offsets(
        {TopicPartition(t, p): spec for t, p in partitions}, request_timeout=KAFKA_TIMEOUT_S
    )
    return {(tp.topic, tp.partition): f for tp, f in futures.items()}


def record_heartbeat(
    settings: Settings,
    sessions: sessionmaker[Session],
    worker_stats: Mapping[str, Mapping[str, Any]],
    *,
    beat: str | None = None,
) -> HeartbeatReport:
    """Upsert the workers that answered (and ``beat``), mark the silent inactive, and
    store a health snapshot."""
    report = HeartbeatReport()
    with sessions.begin() as session:
        for node, stats in sorted(worker_stats.items()):
            agent = worker_agent(node, stats)
            upsert_agent(
                session,
                agent["instance"],
                "worker",
                host=agent["host"],
                pid=agent["pid"],
                health=agent["health"],
            )
            report.workers.append(node)
        if beat:
            upsert_agent(session, beat, "beat")
        report.inactive = list(
            session.scalars(
                queries.MARK_AGENTS_INACTIVE, {"after": settings.agent_inactive_after_s}
            )
        )
        groups: dict[str, list[str]] = {}
        for name, topic in session.execute(queries.ACTIVE_GROUP_TOPICS):
            groups.setdefault(name, []).append(topic)
    lag = consumer_lag(settings, groups)
    with sessions.begin() as session:
        counts = {
            "outbox": _nested(session.execute(queries.OUTBOX_COUNTS)),
            "inbox": _nested(session.execute(queries.INBOX_COUNTS)),
            "deliveries": _nested(session.execute(queries.DELIVERY_COUNTS)),
        }
        backlog = {
            f"{side}_{status}": _total(counts[side], status)
            for side, statuses in BACKLOG_STATUSES.items()
            for status in statuses
        }
        oldest = session.scalar(queries.OLDEST_CLAIMABLE_AGE)
        agents = {role: n for role, n in session.execute(queries.ACTIVE_AGENTS_BY_ROLE)}
        dead = backlog["outbox_dead"] + backlog["inbox_dead"] + backlog["deliveries_dead"]
        report.snapshot_id = session.scalar(
            queries.INSERT_SNAPSHOT,
            {
                "backlog": json.dumps(backlog),
                "oldest": None if oldest is None else float(oldest),
                "dead_letters": dead,
                "lag": json.dumps(lag),
                "agents": json.dumps(agents),
                "counts": json.dumps(counts),
            },
        )
    if report.inactive:
        log.info("heartbeat: agents now inactive: %s", ", ".join(report.inactive))
    return report


def _nested(rows: Iterable[Any]) -> dict[str, dict[str, int]]:
    """``(name, status, n)`` rows as ``{name: {status: n}}``."""
    nested: dict[str, dict[str, int]] = {}
    for name, status, n in rows:
        nested.setdefault(name, {})[status] = n
    return nested


def _total(by_name: Mapping[str, Mapping[str, int]], status: str) -> int:
    return sum(statuses.get(status, 0) for statuses in by_name.values())


def latest_snapshot(session: Session) -> dict[str, Any] | None:
    """The newest health snapshot with its age in seconds (database clock), or None."""
    row = session.execute(queries.LATEST_SNAPSHOT).mappings().first()
    if row is None:
        return None
    view = dict(row)
    view["taken_at"] = view["taken_at"].isoformat()
    view["age_s"] = float(view["age_s"])
    return view
