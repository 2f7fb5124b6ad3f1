"""The relay: committed outbox rows to Kafka, at least once, in order per key.

One pass of :meth:`Relay.run`:

1. lease key buckets that have claimable rows (at most ``relay_buckets_per_task``),
   so concurrent relays share the buckets and never hold the same one;
2. claim a batch of their rows in id order, locking them with ``FOR UPDATE SKIP
   LOCKED``, and commit; the same statement checks and renews the bucket leases by
   the database clock and stamps them with the claim's token until the lease's end,
   so no relay claims in a bucket while an earlier claim there is unsettled, and a
   claim never outlives its bucket's lease (the rows themselves are not rewritten);
3. produce outside any transaction and wait for the delivery reports;
4. mark rows sent (with partition and offset) only while the claim's bucket leases
   still hold its token; failed rows back off and end dead after the last attempt;
   rows that met a broker outage are left as they are and the circuit opens; rows
   whose topic or partition alone is unavailable back off, spending attempts only
   once they have waited past ``relay_topic_error_grace_s``. The same transaction
   settles the claim.

A relay that dies stops renewing: its bucket leases and claims expire and another
relay takes them over. Rows are never chosen by an id cursor, since ids are not
commit order.

Per-key order: a key maps to one bucket, one relay holds a bucket, and rows go
out in id order; a row that failed holds back later rows of its key until it
is sent. The idempotent producer keeps the order within a batch; should a
message fail for a reason of its own while later ones of its key succeed,
those later ones are already in Kafka and the failed one follows on retry.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

from sqlalchemy import Connection
from sqlalchemy.orm import Session, sessionmaker

from outbox import leases, queries
from outbox.agents import owner_id
from outbox.budget import Budget
from outbox.circuit import Circuit
from outbox.db import as_tuples, execute, int_array, make_engine, make_sessionmaker, polling
from outbox.metrics import LATENCY_BUCKETS, MetricsRecorder, Sent
from outbox.models import MAX_ERROR_CHARS
from outbox.producer import DeliveryReport, Outgoing, RelayProducer
from outbox.retry import RetryPolicy
from outbox.settings import Settings, env_name
from outbox.wire import HEADER_CORRELATION_ID, HEADER_MESSAGE_ID, message_headers

log = logging.getLogger(__name__)

SCOPE = leases.RELAY_SCOPE
# With no delivery for this long, check that a broker answers before claiming.
IDLE_PROBE_S = 5.0
# A lingering relay looks at the whole index of waiting rows (RELAY_ANY_DUE) at most this
# often once it has claimed rows; between those looks, at rows newer than the newest it
# claimed (RELAY_ANY_NEW), which costs the same however many sent rows wait for vacuum.
FULL_LOOK_S = 0.05
# A lingering relay whose look found due rows but none it may send, while no other relay
# held a bucket (so all of them wait behind a failed row of their key), looks again
# bucket by bucket only at the rows newer than the newest there was then, and at every
# row at most this often: held rows can be many, and reading them all at each poll kept
# a core of PostgreSQL busy for as long as a failed row backed off. The next whole look
# finds a backoff that ended and a row that committed after a newer one. (Rows in
# buckets other relays hold are looked at in every look: those relays give their
# buckets back as soon as they have sent what they claimed.)
RECHECK_S = 0.5


@dataclasses.dataclass(frozen=True)
class Claim:
    """A claimed batch: its token, its rows in id order, each row's attempts so far, and
    whether every bucket gave fewer rows and bytes than its share (so none has more to
    send now)."""

    token: uuid.UUID
    rows: list[Outgoing]
    attempts: dict[int, int]
    drained: bool


@dataclasses.dataclass
class RelayReport:
    """What one :meth:`Relay.run` did."""

    sent: int = 0
    failed: int = 0
    deferred: int = 0
    released: int = 0
    batches: int = 0
    buckets: int = 0
    circuit: str = "closed"
    elapsed_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Linger(Protocol):
    """How a relay task stays on while the outbox is empty (``tasks.relay`` gives one): it
    holds the kick flag, so commits meanwhile queue no task, waits for new rows, and lets
    the flag go before its last look."""

    def hold(self) -> bool:
        """Kicks send nothing from now on: this task looks for new rows. False when
        another task does so already: this one sends the rows it finds and ends."""

    def keep_waiting(self, idle_s: float) -> bool:
        """Whether to go on waiting after ``idle_s`` without rows (False: end the task)."""

    def let_go(self) -> None:
        """Kicks send tasks again (called before the task's last look)."""

    def backlog(self, found: bool) -> None:
        """Whether this task's last claim found a backlog (its buckets filled their
        shares): while it does, kicks send tasks again and they share the buckets with
        it; once a claim is light, it sees every commit alone again."""


def _placements(sent: list[DeliveryReport]) -> str:
    """``{"<row id>": [partition, offset], ...}`` of the delivered rows, as JSON."""
    return "{" + ",".join(f'"{d.id}":[{d.partition},{d.offset}]' for d in sent) + "}"


class _Claimed(NamedTuple):
    """A claimed outbox row: the columns of :data:`outbox.queries.CLAIM_BATCH`, in their
    order; message id, payload and headers as text."""

    id: int
    message_id: str
    topic: str
    key: str | None
    payload: str
    headers: str
    attempts: int
    bucket: int
    full: bool


def _wire_headers(rows: Sequence[_Claimed]) -> list[list[tuple[str, str | bytes | None]]]:
    """Each claimed row's Kafka headers (:func:`outbox.wire.message_headers`). Most rows
    store none (``{}``): theirs are the message id twice, made without JSON. The others'
    are decoded in one call: a call per row was the largest part of the claim's own
    (Python) time."""
    stored = [row.headers for row in rows]
    given = [n for n, text in enumerate(stored) if text != "{}"]
    decoded = json.loads("[" + ",".join([stored[n] for n in given]) + "]") if given else []
    wire: list[list[tuple[str, str | bytes | None]]] = []
    for row in rows:
        encoded = row.message_id.encode()
        wire.append([(HEADER_CORRELATION_ID, encoded), (HEADER_MESSAGE_ID, encoded)])
    for n, headers in zip(given, decoded, strict=True):
        stated = message_headers(rows[n].message_id, headers)
        wire[n] = [(k, v.encode()) for k, v in stated.items()]
    return wire


class Relay:
    """Relays outbox rows; make one per process, after fork, and call :meth:`run`."""

    def __init__(
        self,
        settings: Settings,
        *,
        sessions: sessionmaker[Session] | None = None,
        producer: RelayProducer | None = None,
    ) -> None:
        self.settings = settings
        # The relay's own writes (leases, claims, marks) commit without waiting for the
        # disk. A crash of PostgreSQL can lose only the last of them, and every such loss
        # means a row is sent again: a duplicate, never a lost message. The messages
        # themselves were committed durably by their publishers.
        self.sessions = sessions or make_sessionmaker(
            make_engine(
                settings, pool_size=2, connect_args={"options": "-c synchronous_commit=off"}
            )
        )
        self.producer = producer or RelayProducer(settings)
        self.owner = owner_id("relay")
        self.policy = RetryPolicy(
            base_s=settings.relay_retry_base_s,
            cap_s=settings.relay_retry_cap_s,
            max_attempts=settings.relay_max_attempts,
        )
        self.circuit = Circuit(open_s=settings.relay_circuit_open_s)
        self.metrics = MetricsRecorder(settings)
        self._lease_rows_ready = False
        self._last_delivery = 0.0
        # Whether this relay's last claim found its buckets nearly empty (each gave less
        # than its share): then the next lease takes every bucket with work, not
        # OUTBOX_RELAY_BUCKETS_PER_TASK, so that a trickle of commits over many keys costs
        # one pass rather than one per that many buckets. Under a backlog the claims fill
        # their shares, and concurrent relays share the buckets again.
        self._light = False
        # The newest row this relay claimed, and when its next look at every waiting row
        # is due (see FULL_LOOK_S).
        self._newest: int | None = None
        self._full_look_at = 0.0
        # Up to which row this relay's last look bucket by bucket found nothing it may
        # send, and until when its looks may start after that row (see RECHECK_S).
        self._unsendable_upto = 0
        self._recheck_at = 0.0

    def run(
        self,
        budget_s: float | None = None,
        linger: Linger | None = None,
        stopping: Callable[[], bool] | None = None,
    ) -> RelayReport:
        """Relay until no claimable row is left or ``budget_s`` (default ``relay_drain_s``)
        ends, or ``stopping()`` says the worker shuts down. With ``linger``, an empty
        outbox is watched for new rows (every ``OUTBOX_RELAY_POLL_MS``) for as long as
        ``linger`` says, within the budget."""
        started = time.monotonic()
        budget = Budget(self.settings.relay_drain_s if budget_s is None else budget_s, stopping)
        report = RelayReport()
        if self._broker_available():
            if linger is None:
                self._drain(budget, report)
            else:
                lingering = linger.hold()
                # Beside a lingering task, one sends what its buckets hold and ends: the
                # lingering one sees the rest.
                watched = linger if lingering else None
                try:
                    self._drain(budget, report, helping=lingering, linger=watched)
                    found = report.batches > 0
                    while lingering and self._await_rows(
                        budget, linger, probe_enough=found and self._light, at_once=found
                    ):
                        before = report.batches
                        self._drain(budget, report, linger=watched)
                        found = report.batches > before
                finally:
                    # A commit before this is seen by the last look; one after it kicks.
                    linger.let_go()
                if not budget.over() and self.circuit.state != "open":
                    self._drain(budget, report, helping=lingering)
        report.circuit = self.circuit.state
        self.metrics.circuit(self.owner, self.circuit.state)
        report.elapsed_s = round(time.monotonic() - started, 4)
        if report.sent or report.failed or report.deferred or report.released:
            log.info("relay %s: %s", self.owner, report.as_dict())
        return report

    def _await_rows(
        self, budget: Budget, linger: Linger, probe_enough: bool = False, at_once: bool = False
    ) -> bool:
        """Wait for a sendable row: True once there is one, False when ``linger`` stops
        waiting, the budget ends or the circuit opens.

        ``probe_enough``: the last pass found rows, and its buckets were nearly empty, so
        the next lease takes every bucket with work. Then the probe's word that a row is
        due anywhere is enough, without the look bucket by bucket for one that no other
        relay holds. A row in another relay's bucket, or one held back behind a failed
        row of its key, also answers the probe: a pass that then sends nothing makes the
        next wait look bucket by bucket again, so such rows cost no lease every poll.

        ``at_once``: the last pass sent rows, so the first look comes without a poll's
        wait: under steady traffic rows committed during a pass go out in the next one
        straight away, as a loop that sleeps only once it finds nothing would send them."""
        poll_s = self.settings.relay_poll_ms / 1000
        prepare = self.settings.db_prepare_statements
        params = {"scope": SCOPE, "owner": self.owner, "buckets": self.settings.buckets}
        idle_since = time.monotonic()
        wait = not at_once
        with polling(self.sessions) as conn:
            while self.circuit.state != "open":
                idle_s = time.monotonic() - idle_since
                if budget.left() <= poll_s or not linger.keep_waiting(idle_s):
                    return False
                if wait:
                    time.sleep(poll_s)
                wait = True
                if self._any_due(conn, prepare) and (probe_enough or self._has_work(conn, params)):
                    return True
        return False

    def _has_work(self, conn: Connection, params: dict[str, Any]) -> bool:
        """The look bucket by bucket (:data:`queries.RELAY_HAS_WORK`): after one that found
        nothing to send while no other relay held a bucket, at rows newer than it saw, and
        at every row once per :data:`RECHECK_S`."""
        now = time.monotonic()
        after = self._unsendable_upto if now < self._recheck_at else 0
        found, newest, others_hold = conn.execute(
            queries.RELAY_HAS_WORK, {**params, "after": after}
        ).one()
        if found or others_hold:
            self._unsendable_upto, self._recheck_at = 0, 0.0
        else:
            self._unsendable_upto = newest or 0
            if after == 0:
                self._recheck_at = now + RECHECK_S
        return bool(found)

    def _any_due(self, conn: Connection, prepare: bool) -> bool:
        """Whether any row could be sent now: a look at rows newer than the newest this
        relay claimed, and at every waiting row at most every :data:`FULL_LOOK_S`."""
        now = time.monotonic()
        if self._newest is None or now >= self._full_look_at:
            self._full_look_at = now + FULL_LOOK_S
            return bool(execute(conn, queries.RELAY_ANY_DUE, prepare=prepare).scalar_one())
        params = {"after": self._newest}
        return bool(execute(conn, queries.RELAY_ANY_NEW, params, prepare=prepare).scalar_one())

    def _broker_available(self) -> bool:
        if not self.circuit.allows():
            return False
        idle = time.monotonic() - self._last_delivery > IDLE_PROBE_S
        if self.circuit.state == "half_open" or self.producer.brokers_down or idle:
            if not self.producer.ping():
                self.circuit.open("no broker answers a metadata request")
                return False
            self.circuit.close()
        return True

    def _drain(
        self,
        budget: Budget,
        report: RelayReport,
        helping: bool = True,
        linger: Linger | None = None,
    ) -> None:
        """Claim, send and mark until the buckets run dry or the budget ends; ``helping``:
        also while other tasks' buckets have work (rather than end once its own are dry);
        ``linger``: the lingering task's, told after each claim whether it found a
        backlog."""
        held: dict[int, int] = {}
        unsettled: uuid.UUID | None = None  # the token of a claim not marked yet
        relet_at = 0.0  # when to renew the leases and look for buckets with new work
        work_elsewhere = True  # the last lease saw work in buckets it could not take
        s = self.settings
        try:
            while not budget.over() and self.circuit.state != "open":
                relet = not held or time.monotonic() >= relet_at
                with self.sessions.begin() as session:
                    if relet:
                        held, work_elsewhere = self._lease(session, held)
                        relet_at = time.monotonic() + s.relay_lease_s / 3
                        report.buckets = max(report.buckets, len(held))
                    if not held:
                        return
                    claim = self._claim(session, list(held))
                if linger is not None:
                    linger.backlog(not claim.drained)
                if not claim.rows:
                    if relet:
                        return  # the buckets with work hold nothing sendable now
                    relet_at = 0.0  # ours are drained: look for others with work
                    continue
                report.batches += 1
                unsettled = claim.token
                deliveries = self.producer.send(claim.rows)
                # Every held bucket came back short and every row went out: they are
                # empty. A row committed since this task began queued a kick of its own
                # (outbox.kick), so stop, unless the lease saw work it could not take.
                all_sent = all(d.error is None and not d.held for d in deliveries)
                done = claim.drained and all_sent and not (helping and work_elsewhere)
                # A finishing pass gives its leases back in the same transaction.
                self._mark(claim, deliveries, report, release=list(held) if done else [])
                unsettled = None
                if done:
                    held = {}
                    return
                if claim.drained or len(held) > s.relay_buckets_per_task:
                    # Drained: look for buckets with work. A backlog found in more buckets
                    # than a task's share: give the rest back to concurrent relays.
                    relet_at = 0.0
        finally:
            if held or unsettled:
                with self.sessions.begin() as session:
                    if unsettled:
                        # Interrupted between claim and mark: the rows stay as they are
                        # (they may be in Kafka already: a harmless repeat).
                        self._settle(session, unsettled, release=list(held))
                    else:
                        leases.release(session, SCOPE, self.owner, held)

    def _lease(self, session: Session, held: dict[int, int]) -> tuple[dict[int, int], bool]:
        """Renew held buckets that still have work and take others, up to the limit.

        Returns the buckets now held, and whether any bucket with work was left unheld.
        """
        s = self.settings
        if not self._lease_rows_ready:
            leases.fit_rows(
                session,
                SCOPE,
                s.buckets,
                unfinished=queries.RELAY_UNFINISHED,
                params={},
                setting=env_name("buckets"),
            )
            self._lease_rows_ready = True
        # Held buckets that still have work are renewed first.
        rows = execute(
            session,
            queries.RELAY_LEASE,
            {
                "scope": SCOPE,
                "owner": self.owner,
                "buckets": s.buckets,
                "limit": s.buckets if self._light else s.relay_buckets_per_task,
                "lease_s": s.relay_lease_s,
            },
            prepare=s.db_prepare_statements,
        ).all()
        granted = {row.bucket: row.fencing_token for row in rows if row.bucket is not None}
        # Drained buckets go back at once, for whichever relay next finds work there.
        leases.release(session, SCOPE, self.owner, set(held) - set(granted))
        return granted, bool(set(rows[0].with_work) - set(granted))

    def _claim(self, session: Session, buckets: list[int]) -> Claim:
        """Claim a batch from ``buckets``."""
        token = uuid.uuid4()
        share = max(1, self.settings.relay_batch_size // len(buckets))
        bytes_share = max(1, self.settings.relay_batch_bytes // len(buckets))
        result = execute(
            session,
            queries.CLAIM_BATCH,
            {
                "scope": SCOPE,
                "owner": self.owner,
                "buckets": buckets,
                "token": token,
                "lease_s": self.settings.relay_lease_s,
                "per_bucket": share,
                "bytes_per_bucket": bytes_share,
            },
            prepare=self.settings.db_prepare_statements,
        )
        rows = as_tuples(result, _Claimed)
        outgoing = [
            Outgoing(row.id, row.topic, row.key, row.payload.encode(), headers)
            for row, headers in zip(rows, _wire_headers(rows), strict=True)
        ]
        per_bucket = Counter([row.bucket for row in rows])
        if rows:  # in id order
            self._newest = max(self._newest or 0, rows[-1].id)
        drained = all(n < share for n in per_bucket.values()) and not any(r.full for r in rows)
        self._light = drained
        return Claim(token, outgoing, {row.id: row.attempts for row in rows}, drained=drained)

    def _mark(
        self,
        claim: Claim,
        deliveries: list[DeliveryReport],
        report: RelayReport,
        release: list[int] | None = None,
    ) -> None:
        sent: list[DeliveryReport] = []
        # Held rows, rows that met an outage and rows that an unusable producer failed
        # go back untouched: no attempt is spent.
        released: list[DeliveryReport] = []
        deferred: list[DeliveryReport] = []  # their topic or partition is unavailable
        failed: list[DeliveryReport] = []
        unavailable: list[DeliveryReport] = []  # no broker could be reached
        for d in deliveries:
            if d.held:
                released.append(d)
            elif d.error is None:
                sent.append(d)
            elif d.broker_unavailable:
                unavailable.append(d)
                released.append(d)
            elif d.producer_unusable:
                released.append(d)
            elif d.topic_unavailable:
                deferred.append(d)
            else:
                failed.append(d)
        token, attempts = claim.token, claim.attempts
        marked: Sequence[Sent] = ()
        # The claim is settled, and a finishing pass's buckets given back, last: the
        # marks change rows only while the claim stands. Released rows need no change.
        settle = {"scope": SCOPE, "owner": self.owner, "token": token, "release": release or []}
        with self.sessions.begin() as session:
            if failed or deferred:
                # A row whose topic or partition alone is unavailable waits, spending
                # attempts only once it has waited past the grace, so that it ends dead
                # rather than wait unseen forever.
                erred = failed + deferred
                session.execute(
                    queries.MARK_FAILED,
                    {
                        "scope": SCOPE,
                        "token": token,
                        "max_attempts": self.policy.max_attempts,
                        "grace_s": self.settings.relay_topic_error_grace_s,
                        "ids": [d.id for d in erred],
                        "delays": [self.policy.delay(attempts[d.id] + 1) for d in erred],
                        "errors": [str(d.error)[:MAX_ERROR_CHARS] for d in erred],
                        "always": [not d.topic_unavailable for d in erred],
                    },
                )
            if sent:
                marked = [
                    Sent(*row)  # a row per topic and latency bucket
                    for row in execute(
                        session,
                        queries.MARK_SENT,
                        {
                            "ids": int_array(d.id for d in sent),
                            "placed": _placements(sent),
                            "latency_bounds": list(LATENCY_BUCKETS),
                            **settle,
                        },
                        prepare=self.settings.db_prepare_statements,
                    )
                ]
            else:
                self._settle(session, token, release or [])
        topics = {row.id: row.topic for row in claim.rows} if failed else {}
        self.metrics.relay_batch(marked, (topics[d.id] for d in failed))
        if self.producer.replaced:
            self.metrics.producer_replaced(self.producer.replaced)
            self.producer.replaced = []
        if sent:
            self._last_delivery = time.monotonic()
        if unavailable:
            self.circuit.open(str(unavailable[0].error))
        if failed:
            log.warning(
                "relay %s: %d rows failed, first: %s", self.owner, len(failed), failed[0].error
            )
        if deferred:
            log.warning(
                "relay %s: %d rows wait on their topic, first: %s",
                self.owner,
                len(deferred),
                deferred[0].error,
            )
        report.sent += len(sent)
        report.failed += len(failed)
        report.deferred += len(deferred)
        report.released += len(released)

    def _settle(self, session: Session, token: uuid.UUID, release: list[int]) -> None:
        """Free the claim's buckets for new claims (its rows stay as they are), and give
        the buckets in ``release`` back."""
        execute(
            session,
            queries.SETTLE_CLAIM,
            {"scope": SCOPE, "owner": self.owner, "token": token, "release": release},
            prepare=self.settings.db_prepare_statements,
        )

    def close(self) -> None:
        """Flush the producer (call at process shutdown)."""
        self.producer.close()
