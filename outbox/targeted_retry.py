"""Targeted retry: send a message again to one consumer group that failed it or never
acknowledged it, aimed at a healthy worker.

:func:`retry_due` takes due deliveries in bounded batches, each batch locked
(``SKIP LOCKED``) and settled in one transaction with the retry rows it
publishes, so two retry tasks never publish the same retry twice. A retry is
a new outbox row repeating the original's key, payload, headers and
idempotency key, with headers naming the target group, the target worker and
the attempt; its ``message_id`` header stays the original's, so the group's
inbox knows it. The target is a worker whose heartbeat is within
``OUTBOX_AGENT_INACTIVE_AFTER``, preferably not the one that failed; with none,
the retry goes to any instance of the group. After ``max_retries`` retries
(-1: never) a delivery that is due again is dead.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
import zlib
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from outbox import queries
from outbox.metrics import MetricsRecorder
from outbox.retry import RetryPolicy
from outbox.settings import Settings, env_name
from outbox.wire import (
    HEADER_RETRY_ATTEMPT,
    HEADER_TARGET_GROUP,
    HEADER_TARGET_INSTANCE,
    bucket_for,
    message_headers,
)


@dataclasses.dataclass
class RetryReport:
    """What one :func:`retry_due` did."""

    retried: int = 0
    untargeted: int = 0
    dead: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def choose_target(message_id: uuid.UUID, failed_on: str | None, healthy: list[str]) -> str | None:
    """A healthy worker for a retry, preferring one other than ``failed_on``; spread over
    the candidates by message id, so one message keeps its choice while they stay."""
    others = [w for w in healthy if w != failed_on] or healthy
    if not others:
        return None
    return others[zlib.crc32(message_id.bytes) % len(others)]


def retry_due(
    settings: Settings, sessions: sessionmaker[Session], metrics: MetricsRecorder | None = None
) -> RetryReport:
    """Publish a retry for every due delivery, or make it dead past its group's retries."""
    report = RetryReport()
    while True:
        groups: list[str] = []
        with sessions.begin() as session:
            taken = _batch(settings, session, report, groups)
        if metrics is not None:
            metrics.retries(groups)  # committed
        if taken < settings.retry_batch_size:
            return report


def _batch(settings: Settings, session: Session, report: RetryReport, groups: list[str]) -> int:
    """One locked batch of due deliveries; appends each retried delivery's group to
    ``groups``. Returns how many deliveries it took."""
    due = session.execute(queries.DUE_DELIVERIES, {"limit": settings.retry_batch_size}).all()
    if not due:
        return 0
    healthy = list(
        session.scalars(queries.HEALTHY_WORKERS, {"window": settings.agent_inactive_after_s})
    )
    rows: list[dict[str, Any]] = []
    retried: list[tuple[int, float]] = []
    dead: list[int] = []
    too_old: list[int] = []
    for d in due:
        if d.max_retries != -1 and d.attempts >= d.max_retries:
            dead.append(d.id)
            continue
        if d.age_s >= settings.retention_dedup_s:
            # Past it, a group that processed the message may have forgotten it.
            too_old.append(d.id)
            continue
        attempt = d.attempts + 1
        target = choose_target(d.message_id, d.instance_id, healthy)
        headers = {
            # the original's id and correlation id: a retry's message_id is the original's
            **message_headers(str(d.message_id), d.headers),
            HEADER_TARGET_GROUP: d.group_name,
            HEADER_RETRY_ATTEMPT: str(attempt),
        }
        if target is not None:
            headers[HEADER_TARGET_INSTANCE] = target
        else:
            report.untargeted += 1
        rows.append(
            {
                "message_id": str(uuid.uuid4()),
                "topic": d.topic,
                "key": d.key,
                "payload": d.payload,
                "headers": headers,
                "idempotency_key": d.idempotency_key,
                # the original's bucket: the retry keeps its key's order on the relay
                "bucket": bucket_for(d.key, d.message_id, settings.buckets),
                "original_message_id": str(d.message_id),
                "target_group": d.group_name,
                "target_instance": target,
            }
        )
        policy = RetryPolicy.of_group(d)
        # Wait for this retry's ack, then back off before the next one.
        retried.append((d.id, d.ack_timeout_s + policy.delay(attempt)))
    if rows:
        session.execute(queries.INSERT_RETRIES, {"rows": json.dumps(rows)})
        ids, waits = zip(*retried, strict=True)
        session.execute(queries.MARK_DELIVERIES_RETRIED, {"ids": list(ids), "waits": list(waits)})
    if dead:
        session.execute(queries.MARK_DELIVERIES_DEAD, {"ids": dead, "why": None})
    if too_old:
        why = (
            f"no retry past the consumers' dedup window ({env_name('retention_dedup_s')}): "
            "a group that processed it could not tell it from a new message"
        )
        session.execute(queries.MARK_DELIVERIES_DEAD, {"ids": too_old, "why": why})
    groups.extend(row["target_group"] for row in rows)
    report.retried += len(rows)
    report.dead += len(dead) + len(too_old)
    return len(due)
