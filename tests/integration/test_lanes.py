"""Lane processing on a real PostgreSQL: handlers run once with their effects, failures
back off and end dead, and in an ordered group a failing key holds back only itself."""

from __future__ import annotations

import collections
import json
import os
import signal
import threading
import time
import uuid
from typing import Any

import billiard.common
import pytest
from sqlalchemy import Engine, event, select, text, update
from sqlalchemy.orm import Session

import consumer
from consumer import Consumer
from consumer.lanes import LaneProcessor, lane_scope
from outbox import leases, queries
from outbox.db import make_sessionmaker
from outbox.errors import SettingsError
from outbox.models import ConsumerGroup, InboxMessage, Topic
from outbox.settings import Settings
from tests.inbox import receive
from tests.plans import as_written, rows_read

GROUP = "billing"
LANE = 3


@pytest.fixture
def effects(engine: Engine) -> Engine:
    with engine.begin() as conn:
        conn.execute(
            text("CREATE TABLE effects (message_id uuid PRIMARY KEY, body jsonb, attempt int)")
        )
    return engine


def _register(session: Session, topic: str, **group: Any) -> None:
    session.add(Topic(name=topic))
    session.flush()
    session.add(ConsumerGroup(name=GROUP, topic=topic, **group))
    session.commit()


def _receive(
    session: Session, topic: str, messages: list[tuple[str | None, dict]]
) -> list[uuid.UUID]:
    return receive(session, GROUP, topic, messages, lane=LANE)


def _rows(session: Session) -> dict[uuid.UUID, InboxMessage]:
    session.expire_all()
    return {r.message_id: r for r in session.scalars(select(InboxMessage))}


def _make_due(session: Session) -> None:
    """Skip the backoff: every waiting row is due now."""
    session.execute(
        update(InboxMessage)
        .where(InboxMessage.status == "failed")
        .values(next_attempt_at=text("now()"))
    )
    session.commit()


def test_effects_commit_with_the_inbox_row_and_happen_once(
    settings: Settings, effects: Engine, session: Session
):
    topic = f"t.{uuid.uuid4().hex[:8]}"
    _register(session, topic)

    @consumer.handler(topic)
    def record(message: consumer.Message, tx: Session) -> None:
        tx.execute(
            text("INSERT INTO effects VALUES (:id, CAST(:body AS jsonb), :attempt)"),
            {
                "id": message.id,
                "body": f'{{"n": {message.payload["n"]}}}',
                "attempt": message.attempt,
            },
        )

    ids = _receive(session, topic, [(f"k{n % 7}", {"n": n}) for n in range(250)])
    processor = LaneProcessor(settings, make_sessionmaker(effects), "worker-a")

    report = processor.run(GROUP, LANE)
    again = processor.run(GROUP, LANE)  # a duplicate task finds nothing left

    assert (report.done, report.failed, report.dead, report.next_due_s) == (250, 0, 0, None)
    assert again.done == 0
    rows = _rows(session)
    assert {r.status for r in rows.values()} == {"done"}
    assert {r.worker for r in rows.values()} == {"worker-a"}
    assert all(r.attempts == 1 and r.processed_at is not None for r in rows.values())
    effect_ids = session.execute(text("SELECT message_id, attempt FROM effects")).all()
    assert sorted(effect_ids) == sorted((i, 1) for i in ids)


def test_slow_handlers_commit_in_batches_of_about_a_second_in_order(
    settings: Settings, effects: Engine, session: Session, monkeypatch: pytest.MonkeyPatch
):
    # Given eight rows of one key whose handler takes 100 ms each, and batches that call
    # no new handler after 250 ms
    monkeypatch.setattr("consumer.lanes.BATCH_RUN_S", 0.25)
    topic = f"t.{uuid.uuid4().hex[:8]}"
    _register(session, topic)

    @consumer.handler(topic)
    def slow(message: consumer.Message, tx: Session) -> None:
        time.sleep(0.1)
        tx.execute(
            text("INSERT INTO effects VALUES (:id, CAST(:body AS jsonb), 1)"),
            {"id": message.id, "body": f'{{"n": {message.payload["n"]}}}'},
        )

    ids = _receive(session, topic, [("k", {"n": n}) for n in range(8)])

    # When one task runs the lane
    report = LaneProcessor(settings, make_sessionmaker(effects), "w").run(GROUP, LANE)

    # Then every row is done once, in order, committed in several transactions of a few
    # rows each rather than one of all eight
    assert report.done == 8
    rows = _rows(session)
    stamps = [rows[i].processed_at for i in ids]
    assert stamps == sorted(stamps)
    assert 3 <= len(set(stamps)) <= 4  # three rows (300 ms) a batch, the last one two
    assert session.scalar(text("SELECT count(*) FROM effects")) == 8


def test_a_failing_message_backs_off_then_succeeds_and_a_poison_one_goes_dead(
    settings: Settings, effects: Engine, session: Session
):
    topic = f"t.{uuid.uuid4().hex[:8]}"
    _register(session, topic, ordered=True, max_attempts=3, retry_base_s=30.0)

    failed_calls: collections.Counter[tuple[uuid.UUID, int]] = collections.Counter()

    @consumer.handler(topic)
    def flaky(message: consumer.Message, tx: Session) -> None:
        if message.payload.get("poison"):
            failed_calls[message.id, message.attempt] += 1
            raise ValueError("cannot parse the order")
        if message.attempt <= message.payload.get("fail_times", 0):
            failed_calls[message.id, message.attempt] += 1
            raise ConnectionError(f"downstream down (attempt {message.attempt})")
        tx.execute(
            text("INSERT INTO effects VALUES (:id, '{}', :attempt)"),
            {"id": message.id, "attempt": message.attempt},
        )

    flaky_id, after_flaky, poison_id, after_poison, other = _receive(
        session,
        topic,
        [
            ("a", {"fail_times": 2}),
            ("a", {}),  # same key: must wait for the flaky one
            ("b", {"poison": True}),
            ("b", {}),
            ("c", {}),  # another key flows
        ],
    )
    processor = LaneProcessor(settings, make_sessionmaker(effects), "worker-a")

    first = processor.run(GROUP, LANE)
    rows = _rows(session)
    assert rows[other].status == "done"
    assert rows[flaky_id].status == rows[poison_id].status == "failed"
    assert rows[after_flaky].status == rows[after_poison].status == "received"
    assert "downstream down (attempt 1)" in (rows[flaky_id].last_error or "")
    assert 0 < first.next_due_s <= 30.0  # the backoff of the first failures, jitter

    # Nothing is due before the backoff ends: a new task changes nothing.
    assert processor.run(GROUP, LANE).done == 0
    _make_due(session)
    processor.run(GROUP, LANE)
    _make_due(session)
    processor.run(GROUP, LANE)

    rows = _rows(session)
    assert (rows[flaky_id].status, rows[flaky_id].attempts) == ("done", 3)
    assert rows[flaky_id].attempt_workers == ["worker-a"] * 3  # each attempt's worker
    # A failing attempt ran its handler once, however its batch was run again.
    assert failed_calls == {(flaky_id, 1): 1, (flaky_id, 2): 1} | {
        (poison_id, attempt): 1 for attempt in (1, 2, 3)
    }
    assert (rows[poison_id].status, rows[poison_id].attempts) == ("dead", 3)
    assert "cannot parse the order" in (rows[poison_id].last_error or "")
    # The keys' later rows ran only after their predecessor finished, once each.
    assert rows[after_flaky].status == rows[after_poison].status == "done"
    assert rows[after_flaky].processed_at >= rows[flaky_id].processed_at
    effects_by_id = dict(session.execute(text("SELECT message_id, attempt FROM effects")).all())
    assert effects_by_id == {flaky_id: 3, after_flaky: 1, after_poison: 1, other: 1}


def test_a_permanent_error_is_dead_at_once_and_an_unordered_group_does_not_wait(
    settings: Settings, effects: Engine, session: Session
):
    topic = f"t.{uuid.uuid4().hex[:8]}"
    _register(session, topic, ordered=False, max_attempts=10)

    @consumer.handler(topic)
    def strict(message: consumer.Message, tx: Session) -> None:
        if message.payload.get("bad"):
            raise consumer.Permanent("schema v1 is not supported")
        if message.payload.get("flaky"):
            raise TimeoutError("slow dependency")
        tx.execute(text("INSERT INTO effects VALUES (:id, '{}', 1)"), {"id": message.id})

    bad, flaky, later = _receive(
        session, topic, [("k", {"bad": True}), ("k", {"flaky": True}), ("k", {})]
    )
    LaneProcessor(settings, make_sessionmaker(effects), "w").run(GROUP, LANE)

    rows = _rows(session)
    assert (rows[bad].status, rows[bad].attempts) == ("dead", 1)
    assert "schema v1 is not supported" in (rows[bad].last_error or "")
    assert rows[flaky].status == "failed"
    assert rows[later].status == "done"  # unordered: the same key's later row did not wait


def test_a_retry_waits_its_whole_backoff_after_its_failure_however_long_the_batch_ran(
    settings: Settings, session: Session
):
    topic = f"t.{uuid.uuid4().hex[:8]}"
    # Factor 1: the wait after any attempt but the first is exactly the base, 1 s
    _register(session, topic, ordered=False, retry_base_s=1.0, retry_factor=1.0)
    failed_at: list[float] = []

    @consumer.handler(topic)
    def slow_then_failing(message: consumer.Message, tx: Session) -> None:
        if message.payload.get("slow"):
            time.sleep(0.3)
            return
        now = tx.execute(text("SELECT CAST(extract(epoch FROM clock_timestamp()) AS float8)"))
        failed_at.append(now.scalar_one())
        raise ConnectionError("downstream down")

    slow, failing = _receive(session, topic, [("s", {"slow": True}), ("f", {})])
    session.execute(
        update(InboxMessage)
        .where(InboxMessage.message_id == failing)
        .values(attempts=1, status="failed", next_attempt_at=text("now()"))
    )
    session.commit()

    LaneProcessor(settings, make_sessionmaker(session.get_bind()), "w").run(GROUP, LANE)

    rows = _rows(session)
    assert (rows[slow].status, rows[failing].status, rows[failing].attempts) == (
        "done",
        "failed",
        2,
    )
    # The second attempt ran after the slow handler (0.3 s into the batch, twice: the
    # batch ran again row by row after the failure); its retry is due 1 s after it failed.
    due = rows[failing].next_attempt_at.timestamp()
    assert due - failed_at[-1] >= 1.0


def test_a_handler_that_calls_exit_fails_its_message_and_the_task_goes_on(
    settings: Settings, effects: Engine, session: Session
):
    topic = f"t.{uuid.uuid4().hex[:8]}"
    _register(session, topic, ordered=False)

    @consumer.handler(topic)
    def quits(message: consumer.Message, tx: Session) -> None:
        if message.payload.get("quit"):
            raise SystemExit(3)
        tx.execute(text("INSERT INTO effects VALUES (:id, '{}', 1)"), {"id": message.id})

    quitting, other = _receive(session, topic, [("a", {"quit": True}), ("b", {})])
    report = LaneProcessor(settings, make_sessionmaker(effects), "w").run(GROUP, LANE)

    assert (report.done, report.failed) == (1, 1)
    rows = _rows(session)
    assert (rows[quitting].status, rows[other].status) == ("failed", "done")
    assert "HandlerExit: the handler called exit(3)" in (rows[quitting].last_error or "")


def test_a_worker_process_told_to_end_during_a_handler_ends_and_records_nothing(
    settings: Settings, effects: Engine, session: Session
):
    topic = f"t.{uuid.uuid4().hex[:8]}"
    _register(session, topic, ordered=False)

    @consumer.handler(topic)
    def handle(message: consumer.Message, tx: Session) -> None:
        tx.execute(text("INSERT INTO effects VALUES (:id, '{}', 1)"), {"id": message.id})
        if message.payload.get("last"):
            # SIGTERM, as a pool process gets it (a hard time limit, a stop sent to the
            # worker's process group): billiard's handler raises SystemExit here
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)

    first, last = _receive(session, topic, [("a", {}), ("b", {"last": True})])
    previous = signal.signal(signal.SIGTERM, billiard.common._shutdown_cleanup)
    try:
        with pytest.raises(SystemExit):
            LaneProcessor(settings, make_sessionmaker(effects), "w").run(GROUP, LANE)
    finally:
        signal.signal(signal.SIGTERM, previous)
        billiard.common.clear_terminate_handler_fired()

    # The process ends with its batch undone: no failure recorded, no effect kept
    rows = _rows(session)
    assert [(rows[m].status, rows[m].attempts) for m in (first, last)] == [("received", 0)] * 2
    with effects.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM effects")).scalar_one() == 0


def test_lanes_whose_last_batch_fails_to_commit_are_given_back_not_left_leased(
    settings: Settings, effects: Engine, session: Session
):
    (only,) = _receive(session, _topic_with_effects(session), [("a", {})])
    failures = ["the connection to the server was lost"]
    releasing = [False]

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        releasing[0] = releasing[0] or "UPDATE leases SET owner = NULL" in statement

    def commit(conn: Any) -> None:
        # The commit of the batch that gives the lanes back fails, once (PostgreSQL went
        # away, or the process was told to end, as the transaction ended)
        if releasing[0] and failures:
            raise RuntimeError(failures.pop())

    event.listen(effects, "before_cursor_execute", seen)
    event.listen(effects, "commit", commit)
    try:
        with pytest.raises(RuntimeError, match="connection to the server was lost"):
            LaneProcessor(settings, make_sessionmaker(effects), "w").run(GROUP, LANE)
    finally:
        event.remove(effects, "before_cursor_execute", seen)
        event.remove(effects, "commit", commit)

    # Nothing of the batch was kept, and the lane is free for the next task at once,
    # rather than held until its lease lapses (a minute)
    assert _rows(session)[only].status == "received"
    with make_sessionmaker(effects).begin() as tx:
        taken = leases.acquire(tx, lane_scope(GROUP), "next-task", [LANE], limit=1, lease_s=60)
    assert list(taken) == [LANE]


def test_a_batch_handler_takes_its_rows_in_one_call_and_a_failure_stays_with_its_row(
    settings: Settings, effects: Engine, session: Session
):
    topic = f"t.{uuid.uuid4().hex[:8]}"
    _register(session, topic, ordered=True, max_attempts=1)
    calls: list[list[int]] = []

    @consumer.batch_handler(topic)
    def record_all(messages: list[consumer.Message], tx: Session) -> None:
        calls.append([m.payload["n"] for m in messages])
        for m in messages:
            if m.payload.get("poison"):
                raise ValueError(f"cannot parse {m.payload['n']}")
            tx.execute(text("INSERT INTO effects VALUES (:id, '{}', 1)"), {"id": m.id})

    clean = _receive(session, topic, [(f"k{n}", {"n": n}) for n in range(5)])
    processor = LaneProcessor(settings, make_sessionmaker(effects), "w")
    assert processor.run(GROUP, LANE).done == 5
    assert calls == [[0, 1, 2, 3, 4]]  # one call, in the lane's order

    calls.clear()
    mixed = _receive(
        session, topic, [("a", {"n": 5}), ("b", {"n": 6, "poison": True}), ("c", {"n": 7})]
    )
    report = processor.run(GROUP, LANE)

    # The failed call is undone and each of its rows runs alone: only the poison fails.
    assert calls == [[5, 6, 7], [5], [6], [7]]
    assert (report.done, report.dead) == (2, 1)
    rows = _rows(session)
    assert [rows[m].status for m in mixed] == ["done", "dead", "done"]
    assert "cannot parse 6" in (rows[mixed[1]].last_error or "")
    effects_ids = set(session.execute(text("SELECT message_id FROM effects")).scalars())
    assert effects_ids == {*clean, mixed[0], mixed[2]}


def test_one_run_takes_several_lanes_and_leaves_a_busy_one_to_its_holder(
    settings: Settings, effects: Engine, session: Session
):
    topic = f"t.{uuid.uuid4().hex[:8]}"
    _register(session, topic)
    seen: list[tuple[int, str]] = []

    @consumer.handler(topic)
    def record(message: consumer.Message, tx: Session) -> None:
        seen.append((message.payload["lane"], message.key))

    for lane in (1, 2, 5):
        receive(session, GROUP, topic, [("k", {"lane": lane, "n": n}) for n in range(3)], lane=lane)
    with make_sessionmaker(effects).begin() as tx:  # another task holds lane 5
        leases.ensure_rows(tx, lane_scope(GROUP), settings.lanes)
        assert leases.acquire(tx, lane_scope(GROUP), "another-task", [5], limit=1, lease_s=60)

    report = LaneProcessor(settings, make_sessionmaker(effects), "worker-a").run(GROUP, [1, 2, 5])

    assert (report.done, report.leased, report.busy) == (6, [1, 2], [5])
    assert sorted(seen) == [(1, "k")] * 3 + [(2, "k")] * 3
    rows = _rows(session).values()
    assert sorted(r.lane for r in rows if r.status == "received") == [5, 5, 5]


def test_a_changed_lane_count_is_refused_while_rows_spread_by_the_old_one_are_unfinished(
    settings: Settings, effects: Engine, session: Session
):
    topic = f"t.{uuid.uuid4().hex[:8]}"
    _register(session, topic)
    done: list[str] = []

    @consumer.handler(topic)
    def record(message: consumer.Message, tx: Session) -> None:
        done.append(message.key or "")

    sessions = make_sessionmaker(effects)
    LaneProcessor(settings.replace(lanes=8), sessions, "w").run(GROUP, [LANE])  # count: 8
    _receive(session, topic, [("k1", {}), ("k2", {})])
    # When a worker (or a consumer) starts with 4 lanes while those rows wait
    with pytest.raises(SettingsError, match=r"OUTBOX_LANES=4.*spread over 8.*unfinished"):
        LaneProcessor(settings.replace(lanes=4), sessions, "w").run(GROUP, [LANE])
    with pytest.raises(SettingsError, match=r"OUTBOX_LANES=4"):
        Consumer(settings.replace(lanes=4), GROUP, [topic], sessions=sessions).run()
    assert done == []
    # Once the old count's workers finish them, the new count is taken
    assert LaneProcessor(settings.replace(lanes=8), sessions, "w").run(GROUP, [LANE]).done == 2
    LaneProcessor(settings.replace(lanes=4), sessions, "w").run(GROUP, [0])
    count = session.scalar(
        text("SELECT count(*) FROM leases WHERE scope = :s"), {"s": lane_scope(GROUP)}
    )
    assert count == 4


class _RecordingLinger:
    """A linger that lets new rows arrive while the task waits, and records its calls."""

    def __init__(self, arrive: Any, waits: int) -> None:
        self.arrive = arrive  # called once, on the first wait: commits more rows
        self.waits = waits
        self.calls: list[tuple[str, Any]] = []

    def hold(self, group: str, lanes: Any) -> None:
        self.calls.append(("hold", list(lanes)))

    def keep_waiting(self, idle_s: float) -> bool:
        if self.arrive is not None:
            self.arrive()
            self.arrive = None
        self.waits -= 1
        return self.waits > 0

    def let_go(self, group: str, lanes: Any) -> None:
        self.calls.append(("let_go", list(lanes)))

    def acks_written(self) -> None:
        self.calls.append(("acks_written", None))

    def gathers(self) -> bool:
        return False  # no lingering place of its worker's own: it takes only lanes with rows

    def may_hand_off(self) -> bool:
        return False  # every pool process is taken: nothing is handed off

    def hand_off(self, group: str, lanes: Any) -> None:
        raise AssertionError("no lane is handed off while no pool process is free")


def test_the_look_for_lanes_with_work_reads_a_row_per_lane_whatever_the_statistics_say(
    settings: Settings, engine: Engine, session: Session
):
    topic = f"t.{uuid.uuid4().hex[:8]}"
    _register(session, topic)
    # Statistics taken in a quiet moment: every row done
    receive(session, GROUP, topic, [(f"k{i}", {"n": i}) for i in range(200)], status="done")
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE inbox_messages"))
    # then a backlog: 3,000 rows wait over the group's lanes
    per_lane = 3000 // settings.lanes
    for lane in range(settings.lanes):
        messages = [(f"k{lane}.{i % 50}", {"n": i}) for i in range(per_lane)]
        receive(session, GROUP, topic, messages, lane=lane)
    params = {
        "group": GROUP,
        "scope": lane_scope(GROUP),
        "owner": "lanes-under-test",
        "lane_count": settings.lanes,
        "waited_s": 0.0,
        "unordered_topics": [],
        "holding_topics": [],
    }

    (plan,) = session.execute(
        text("EXPLAIN (ANALYZE, FORMAT JSON) " + queries.LANES_OPEN_WITH_WORK.text), params
    ).scalar_one()
    session.rollback()

    # Each lane's probe reads its first row: not a scan of the whole backlog
    assert rows_read(plan, "inbox_messages") <= settings.lanes


def test_a_lingering_lane_task_looks_for_rows_on_one_connection_one_statement_each(
    settings: Settings, effects: Engine, session: Session
):
    topic = _topic_with_effects(session)
    _receive(session, topic, [("k1", {"n": 1})])
    seen: list[str] = []
    event.listen(effects, "checkout", lambda *_: seen.append("checkout"))
    event.listen(effects, "rollback", lambda *_: seen.append("rollback"))
    event.listen(effects, "before_cursor_execute", lambda *a: seen.append(a[2]))
    during: list[str] = []

    class Idle(_RecordingLinger):
        def keep_waiting(self, idle_s: float) -> bool:
            if self.waits == 20:
                seen.clear()  # from the first wait to the last: the looks
            if self.waits == 1:
                during.extend(seen)
            return super().keep_waiting(idle_s)

    processor = LaneProcessor(
        settings.replace(lane_poll_ms=1), make_sessionmaker(effects), "worker-a"
    )
    assert processor.run(GROUP, LANE, linger=Idle(None, waits=20)).done == 1

    # Nineteen looks of one statement each, on a connection checked out for the whole
    # wait: no check-out (with the pool's ping), BEGIN or ROLLBACK per look; with nothing
    # due anywhere, the look is the cheap one, and the one per bucket or lane never runs.
    during[:] = as_written(during)  # a prepared look: its EXECUTE, not its PREPARE
    assert len(during) == 19
    assert all("inbox_messages" in sql and "generate_series" not in sql for sql in during)


def test_a_batch_renews_its_leases_limits_its_statements_and_claims_in_one_round_trip(
    settings: Settings, effects: Engine, session: Session
):
    topic = f"t.{uuid.uuid4().hex[:8]}"
    _register(session, topic, handler_timeout_s=7)

    @consumer.handler(topic)
    def record(message: consumer.Message, tx: Session) -> None:
        # What limits the handler's statements.
        tx.execute(
            text(
                "INSERT INTO effects VALUES "
                "(:id, to_jsonb(current_setting('statement_timeout')), 1)"
            ),
            {"id": message.id},
        )

    _receive(session, topic, [("k1", {"n": 1}), ("k2", {"n": 2}), ("k1", {"n": 3})])
    seen: list[str] = []
    event.listen(effects, "commit", lambda *_: seen.append("COMMIT"))
    event.listen(effects, "before_cursor_execute", lambda *a: seen.append(a[2]))

    processor = LaneProcessor(settings, make_sessionmaker(effects), "worker-a")
    assert processor.run(GROUP, LANE).done == 3

    # The batch's transaction, after the one that took the leases: one statement before
    # the handlers' savepoint (the bare loop's claim is one too), then the handlers.
    seen[:] = as_written(seen)
    first_effect = next(n for n, sql in enumerate(seen) if sql.startswith("INSERT INTO effects"))
    opened = max(n for n in range(first_effect) if seen[n] == "COMMIT")
    before = seen[opened + 1 : first_effect]
    assert len(before) == 2, before
    assert before[1].startswith("SAVEPOINT")
    assert "set_config" in before[0] and "FOR UPDATE" in before[0]
    # Its limit holds for the handlers: the group's handler timeout.
    with effects.connect() as conn:
        assert conn.execute(text("SELECT body FROM effects")).scalars().all() == ["7s"] * 3


def _topic_with_effects(session: Session) -> str:
    """A registered topic whose handler writes one effect row per message."""
    topic = f"t.{uuid.uuid4().hex[:8]}"
    _register(session, topic)

    @consumer.handler(topic)
    def record(message: consumer.Message, tx: Session) -> None:
        tx.execute(text("INSERT INTO effects VALUES (:id, NULL, 1)"), {"id": message.id})

    return topic


def test_a_lingering_lane_task_runs_rows_that_arrive_while_it_waits_then_lets_go(
    settings: Settings, effects: Engine, session: Session
):
    topic = _topic_with_effects(session)

    first = _receive(session, topic, [("k1", {"n": 1})])
    later: list[uuid.UUID] = []
    linger = _RecordingLinger(
        lambda: later.extend(_receive(Session(effects), topic, [("k1", {"n": 2})])), waits=50
    )
    processor = LaneProcessor(settings, make_sessionmaker(effects), "worker-a")

    report = processor.run(GROUP, LANE, linger=linger)

    # One task ran both: the row committed while it waited did not need a kick.
    assert report.done == 2 and report.next_due_s is None
    assert {r.status for r in _rows(session).values()} == {"done"}
    assert set(session.execute(text("SELECT message_id FROM effects")).scalars()) == {
        *first,
        *later,
    }
    # It held the lane's kicks while it waited and let them go before its last look.
    assert linger.calls == [("hold", [LANE]), ("let_go", [LANE])]
    owner = session.execute(
        text("SELECT owner FROM leases WHERE scope = :scope AND bucket = :lane"),
        {"scope": lane_scope(GROUP), "lane": LANE},
    ).scalar_one()
    assert owner is None  # and gave the lane back


def test_after_a_batch_that_found_rows_a_lingering_lane_task_looks_again_without_a_wait(
    settings: Settings, effects: Engine, session: Session, monkeypatch
):
    """A row that arrives during a batch runs in the next one straight away; an idle task
    waits a poll per look."""
    topic = _topic_with_effects(session)
    _receive(session, topic, [("k1", {"n": 1})])
    events: list[str] = []
    real_sleep = time.sleep
    monkeypatch.setattr(time, "sleep", lambda s: (events.append("sleep"), real_sleep(s)))
    processor = LaneProcessor(
        settings.replace(lane_poll_ms=200), make_sessionmaker(effects), "worker-a"
    )
    process = processor._process

    def batch(*args: Any, **kwargs: Any) -> Any:
        events.append("batch")
        return process(*args, **kwargs)

    processor._process = batch  # type: ignore[method-assign]
    # The linger commits a row as it is first asked whether to wait: after the first batch
    linger = _RecordingLinger(
        lambda: _receive(Session(effects), topic, [("k1", {"n": 2})]), waits=4
    )

    report = processor.run(GROUP, LANE, linger=linger)

    assert report.done == 2
    assert events[:3] == ["batch", "batch", "sleep"]


def test_a_lingering_task_holding_every_lane_runs_a_batch_on_the_probe_alone(
    settings: Settings, effects: Engine, session: Session
):
    topic = _topic_with_effects(session)
    _receive(session, topic, [("k1", {"n": 0})])
    seen: list[str] = []
    event.listen(effects, "before_cursor_execute", lambda *a: seen.append(a[2]))

    class OneAtATime(_RecordingLinger):
        def keep_waiting(self, idle_s: float) -> bool:
            if self.waits > 47:  # a row on each of the first three waits
                _receive(Session(effects), topic, [("k1", {"n": 50 - self.waits})])
            return super().keep_waiting(idle_s)

    processor = LaneProcessor(
        settings.replace(lane_poll_ms=1), make_sessionmaker(effects), "worker-a"
    )
    every_lane = list(range(settings.lanes))
    report = processor.run(GROUP, every_lane, linger=OneAtATime(None, waits=50))

    assert report.done == 4
    # Each row that came while it waited was found by the probe of the due rows' index
    # alone: the task holds every lane, and its batch claims in each of them.
    assert not [sql for sql in seen if "lane_count" in sql]  # LANES_OPEN_WITH_WORK


def test_a_row_held_back_by_its_key_does_not_cost_a_batch_every_poll(
    settings: Settings, effects: Engine, session: Session
):
    topic = f"t.{uuid.uuid4().hex[:8]}"
    _register(session, topic, ordered=True, retry_base_s=60.0)

    @consumer.handler(topic)
    def first_fails(message: consumer.Message, tx: Session) -> None:
        if message.payload["n"] == 0:
            raise ConnectionError("downstream down")

    # The second row is due, but waits behind the first's backoff: the probe of due rows
    # sees it on every poll.
    _receive(session, topic, [("k1", {"n": 0}), ("k1", {"n": 1})])
    seen: list[str] = []
    event.listen(effects, "before_cursor_execute", lambda *a: seen.append(a[2]))
    processor = LaneProcessor(
        settings.replace(lane_poll_ms=1), make_sessionmaker(effects), "worker-a"
    )
    linger = _RecordingLinger(None, waits=30)
    report = processor.run(GROUP, list(range(settings.lanes)), linger=linger)

    assert (report.failed, report.done) == (1, 0)
    assert linger.waits == 0  # it waited its thirty polls
    # The batch that failed the first row, the one right after it (the second row might
    # have been free), and the last look as the task ends: not one per poll.
    batches = [sql for sql in as_written(seen) if "set_config" in sql]
    assert len(batches) == 3


def test_a_lingering_lane_task_has_each_batchs_acks_relayed_as_it_commits(
    settings: Settings, effects: Engine, session: Session
):
    topic = f"t.{uuid.uuid4().hex[:8]}"
    _register(session, topic, requires_ack=True)
    consumer.handler(topic)(lambda message, tx: None)
    ids = _receive(session, topic, [("k1", {"n": 1})])
    linger = _RecordingLinger(
        lambda: ids.extend(_receive(Session(effects), topic, [("k1", {"n": 2})])), waits=50
    )

    report = LaneProcessor(settings, make_sessionmaker(effects), "worker-a").run(
        GROUP, LANE, linger=linger
    )

    # Each batch's ack was announced once it committed, while the task still lingered:
    # acks are outbox rows, and wait for no task to end before they are relayed.
    assert report.done == 2 and report.acks == 2
    assert linger.calls == [
        ("hold", [LANE]),
        ("acks_written", None),
        ("acks_written", None),
        ("let_go", [LANE]),
    ]
    acked = session.execute(
        text(
            "SELECT a ->> 'message_id' FROM outbox_messages, jsonb_array_elements(payload -> "
            "'acks') AS a WHERE topic = 'outbox.acks' AND a ->> 'topic' = :topic"
        ),
        {"topic": topic},
    ).scalars()
    assert sorted(acked) == sorted(str(i) for i in ids)


def test_a_lane_task_stops_lingering_when_told_and_gives_its_lanes_back(
    settings: Settings, effects: Engine, session: Session
):
    topic = _topic_with_effects(session)

    _receive(session, topic, [("k1", {"n": 1})])
    linger = _RecordingLinger(None, waits=1)  # other tasks are queued: no waiting
    started = time.monotonic()
    report = LaneProcessor(settings, make_sessionmaker(effects), "w").run(
        GROUP, LANE, linger=linger
    )
    assert report.done == 1 and time.monotonic() - started < 2
    assert linger.calls == [("hold", [LANE]), ("let_go", [LANE])]


def test_a_lingering_lane_task_whose_budget_ends_lets_its_lanes_kicks_go(
    settings: Settings, effects: Engine, session: Session
):
    topic = _topic_with_effects(session)
    # Far more rows than 0.3 s of one-row batches can run, however fast the machine.
    _receive(session, topic, [("k1", {"n": n}) for n in range(5000)])
    linger = _RecordingLinger(None, waits=10_000)  # it would wait on: the budget ends it
    # One row a batch: every batch is full, so the budget ends the task while it is busy.
    report = LaneProcessor(
        settings.replace(lane_batch_size=1), make_sessionmaker(effects), "w"
    ).run(GROUP, LANE, budget_s=0.3, linger=linger)
    assert 0 < report.done < 5000 and report.next_due_s is not None
    # Without the let-go the lane's kick flag would stay held: the consumer's next
    # commit there would queue no task.
    assert linger.calls == [("hold", [LANE]), ("let_go", [LANE])]


def test_a_busy_lingering_lane_task_takes_on_a_lane_whose_row_waits_with_no_task_free(
    settings: Settings, effects: Engine, session: Session
):
    topic = _topic_with_effects(session)
    # The task's own lane keeps it busy: one row per batch, twenty rows.
    own = _receive(session, topic, [(f"k{n}", {"n": n}) for n in range(20)])
    # Another lane's row has been due for a second: its kick found no free pool process.
    starved = receive(session, GROUP, topic, [("other", {})], lane=LANE + 2)
    session.execute(
        update(InboxMessage)
        .where(InboxMessage.message_id == starved[0])
        .values(next_attempt_at=text("now() - interval '1 second'"))
    )
    session.commit()
    linger = _RecordingLinger(None, waits=1)
    processor = LaneProcessor(settings.replace(lane_batch_size=1), make_sessionmaker(effects), "w")

    report = processor.run(GROUP, LANE, linger=linger)

    assert report.done == 21
    assert set(session.execute(text("SELECT message_id FROM effects")).scalars()) == {
        *own,
        *starved,
    }
    # It held the other lane's kicks too once it took it, and gave both back.
    assert linger.calls[0] == ("hold", [LANE])
    assert ("hold", [LANE, LANE + 2]) in linger.calls
    assert linger.calls[-1] == ("let_go", [LANE, LANE + 2])


class _Gathering(_RecordingLinger):
    """A linger in a lingering place of its worker's own, whose ``keep_waiting`` calls
    ``arrive`` on a later wait (after the task had time to gather its lanes)."""

    def __init__(self, arrive: Any, arrive_on: int, waits: int) -> None:
        super().__init__(None, waits)
        self.late, self.arrive_on = arrive, arrive_on

    def keep_waiting(self, idle_s: float) -> bool:
        self.arrive_on -= 1
        if self.arrive_on == 0:
            self.late()
        return super().keep_waiting(idle_s)

    def gathers(self) -> bool:
        return True


def test_a_lingering_lane_task_in_a_place_of_its_own_gathers_every_free_lane_of_its_group(
    settings: Settings, effects: Engine, session: Session
):
    topic = _topic_with_effects(session)
    first = _receive(session, topic, [("k1", {"n": 1})])
    # Another task holds one lane: it stays that task's.
    other = LANE + 5
    with make_sessionmaker(effects).begin() as tx:
        leases.ensure_rows(tx, lane_scope(GROUP), settings.lanes)
        leases.acquire(tx, lane_scope(GROUP), "other-task", [other], limit=1, lease_s=60)
    late: list[uuid.UUID] = []
    linger = _Gathering(
        lambda: late.extend(receive(Session(effects), GROUP, topic, [("k9", {})], lane=LANE + 3)),
        arrive_on=30,
        waits=60,
    )
    processor = LaneProcessor(settings, make_sessionmaker(effects), "worker-a")

    report = processor.run(GROUP, LANE, linger=linger)

    # It took, and held the kicks of, every lane nobody held, rows or not; so the row that
    # arrived later in one of them ran in this task, with no kick.
    everyone_else = [n for n in range(settings.lanes) if n != other]
    assert ("hold", everyone_else) in linger.calls
    assert report.done == 2
    assert set(session.execute(text("SELECT message_id FROM effects")).scalars()) == {
        *first,
        *late,
    }
    assert linger.calls[-1] == ("let_go", everyone_else)
    owners = dict(
        session.execute(
            text("SELECT bucket, owner FROM leases WHERE scope = :scope"),
            {"scope": lane_scope(GROUP)},
        ).all()
    )
    assert owners.pop(other) == "other-task"
    assert set(owners.values()) == {None}  # it gave every lane back


class _BusyGathering(_Gathering):
    """A gathering linger whose own lane gets a new row at each of its first ``busy``
    waits (so every look finds a row there), recording at which wait it took more lanes."""

    def __init__(self, arrive: Any, busy: int, waits: int) -> None:
        super().__init__(None, arrive_on=0, waits=waits)
        self.each, self.busy, self.wait = arrive, busy, 0
        self.widened_at: int | None = None

    def hold(self, group: str, lanes: Any) -> None:
        super().hold(group, lanes)
        if len(lanes) > 1 and self.widened_at is None:
            self.widened_at = self.wait

    def keep_waiting(self, idle_s: float) -> bool:
        self.wait += 1
        if self.wait <= self.busy:
            self.each()
        return _RecordingLinger.keep_waiting(self, idle_s)


def test_a_gathering_lane_task_takes_free_lanes_while_its_own_keep_finding_rows(
    settings: Settings, effects: Engine, session: Session
):
    # Lanes worked by kicked tasks that found no lingering place are free between two of
    # them: a lingering task that finds rows at every look must take them all the same,
    # or every commit in them keeps kicking a task of its own.
    topic = _topic_with_effects(session)
    _receive(session, topic, [("k0", {"n": 0})])
    arrived: list[uuid.UUID] = []
    linger = _BusyGathering(
        lambda: arrived.extend(
            receive(Session(effects), GROUP, topic, [(f"k{len(arrived)}", {})], lane=LANE)
        ),
        busy=60,
        waits=80,
    )
    processor = LaneProcessor(settings, make_sessionmaker(effects), "worker-a")

    report = processor.run(GROUP, LANE, linger=linger)

    assert report.done == 1 + 60
    # It took every other lane while its own still had a row at every look (60 looks
    # of at least 5 ms each: it looks for free lanes every 0.1 s).
    assert ("hold", list(range(settings.lanes))) in linger.calls
    assert linger.widened_at is not None and linger.widened_at < 60


def test_a_busy_lingering_lane_task_hands_half_its_lanes_to_a_task_of_their_own(
    settings: Settings, effects: Engine, session: Session
):
    topic = f"t.{uuid.uuid4().hex[:8]}"
    _register(session, topic)

    @consumer.handler(topic)
    def slow(message: consumer.Message, tx: Session) -> None:
        time.sleep(0.01)  # a backlog that keeps the task busy for over a second
        tx.execute(
            text("INSERT INTO effects VALUES (:id, :body, 1)"),
            {"id": message.id, "body": json.dumps(message.payload)},
        )

    lanes = [LANE, LANE + 1, LANE + 2, LANE + 3]
    for lane in lanes:
        receive(session, GROUP, topic, [(f"k{lane}", {"n": n}) for n in range(40)], lane=lane)
    sessions = make_sessionmaker(effects)
    owners_at_hand_off: list[Any] = []
    others: list[threading.Thread] = []

    class HandingOff(_RecordingLinger):
        def may_hand_off(self) -> bool:
            return not others  # one pool process is free, until a handed-off task takes it

        def hand_off(self, group: str, given: Any) -> None:
            self.calls.append(("hand_off", list(given)))
            with sessions() as look:
                owners_at_hand_off.extend(
                    look.execute(
                        text("SELECT owner FROM leases WHERE scope = :s AND bucket = ANY(:b)"),
                        {"s": lane_scope(group), "b": list(given)},
                    ).scalars()
                )
            # The task of their own, in another pool process.
            other = LaneProcessor(settings.replace(lane_batch_size=4), sessions, "worker-b")
            others.append(threading.Thread(target=other.run, args=(group, list(given))))
            others[-1].start()

    linger = HandingOff(None, waits=1)
    processor = LaneProcessor(settings.replace(lane_batch_size=4), sessions, "worker-a")
    report = processor.run(GROUP, lanes, linger=linger)
    for other in others:
        other.join(30)

    # Half the lanes went to the other task, free of leases, once, and stayed there.
    assert [c for c in linger.calls if c[0] == "hand_off"] == [("hand_off", lanes[2:])]
    assert owners_at_hand_off == [None, None]
    rows = _rows(session).values()
    assert {r.status for r in rows} == {"done"} and report.done < 160
    assert {r.worker for r in rows if r.lane in lanes[:2]} == {"worker-a"}
    for lane in lanes[2:]:
        # From the hand-off on, the lane's rows ran in the other task.
        workers = [r.worker for r in sorted(rows, key=lambda r: r.id) if r.lane == lane]
        first = workers.index("worker-b")
        assert set(workers[:first]) <= {"worker-a"} and set(workers[first:]) == {"worker-b"}
    # Every message ran once, each key in order.
    ran = session.execute(text("SELECT body FROM effects")).scalars().all()
    assert len(ran) == 160
    by_id = {r.message_id: r for r in rows}
    order = (
        session.execute(
            text(
                "SELECT e.message_id FROM effects e JOIN inbox_messages i USING (message_id) "
                "ORDER BY i.processed_at, i.id"
            )
        )
        .scalars()
        .all()
    )
    for lane in lanes:
        seen = [by_id[m].payload["n"] for m in order if by_id[m].lane == lane]
        assert seen == list(range(40))


def test_a_lane_task_without_lingering_leaves_other_lanes_to_their_kicks(
    settings: Settings, effects: Engine, session: Session
):
    topic = _topic_with_effects(session)
    _receive(session, topic, [(f"k{n}", {"n": n}) for n in range(5)])
    receive(session, GROUP, topic, [("other", {})], lane=LANE + 2)
    processor = LaneProcessor(settings.replace(lane_batch_size=1), make_sessionmaker(effects), "w")
    assert processor.run(GROUP, LANE).done == 5
