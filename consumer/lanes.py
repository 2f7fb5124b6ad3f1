"""Processing inbox rows by lane: handlers, backoff, dead letters.

A group's rows are spread over lanes by key hash. :meth:`LaneProcessor.run`
leases the lanes it is given (so one task at a time works a lane, in Kafka
order), locks a batch of their due rows, and runs the handlers in the
transaction that also marks the rows: done rows and their effects commit together, so an effect
happens exactly once. The handlers of a batch share one savepoint; when one
fails, the batch is run again with a savepoint per row, so the failure undoes
only its own row (handlers before it in the batch run twice, their first
effects undone; a failing attempt runs its handler once). A failed row is
scheduled again after an exponential backoff with jitter from the group's
policy, or made dead once its attempts are spent (at once for
:class:`~consumer.handlers.Permanent`). In an ordered group, later rows of a
failing key wait for it; other keys flow.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

from sqlalchemy import Connection
from sqlalchemy.orm import Session, sessionmaker

from consumer.acks import ack_key, ack_payload, register_ack_topic, write_acks
from consumer.calls import (
    call,
    call_batch,
    limit_statements,
    statement_timeout_ms,
    time_limits,
)
from consumer.handlers import Message, Permanent, batch_handler_for
from outbox import leases, queries
from outbox.agents import owner_id
from outbox.budget import Budget
from outbox.db import as_tuples, execute, int_array, polling
from outbox.logs import log_message
from outbox.models import MAX_ERROR_CHARS
from outbox.publishing import Publisher
from outbox.retry import RetryPolicy
from outbox.settings import Settings, env_name

log = logging.getLogger(__name__)

DEFAULT_POLICY = RetryPolicy()
# A lingering task that is busy takes on an open lane whose row has been due this long:
# the lane's kick found no free pool process (every one holds a lingering task). It looks
# as often.
STARVED_AFTER_S = 0.05
# A lingering task whose batches have all been full for this long (a backlog, not a
# moment's catch-up), holding two lanes or more, hands half of them to a task of their own
# when no task is queued (so a pool process may be free for it), and leaves them to it for
# HANDED_OFF_S: under a backlog the lanes' work spreads over the pool rather than stay in
# one process. A handed-off task that found no free process by then loses them to the
# starved-lane look, so they wait no longer than that.
HAND_OFF_AFTER_S = 1.0
HANDED_OFF_S = 0.25
# How often a lingering task that gathers its group's lanes looks for lanes nobody holds.
GATHER_EVERY_S = 0.1
# A batch calls no more handlers once it has run this long: the rest of its rows stay due
# for the next batch (a large batch saves statements; a long one holds its transaction,
# and its task past the budget, for as long as its slowest handlers take).
BATCH_RUN_S = 1.0


class Linger(Protocol):
    """How a lane task stays on its lanes while they are idle (``tasks.lanes`` gives one):
    it holds their kicks, so commits meanwhile queue no task, waits for new rows, and
    lets the kicks go before its last look."""

    def hold(self, group: str, lanes: Sequence[int]) -> None:
        """Kicks of these lanes send nothing from now on: this task looks for their rows."""

    def keep_waiting(self, idle_s: float) -> bool:
        """Whether to go on waiting after ``idle_s`` without rows (False: give them back)."""

    def let_go(self, group: str, lanes: Sequence[int]) -> None:
        """Kicks of these lanes send tasks again (called before the task's last look)."""

    def acks_written(self) -> None:
        """A batch committed acks, which are outbox rows: have them relayed now rather
        than when the task ends."""

    def gathers(self) -> bool:
        """Whether this task lingers in a place of its worker's own (another pool process
        is left for other tasks): then it takes every lane of its group that nobody holds,
        and their kicks, as it waits."""

    def may_hand_off(self) -> bool:
        """Whether lanes handed off now would likely find a free pool process (no task is
        queued)."""

    def hand_off(self, group: str, lanes: Sequence[int]) -> None:
        """Queue a task of their own for these lanes, which this task gave back."""


def lane_scope(group: str) -> str:
    """The lease scope of a group's lanes."""
    return f"lane:{group}"


@dataclasses.dataclass
class LaneReport:
    """What one :meth:`LaneProcessor.run` did, and when its lanes have work again."""

    done: int = 0
    failed: int = 0
    dead: int = 0
    # The lanes this run held, and those it wanted that another task held.
    leased: list[int] = dataclasses.field(default_factory=list)
    busy: list[int] = dataclasses.field(default_factory=list)
    # Per leased lane with a waiting row: seconds until that row is due.
    due_s: dict[int, float] = dataclasses.field(default_factory=dict)
    # Acks written to the outbox (committed with their batches, unless a batch failed).
    acks: int = 0

    @property
    def next_due_s(self) -> float | None:
        """Seconds until the first waiting row is due; None when nothing waits."""
        return min(self.due_s.values()) if self.due_s else None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class _TopicPolicy:
    ordered: bool
    requires_ack: bool
    retry: RetryPolicy
    timeout_s: float = 30.0
    # A dead letter parks the later rows of its key (on_dead = hold_key).
    holds_key: bool = False


# A topic the group has not registered: ordered, no acks, the default retry policy.
UNREGISTERED = _TopicPolicy(ordered=True, requires_ack=False, retry=DEFAULT_POLICY)


class LaneProcessor:
    """Runs handlers for inbox rows; make one per process and call :meth:`run`."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], worker: str) -> None:
        self.settings = settings
        self.sessions = sessions
        self.worker = worker
        self.owner = owner_id("lane")
        self._scopes_ready: set[str] = set()
        self.publisher = Publisher(settings)
        self._ack_topic_ready = False
        # When a gathering task next looks for free lanes (kept across its waits: a busy
        # task waits once per batch).
        self._gather_at = 0.0

    def run(
        self,
        group: str,
        lanes: int | Sequence[int],
        budget_s: float | None = None,
        linger: Linger | None = None,
        stopping: Callable[[], bool] | None = None,
    ) -> LaneReport:
        """Process the due rows of ``lanes`` until none is left or ``budget_s`` ends, or
        ``stopping()`` says the worker shuts down.

        The leases are taken first, in a transaction of their own, renewed in each
        batch's and given back in the last one's. With ``linger``, a task whose lanes
        run dry waits for new rows (looking every ``OUTBOX_LANE_POLL_MS``) rather than
        end, for as long as ``linger`` says, and within the budget.
        """
        s = self.settings
        scope = lane_scope(group)
        wanted = sorted({lanes} if isinstance(lanes, int) else set(lanes))
        budget = Budget(s.lane_budget_s if budget_s is None else budget_s, stopping)
        report = LaneReport()
        held: list[int] = []
        finished = False
        committed = False
        # Set once the kicks are let go: the next batch is the last look.
        letting_go = linger is None
        look_at = 0.0  # when a busy lingering task next looks for starved lanes
        busy_since: float | None = None  # since when every batch has been full
        handed: dict[int, float] = {}  # lanes handed off: not taken back before then
        acks_told = 0  # acks committed that ``linger`` was told of
        claimed = False  # whether the last batch found rows
        self._gather_at = 0.0
        try:
            # The leases are taken in a transaction of their own, so that a process that
            # ends in the middle of its first batch leaves them held: whoever takes them
            # over once they lapse knows that a batch never finished there.
            with self.sessions.begin() as session:
                policies = self._prepare(session, group, scope)
                granted, lapsed = leases.take(
                    session, scope, self.owner, wanted, limit=len(wanted), lease_s=s.lane_lease_s
                )
            committed = True
            # Lanes another task works now: it looks for late rows as it ends.
            report.busy = [n for n in wanted if n not in granted]
            held = sorted(granted)
            if linger is not None and held:
                linger.hold(group, held)
            careful = set(lapsed)
            if careful:
                log.warning(
                    "lane %s/%s: taken over from a holder that ended or hung mid-batch; each "
                    "attempt there is counted before it runs",
                    group,
                    sorted(careful),
                )
            while held and not finished:
                counted: _Counted | None = None
                # Set in a transaction that gives the lanes back; they count as given back
                # once it commits (until then the finally below gives them back).
                finishing = False
                with self.sessions.begin() as session:
                    # Renewed in the batch's transaction: its lease rows stay locked while
                    # its handlers run, so no other task can take the lanes meanwhile.
                    # Most often in the statement that claims the batch.
                    claim: _Claim | None = None
                    if careful:
                        held = sorted(
                            leases.acquire(
                                session,
                                scope,
                                self.owner,
                                held,
                                limit=len(held),
                                lease_s=s.lane_lease_s,
                            )
                        )
                    else:
                        claim = self._lease_and_claim(session, group, held, policies)
                        held = claim.held
                    if not held:
                        break  # taken over by another task (a stall past the lease)
                    report.leased = held
                    if claim is None:
                        limit_statements(session, _longest_timeout_s(policies))
                        careful &= set(held)
                        if careful:
                            counted = self._count_next(session, group, sorted(careful), policies)
                            if counted is None:
                                careful.clear()  # nothing due there: back to whole batches
                    if counted is None:
                        full, unblocked, claimed = self._batch(
                            session, group, held, policies, report, claim
                        )
                        more = full or unblocked
                        if budget.over() or (not more and letting_go):
                            if not letting_go:
                                # The budget ends a lingering task: kicks send tasks
                                # again before the last look (a commit after it kicks).
                                assert linger is not None
                                linger.let_go(group, held)
                                letting_go = True
                            report.due_s = self._finish(session, group, held, policies)
                            finishing = True
                finished = finishing
                if linger is not None and report.acks > acks_told:
                    linger.acks_written()
                    acks_told = report.acks
                found: list[int] | None = None
                now = time.monotonic()
                if counted is None:
                    busy_since = (busy_since or now) if more and not letting_go else None
                if (
                    busy_since is not None
                    and not finished
                    and len(held) > 1
                    and now - busy_since >= HAND_OFF_AFTER_S
                ):
                    assert linger is not None
                    if linger.may_hand_off():
                        given = held[len(held) // 2 :]
                        held = held[: len(held) // 2]
                        with self.sessions.begin() as session:
                            self._finish(session, group, given, policies)
                        careful -= set(given)
                        linger.hold(group, held)
                        linger.hand_off(group, given)
                        handed.update(dict.fromkeys(given, now + HANDED_OFF_S))
                    busy_since = now
                if counted is None and not finished and not more:
                    assert linger is not None
                    found = self._await_rows(
                        group, held, policies, budget, linger, probe_enough=claimed
                    )
                    if found is None:
                        # Kicks send tasks again from here on; a commit before this is
                        # seen by the last look, one after it kicks a task of its own.
                        linger.let_go(group, held)
                        letting_go = True
                elif not (letting_go or finished) and time.monotonic() >= look_at:
                    # Busy: lanes whose kicks no free pool process has taken up.
                    look_at = time.monotonic() + STARVED_AFTER_S
                    with self.sessions() as session:
                        found = self._open_lanes(
                            session, group, scope, policies, waited_s=STARVED_AFTER_S
                        )
                if found and handed:
                    handed = {n: until for n, until in handed.items() if until > now}
                    found = [n for n in found if n not in handed]
                if found and (extra := sorted(set(found) - set(held))):
                    assert linger is not None
                    with self.sessions.begin() as session:
                        more_lanes, lapsed = leases.take(
                            session,
                            scope,
                            self.owner,
                            extra,
                            limit=len(extra),
                            lease_s=s.lane_lease_s,
                        )
                    careful |= set(lapsed)
                    held = sorted(set(held) | set(more_lanes))
                    linger.hold(group, held)
                if counted is not None:
                    with self.sessions.begin() as session:
                        limit_statements(session, _longest_timeout_s(policies))
                        self._run_counted(session, group, counted, report)
                        if budget.over():
                            report.due_s = self._finish(session, group, held, policies)
                            finishing = True
                    finished = finishing
        except BaseException:
            if not committed:
                # The transaction that made the lease rows or the ack topic may not have
                # committed: make them again next time.
                self._scopes_ready.discard(scope)
                self._ack_topic_ready = False
            raise
        finally:
            if held and not finished:
                if linger is not None and not letting_go:
                    linger.let_go(group, held)
                with self.sessions.begin() as session:
                    self._finish(session, group, held, policies)
        return report

    def _open_lanes(
        self,
        session: Session | Connection,
        group: str,
        scope: str,
        policies: dict[str, _TopicPolicy],
        waited_s: float = 0.0,
    ) -> list[int]:
        """The group's lanes that no other task holds with a row due for ``waited_s``."""
        params = {
            "group": group,
            "scope": scope,
            "owner": self.owner,
            "lane_count": self.settings.lanes,
            "waited_s": waited_s,
            **_order_params(policies),
        }
        return list(session.execute(queries.LANES_OPEN_WITH_WORK, params).scalars())

    def _await_rows(
        self,
        group: str,
        lanes: list[int],
        policies: dict[str, _TopicPolicy],
        budget: Budget,
        linger: Linger,
        probe_enough: bool = False,
    ) -> list[int] | None:
        """Wait for a due row in ``lanes``, or else in lanes nobody holds: the lanes with
        one (``lanes``' own first: an idle task takes on open lanes, a busy one leaves them
        to the tasks their kicks start unless they starve, so that work spreads over the
        workers under load and gathers in one task when it is light), or None when
        ``linger`` stops waiting or the budget ends. A task that ``linger`` says gathers
        also returns, every :data:`GATHER_EVERY_S` (whether or not a look found rows), the
        group's lanes that nobody holds, rows or not, for it to take. The leases of
        ``lanes`` are renewed meanwhile.

        A task that holds every lane of its group, with ``probe_enough`` (its last batch
        found rows), takes the probe's word that a row is due: its next batch claims in
        every lane it holds anyway. Rows due but held back behind a failed row of their
        key also answer the probe; a batch that then finds nothing makes the next wait
        ask lane by lane again, so they cost no batch every poll. After a batch that found
        rows, the first look comes at once: under steady traffic rows that arrived during
        a batch run in the next one straight away."""
        s = self.settings
        scope = lane_scope(group)
        poll_s = s.lane_poll_ms / 1000
        prepare = s.db_prepare_statements
        idle_since = renewed = time.monotonic()
        # The first look after a batch that found rows comes without a poll's wait.
        wait = not probe_enough
        with polling(self.sessions) as conn:
            while True:
                idle_s = time.monotonic() - idle_since
                if budget.left() <= poll_s or not linger.keep_waiting(idle_s):
                    return None
                if wait:
                    time.sleep(poll_s)
                wait = True
                due = execute(conn, queries.LANES_ANY_DUE, {"group": group}, prepare=prepare)
                if not due.scalar_one():
                    found = []
                elif probe_enough and len(lanes) == s.lanes:
                    return lanes
                else:
                    found = self._open_lanes(conn, group, scope, policies)
                gathered: list[int] = []
                if linger.gathers() and time.monotonic() >= self._gather_at:
                    # The group's lanes that nobody holds, rows or not: taken with their
                    # kicks, so that the group's rows need no other task while this one
                    # lingers. Also when rows are found: lanes worked by kicked tasks that
                    # found no lingering place are free between two of them, and would
                    # otherwise be kicked again by every commit while this task stays busy.
                    self._gather_at = time.monotonic() + GATHER_EVERY_S
                    free = conn.execute(queries.LANES_FREE, {"scope": scope}).scalars()
                    gathered = [n for n in free if n not in lanes]
                if found:
                    own = [n for n in found if n in lanes]
                    return sorted(set(own or found) | set(gathered))
                if gathered:
                    return gathered
                if time.monotonic() - renewed >= s.lane_lease_s / 3:
                    with self.sessions.begin() as session:
                        kept = leases.acquire(
                            session,
                            scope,
                            self.owner,
                            lanes,
                            limit=len(lanes),
                            lease_s=s.lane_lease_s,
                        )
                    if len(kept) < len(lanes):
                        return lanes  # a lane was taken over: the next batch finds out
                    renewed = time.monotonic()

    def _prepare(self, session: Session, group: str, scope: str) -> dict[str, _TopicPolicy]:
        """The group's policies; the lease rows and the ack topic on first need."""
        policies = self._policies(session, group)
        if not self._ack_topic_ready and any(p.requires_ack for p in policies.values()):
            register_ack_topic(session)
            self._ack_topic_ready = True
        if scope not in self._scopes_ready:
            leases.fit_rows(
                session,
                scope,
                self.settings.lanes,
                unfinished=queries.LANES_UNFINISHED,
                params={"group": group},
                setting=env_name("lanes"),
            )
            self._scopes_ready.add(scope)
        return policies

    def _finish(
        self, session: Session, group: str, lanes: list[int], policies: dict[str, _TopicPolicy]
    ) -> dict[int, float]:
        """Give the lanes back; return, per lane with a waiting row, seconds until it is due."""
        rows = session.execute(
            queries.LANE_FINISH,
            {
                "group": group,
                "scope": lane_scope(group),
                "owner": self.owner,
                "buckets": sorted(set(lanes)),
                **_order_params(policies),
            },
        )
        return {lane: max(float(due), 0.0) for lane, due in rows}

    def _policies(self, session: Session, group: str) -> dict[str, _TopicPolicy]:
        return {
            row.topic: _TopicPolicy(
                row.ordered,
                row.requires_ack,
                RetryPolicy.of_group(row),
                row.handler_timeout_s,
                holds_key=row.ordered and row.on_dead == "hold_key",
            )
            for row in session.execute(queries.GROUP_POLICIES, {"group": group})
        }

    def _lease_and_claim(
        self, session: Session, group: str, lanes: list[int], policies: dict[str, _TopicPolicy]
    ) -> _Claim:
        """Renew the leases of ``lanes``, limit the transaction's statements to the
        handlers' longest timeout, and lock a batch of the granted lanes' due rows: one
        round trip."""
        per_lane = self._per_lane(lanes)
        result = execute(
            session,
            queries.LEASE_CLAIM_LANE,
            {
                "scope": lane_scope(group),
                "owner": self.owner,
                "lanes": lanes,
                "limit": len(lanes),
                "lease_s": self.settings.lane_lease_s,
                "timeout_ms": statement_timeout_ms(_longest_timeout_s(policies)),
                "group": group,
                **_order_params(policies),
                "per_lane": per_lane,
            },
            prepare=self.settings.db_prepare_statements,
        )
        # Each granted lane once, with its rows (none: a lane whose rows are not due).
        rows = result.all()
        held = sorted({row[0] for row in rows if row[0] is not None})
        return _Claim(
            held,
            as_tuples(result, _Claimed, [row for row in rows if row[1] is not None]),
            per_lane,
        )

    def _per_lane(self, lanes: list[int]) -> int:
        """Each lane's share of a batch."""
        return -(-self.settings.lane_batch_size // len(lanes))

    def _batch(
        self,
        session: Session,
        group: str,
        lanes: list[int],
        policies: dict[str, _TopicPolicy],
        report: LaneReport,
        claim: _Claim | None = None,
    ) -> tuple[int, bool, bool]:
        """Process one locked batch in the session's transaction (``claim``: claimed
        already, with the leases).

        Returns whether a lane filled its share of the batch (it may have more rows),
        whether a retried row finished (done or dead), which lets later rows of its key
        go, and whether it claimed any row.
        """
        if claim is None:
            per_lane = self._per_lane(lanes)
            rows = self._claim(session, group, lanes, policies, per_lane)
        else:
            per_lane, rows = claim.per_lane, claim.rows
        ended, left = self._process(session, group, rows, policies, report, counted=False)
        unblocked = any(row.attempts > 0 and row.id in ended for row in rows)
        full = max(collections.Counter([row.lane for row in rows]).values(), default=0) == per_lane
        return full or left, unblocked, bool(rows)

    @staticmethod
    def _claim(
        session: Session,
        group: str,
        lanes: list[int],
        policies: dict[str, _TopicPolicy],
        per_lane: int,
    ) -> list[_Claimed]:
        result = session.execute(
            queries.CLAIM_LANE,
            {"group": group, "lanes": lanes, **_order_params(policies), "per_lane": per_lane},
        )
        return as_tuples(result, _Claimed)

    def _count_next(
        self, session: Session, group: str, lanes: list[int], policies: dict[str, _TopicPolicy]
    ) -> _Counted | None:
        """In lanes whose last holder ended or hung mid-batch: count the attempt of the
        first due row before it runs (committed with this transaction); None when none is
        due. A row whose counted attempts are spent (its last one never finished) is dead
        without running again."""
        rows = self._claim(session, group, lanes, policies, per_lane=1)
        for row in rows:
            policy = policies.get(row.topic, UNREGISTERED)
            if policy.retry.exhausted(row.attempts):
                _never_finished(row, policy).write(session, self.publisher, self.worker, add=0)
                continue
            attempt = row.attempts + 1
            session.execute(
                queries.COUNT_ATTEMPT,
                {
                    "id": row.id,
                    "worker": self.worker,
                    "delay_s": policy.retry.delay(attempt),
                    "error": f"the worker ended or hung during attempt {attempt}; it never "
                    "finished (the handler ended its process, or ran past every time limit)",
                },
            )
            return _Counted(row, policies)
        return None

    def _run_counted(
        self, session: Session, group: str, counted: _Counted, report: LaneReport
    ) -> None:
        """Run a row whose attempt is counted already, in a transaction of its own."""
        row = counted.row
        scope = lane_scope(group)
        granted = leases.acquire(
            session, scope, self.owner, [row.lane], limit=1, lease_s=self.settings.lane_lease_s
        )
        locked = session.scalar(queries.LOCK_COUNTED, {"id": row.id}) if granted else None
        if locked is None:
            return  # the lane or the row moved on: the counted attempt stands
        self._process(session, group, [row], counted.policies, report, counted=True)

    def _process(
        self,
        session: Session,
        group: str,
        rows: Sequence[_Claimed],
        policies: dict[str, _TopicPolicy],
        report: LaneReport,
        *,
        counted: bool,
    ) -> tuple[set[int], bool]:
        """Run the handlers of ``rows`` and mark them; return the rows that ended (done or
        dead), and whether some were left to run in the next batch (they come after a
        failure, or after :data:`BATCH_RUN_S`). ``counted``: their attempts were counted
        before (see :meth:`_count_next`)."""
        batch: list[_Row] = []
        spent = _Outcome()
        parked: set[tuple[str, str]] = set()
        # Every payload and header set of the batch decoded in one call: a call per value
        # (as the driver's JSON type would make) cost more than the decoding itself.
        decoded = iter(
            json.loads("[" + ",".join([t for r in rows for t in (r.payload, r.headers)]) + "]")
        )
        for row in rows:
            payload, headers = next(decoded), next(decoded)
            policy = policies.get(row.topic, UNREGISTERED)
            if parked and (row.topic, row.key) in parked:
                continue  # an earlier row of its key just went dead: it stays held
            if row.attempts and not counted and policy.retry.exhausted(row.attempts):
                # Its last attempt was counted and never finished: it does not run again.
                spent.failures += _never_finished(row, policy).failures
                if policy.holds_key and row.key is not None:
                    parked.add((row.topic, row.key))
                continue
            message = Message(
                row.message_id,
                row.topic,
                row.key,
                payload,
                headers,
                row.attempts + 1,
                row.partition,
                row.offset,
                group,
                row.retries,
            )
            batch.append(_Row(row.id, policy, row.attempts, message, row.lane))
        spent.write(session, self.publisher, self.worker, add=0)
        # Usually every handler succeeds: run them all under one savepoint. When one
        # fails, the batch up to it is undone and run again from its start, each row in a
        # savepoint of its own; the failing row keeps the failure it had, so its handler
        # runs once per attempt (the rows before it run a second time, their first effects
        # undone; so do the rows of a failed batch handler's call, the one at fault too).
        # The rows after it, or after BATCH_RUN_S, are the next batch's: what ran is a
        # prefix of each lane's rows, which are in id order.
        with time_limits():
            ran, failure = self._run_together(session, batch, time.monotonic() + BATCH_RUN_S)
            left = ran < len(batch)
            batch = batch[:ran]
            if failure is not None:
                outcome = self._run_each(session, group, batch, failure)
        if failure is None:
            outcome = _Outcome(done=[r.id for r in batch])
            outcome.acks = [
                (ack_key(group, r.lane), ack_payload(r.message, group, self.worker))
                for r in batch
                if r.policy.requires_ack
            ]
        outcome.write(session, self.publisher, self.worker, add=0 if counted else 1)
        report.acks += len(outcome.acks)
        report.done += len(outcome.done)
        report.failed += outcome.failed
        report.dead += outcome.dead + spent.dead
        return outcome.ended | spent.ended, left

    @staticmethod
    def _run_together(
        session: Session, batch: list[_Row], until: float
    ) -> tuple[int, tuple[int | None, Exception] | None]:
        """Run the handlers in order in one savepoint, until one fails or the clock passes
        ``until``; return how many rows were run (the failing one included) and, if one
        failed, its index and exception (then nothing is kept). A batch handler takes the
        consecutive rows of its topic in one call; when that call fails, the index is
        None: which of its rows is at fault is not known."""
        savepoint = session.begin_nested()
        index = 0
        while index < len(batch):
            if index and time.monotonic() >= until:
                savepoint.commit()
                return index, None
            row = batch[index]
            topic = row.message.topic
            many = batch_handler_for(topic)
            end = index + 1
            while many is not None and end < len(batch) and batch[end].message.topic == topic:
                end += 1
            try:
                if many is not None and end - index > 1:
                    messages = [r.message for r in batch[index:end]]
                    call_batch(many, messages, session, row.policy.timeout_s)
                else:
                    call(row.message, session, row.policy.timeout_s)
            except Exception as exc:
                savepoint.rollback()
                return end, (index if end - index == 1 else None, exc)
            index = end
        savepoint.commit()
        return len(batch), None

    def _run_each(
        self,
        session: Session,
        group: str,
        batch: list[_Row],
        known: tuple[int | None, Exception],
    ) -> _Outcome:
        """Run each handler in a savepoint of its own; a failure undoes only its row.

        ``known`` is a row that already failed in this transaction, with its exception
        (None: a batch handler's call failed, and each of its rows runs again).
        """
        outcome = _Outcome()
        failed_keys: set[tuple[str, str]] = set()
        for index, row in enumerate(batch):
            message, policy = row.message, row.policy
            topic, key = message.topic, message.key
            if policy.ordered and key is not None and (topic, key) in failed_keys:
                continue  # an earlier row of its key failed in this batch: it waits
            if index == known[0]:
                exc: Exception = known[1]
            else:
                savepoint = session.begin_nested()
                try:
                    call(message, session, policy.timeout_s)
                    savepoint.commit()
                    outcome.done.append(row.id)
                    if policy.requires_ack:
                        outcome.acks.append(
                            (ack_key(group, row.lane), ack_payload(message, group, self.worker))
                        )
                    continue
                except Exception as caught:
                    savepoint.rollback()
                    exc = caught
            error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
            permanent = isinstance(exc, Permanent)
            attempt = row.attempts + 1
            if permanent or policy.retry.exhausted(attempt):
                outcome.failures.append(Failure(row.id, "dead", 0.0, error))
            else:
                delay_s = policy.retry.delay(attempt)
                outcome.failures.append(Failure(row.id, "failed", delay_s, error))
            if key is not None:
                failed_keys.add((topic, key))
            if policy.requires_ack:
                ack = ack_payload(message, group, self.worker, error)
                outcome.acks.append((ack_key(group, row.lane), ack))
            with log_message(message.id):
                log.warning(
                    "lane %s/%d: message %s attempt %d failed: %s",
                    group,
                    row.lane,
                    message.id,
                    attempt,
                    error,
                )
        return outcome


class _Claimed(NamedTuple):
    """A claimed inbox row: the columns of :data:`outbox.queries.CLAIM_LANE`, in their
    order (a tuple: reading a column of a driver's row by name cost more than the rest of
    the row's own work in a batch). Payload and headers are JSON text."""

    id: int
    message_id: uuid.UUID
    topic: str
    key: str | None
    payload: str
    headers: str
    attempts: int
    partition: int
    offset: int
    lane: int
    retries: int


class _Row(NamedTuple):
    """One claimed row to run: its id, policy, attempts before this one, message, lane
    (a tuple: one is made per message, where a frozen dataclass costs a microsecond)."""

    id: int
    policy: _TopicPolicy
    attempts: int
    message: Message
    lane: int


class _Claim(NamedTuple):
    """The lanes granted to a batch, its rows, and each lane's share it was claimed with."""

    held: list[int]
    rows: list[_Claimed]
    per_lane: int


@dataclasses.dataclass(frozen=True)
class _Counted:
    """A claimed row whose attempt was counted before it runs, and its group's policies."""

    row: _Claimed
    policies: dict[str, _TopicPolicy]


def _never_finished(row: _Claimed, policy: _TopicPolicy) -> _Outcome:
    """A row whose counted attempts are spent, the last one never finished: dead."""
    error = (
        f"dead after {row.attempts} attempts; the last one never finished (the worker "
        "ended or hung during it)"
    )
    return _Outcome(failures=[Failure(row.id, "dead", 0.0, error)])


def _longest_timeout_s(policies: dict[str, _TopicPolicy]) -> float:
    return max((p.timeout_s for p in policies.values()), default=UNREGISTERED.timeout_s)


@dataclasses.dataclass(frozen=True)
class Failure:
    """A row that failed: ``failed`` again after ``delay_s``, or ``dead`` for good."""

    row_id: int
    status: str
    delay_s: float
    error: str


@dataclasses.dataclass
class _Outcome:
    """What a batch did: rows done, rows failed or dead, and the acks to write (each with
    its key: its lane's)."""

    done: list[int] = dataclasses.field(default_factory=list)
    failures: list[Failure] = dataclasses.field(default_factory=list)
    acks: list[tuple[str, dict[str, Any]]] = dataclasses.field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(1 for f in self.failures if f.status == "failed")

    @property
    def dead(self) -> int:
        return sum(1 for f in self.failures if f.status == "dead")

    @property
    def ended(self) -> set[int]:
        """Rows that will not run again: done or dead."""
        return set(self.done) | {f.row_id for f in self.failures if f.status == "dead"}

    def write(self, session: Session, publisher: Publisher, worker: str, *, add: int) -> None:
        """Mark the rows and write the acks, in the batch's transaction; ``add`` is 1 to
        count the attempt, 0 when it was counted before it ran."""
        if self.done:
            execute(
                session,
                queries.MARK_INBOX_DONE,
                {"ids": int_array(self.done), "worker": worker, "add": add},
                prepare=publisher.settings.db_prepare_statements,
            )
        if self.failures:
            session.execute(
                queries.MARK_INBOX_FAILED,
                {
                    "ids": [f.row_id for f in self.failures],
                    "statuses": [f.status for f in self.failures],
                    "delays": [f.delay_s for f in self.failures],
                    "errors": [f.error for f in self.failures],
                    "worker": worker,
                    "add": add,
                },
            )
        if self.acks:
            write_acks(session, publisher, self.acks)


def _order_params(policies: dict[str, _TopicPolicy]) -> dict[str, list[str]]:
    """The lane queries' parameters for order: topics without it, topics whose dead
    letters hold their keys. A topic the group has not registered is ordered, with the
    default policy."""
    return {
        "unordered_topics": [t for t, policy in policies.items() if not policy.ordered],
        "holding_topics": [t for t, policy in policies.items() if policy.holds_key],
    }
