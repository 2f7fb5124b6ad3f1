"""Processing inbox rows, one lane at a time: handlers, backoff, dead letters.

A group's rows are spread over lanes by key hash. :meth:`LaneProcessor.run`
leases one lane (so one task at a time works it, in Kafka order), locks a
batch of its due rows, and runs each row's handler in a savepoint of one
transaction that also marks the row: done rows and their effects commit
together, so an effect happens exactly once. A failing row rolls back its own
savepoint only; it is scheduled again after an exponential backoff with full
jitter from the group's policy, or made dead once its attempts are spent (at
once for :class:`~consumer.handlers.Permanent`). In an ordered group, later
rows of a failing key wait for it; other keys flow.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
import uuid
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from consumer.acks import ack_payload, register_ack_topic, write_ack
from consumer.handlers import Message, Permanent, handler_for
from outbox import leases, queries
from outbox.publishing import Publisher
from outbox.retry import RetryPolicy
from outbox.settings import Settings

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 2000
DEFAULT_POLICY = RetryPolicy()


def lane_scope(group: str) -> str:
    """The lease scope of a group's lanes."""
    return f"lane:{group}"


@dataclasses.dataclass
class LaneReport:
    """What one :meth:`LaneProcessor.run` did, and when the lane has work again."""

    done: int = 0
    failed: int = 0
    dead: int = 0
    leased: bool = False
    # Seconds until the lane's next waiting row is due; None when nothing waits.
    next_due_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class _TopicPolicy:
    ordered: bool
    requires_ack: bool
    retry: RetryPolicy


# A topic the group has not registered: ordered, no acks, the default retry policy.
UNREGISTERED = _TopicPolicy(ordered=True, requires_ack=False, retry=DEFAULT_POLICY)


class LaneProcessor:
    """Runs handlers for inbox rows; make one per process and call :meth:`run`."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], worker: str) -> None:
        self.settings = settings
        self.sessions = sessions
        self.worker = worker
        self.owner = f"lane@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._scopes_ready: set[str] = set()
        self.publisher = Publisher(settings)
        self._ack_topic_ready = False

    def run(self, group: str, lane: int, budget_s: float | None = None) -> LaneReport:
        """Process the lane's due rows until none is left or ``budget_s`` ends."""
        s = self.settings
        deadline = time.monotonic() + (s.lane_budget_s if budget_s is None else budget_s)
        scope = lane_scope(group)
        report = LaneReport()
        with self.sessions.begin() as session:
            policies = self._policies(session, group)
            if not self._ack_topic_ready and any(p.requires_ack for p in policies.values()):
                register_ack_topic(session)
                self._ack_topic_ready = True
            if scope not in self._scopes_ready:
                leases.ensure_rows(session, scope, s.buckets)
                self._scopes_ready.add(scope)
            granted = leases.acquire(
                session, scope, self.owner, [lane], limit=1, lease_s=s.lane_lease_s
            )
        if not granted:
            return report  # another task works this lane now
        report.leased = True
        try:
            while time.monotonic() < deadline:
                taken, unblocked = self._batch(group, lane, policies, report)
                if taken < s.lane_batch_size and not unblocked:
                    break
                with self.sessions.begin() as session:
                    leases.acquire(
                        session, scope, self.owner, [lane], limit=1, lease_s=s.lane_lease_s
                    )
        finally:
            with self.sessions.begin() as session:
                leases.release(session, scope, self.owner, [lane])
                due = session.scalar(
                    queries.LANE_NEXT_DUE,
                    {"group": group, "lane": lane, "unordered_topics": _unordered(policies)},
                )
        report.next_due_s = None if due is None else max(float(due), 0.0)
        return report

    def _policies(self, session: Session, group: str) -> dict[str, _TopicPolicy]:
        return {
            topic: _TopicPolicy(
                ordered,
                requires_ack,
                RetryPolicy(base_s=base, factor=factor, cap_s=cap, max_attempts=most),
            )
            for topic, ordered, requires_ack, base, factor, cap, most in session.execute(
                queries.GROUP_POLICIES, {"group": group}
            )
        }

    def _batch(
        self, group: str, lane: int, policies: dict[str, _TopicPolicy], report: LaneReport
    ) -> tuple[int, bool]:
        """Process one locked batch in one transaction.

        Returns how many rows it held, and whether a retried row finished (done or dead),
        which lets later rows of its key go.
        """
        done: list[int] = []
        failures: list[tuple[int, str, float, str]] = []
        failure_acks: list[dict[str, Any]] = []
        with self.sessions.begin() as session:
            rows = session.execute(
                queries.CLAIM_LANE,
                {
                    "group": group,
                    "lane": lane,
                    "unordered_topics": _unordered(policies),
                    "limit": self.settings.lane_batch_size,
                },
            ).all()
            failed_keys: set[tuple[str, str]] = set()
            unblocked = False
            for row_id, message_id, topic, key, payload, headers, attempts, part, off in rows:
                policy = policies.get(topic, UNREGISTERED)
                if policy.ordered and key is not None and (topic, key) in failed_keys:
                    continue  # an earlier row of its key failed in this batch: it waits
                message = Message(message_id, topic, key, payload, headers, attempts + 1, part, off)
                savepoint = session.begin_nested()
                try:
                    handler_for(topic)(message, session)
                    if policy.requires_ack:
                        ack = ack_payload(message, group, self.worker)
                        write_ack(session, self.publisher, ack)
                    savepoint.commit()
                    done.append(row_id)
                    unblocked = unblocked or attempts > 0
                except Exception as exc:
                    savepoint.rollback()
                    attempt = attempts + 1
                    error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
                    if isinstance(exc, Permanent) or policy.retry.exhausted(attempt):
                        failures.append((row_id, "dead", 0.0, error))
                        report.dead += 1
                        unblocked = unblocked or attempts > 0
                    else:
                        failures.append((row_id, "failed", policy.retry.delay(attempt), error))
                        report.failed += 1
                    if key is not None:
                        failed_keys.add((topic, key))
                    if policy.requires_ack:
                        failure_acks.append(ack_payload(message, group, self.worker, error))
                    log.warning(
                        "lane %s/%d: message %s attempt %d failed: %s",
                        group,
                        lane,
                        message_id,
                        attempt,
                        error,
                    )
            if done:
                session.execute(queries.MARK_INBOX_DONE, {"ids": done, "worker": self.worker})
            if failures:
                ids, statuses, delays, errors = zip(*failures, strict=True)
                session.execute(
                    queries.MARK_INBOX_FAILED,
                    {
                        "ids": list(ids),
                        "statuses": list(statuses),
                        "delays": list(delays),
                        "errors": list(errors),
                        "worker": self.worker,
                    },
                )
            for ack in failure_acks:
                write_ack(session, self.publisher, ack)
        report.done += len(done)
        return len(rows), unblocked


def _unordered(policies: dict[str, _TopicPolicy]) -> list[str]:
    # A topic the group has not registered is ordered, with the default policy.
    return [topic for topic, policy in policies.items() if not policy.ordered]
