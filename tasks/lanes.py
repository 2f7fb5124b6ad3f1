"""``consumer.process_lane`` and the beat sweep ``consumer.sweep``.

A lane task is a "go" signal carrying only a group and some of its lanes: the
inbox rows are the state. One task takes every lane of a consumer's commit that
had no kick pending, so a poll of the consumer costs one task, not one per lane.
A task lost in Redis delays its lanes until the next sweep, never more.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from typing import Any

import redis
from celery import Celery
from celery.utils.nodenames import worker_direct

from consumer.lanes import LaneProcessor, LaneReport
from outbox import queries, tasknames
from outbox.db import make_engine, make_sessionmaker
from outbox.kick import claim_kicks, kick_started, lane_flag
from outbox.settings import Settings
from tasks.linger import Lingering
from tasks.relay import flags_for_this_process, kick_relay
from tasks.shutdown import stopping_for_this_process

SWEEP_LIMIT = 10_000
IDLE_RETRY_S = 1.0
# A task that found its lanes held looks again after this, then twice as long each time
# they are still held, up to IDLE_RETRY_S: their holder is most often just ending, and
# rows committed as it ended are this task's to run.
BUSY_FIRST_S = 0.05
# A pending kick's flag lapses after this, so a kick lost with its worker holds back its
# lane only until the next sweep after it; a kick queued longer than this may be doubled.
KICK_FLAG_TTL_S = 30.0

_processor: tuple[int, LaneProcessor] | None = None

# The value of a lane's kick flag while a lingering task holds the lane (it sees the
# lane's rows itself); a kick's flag is b"1".
LINGERING = b"lingering"
# A lane task starts: it deletes its lanes' kick flags, so that later commits kick again,
# but not those that a lingering task holds (that task sees their rows; a kick now would
# only find the lanes held).
_LANES_STARTED = """
for _, key in ipairs(KEYS) do
    if redis.call('GET', key) ~= ARGV[1] then redis.call('DEL', key) end
end
return 0
"""


def lanes_started(flags: redis.Redis, keys: list[str]) -> None:
    """Called by a lane task before it takes its lanes (see :data:`LINGERING`)."""
    # A registered script goes by its hash (EVALSHA), not its text, on every task start.
    flags.register_script(_LANES_STARTED)(keys=keys, args=[LINGERING])


def processor_for_this_process(settings: Settings, worker: str) -> LaneProcessor:
    """This process's lane processor, made on first use after fork."""
    global _processor
    if _processor is None or _processor[0] != os.getpid():
        sessions = make_sessionmaker(make_engine(settings, pool_size=2))
        _processor = (os.getpid(), LaneProcessor(settings, sessions, worker))
    return _processor[1]


def kick_lanes(
    app: Celery,
    settings: Settings,
    lanes: set[tuple[str, int]],
    busy_s: float | None = None,
) -> int:
    """Queue ``consumer.process_lane`` for the lanes with no kick pending, one task per
    group (with ``busy_s``: a look again at lanes found held, after that many seconds);
    return how many lanes were kicked."""
    if not lanes:
        return 0
    ordered = sorted(lanes)
    flags = flags_for_this_process(app.conf.broker_url)
    claimed = claim_kicks(flags, int(KICK_FLAG_TTL_S * 1000), [lane_flag(g, n) for g, n in ordered])
    by_group: dict[str, list[int]] = {}
    for (group, lane), claim in zip(ordered, claimed, strict=True):
        if claim:
            by_group.setdefault(group, []).append(lane)
    for group, kicked in by_group.items():
        # No expiry: the flags keep at most one kick per lane queued, and an expired
        # kick would leave its rows waiting for the sweep.
        app.send_task(
            tasknames.PROCESS_LANE,
            args=(group, kicked),
            kwargs=None if busy_s is None else {"busy_s": busy_s},
            countdown=busy_s,
        )
    return sum(len(kicked) for kicked in by_group.values())


def rekick_countdown(report: LaneReport, longest_s: float) -> float | None:
    """When a lane task comes back for its lanes' waiting rows: None when nothing waits;
    else when the first one is due (rows waiting for a backoff, or left when the budget
    ended), at most ``longest_s``. Rows due now that could not be had (locked elsewhere)
    by a run that did nothing are looked at again after :data:`IDLE_RETRY_S`, not in a
    busy loop; rows due later are simply waited for (a wait would make them late)."""
    countdown = report.next_due_s
    if countdown is None:
        return None
    if countdown <= 0 and not report.done + report.failed + report.dead:
        countdown = IDLE_RETRY_S
    return min(countdown, longest_s)


def busy_wait(last_s: float | None) -> float:
    """How long a task that found lanes held waits before it looks again: short at
    first, twice as long each time after (``last_s``: the last wait), at most
    :data:`IDLE_RETRY_S`."""
    return BUSY_FIRST_S if last_s is None else min(2 * last_s, IDLE_RETRY_S)


class LaneLinger(Lingering):
    """A lane task's wait for new rows (:class:`consumer.lanes.Linger`): it holds its
    lanes' kick flags meanwhile, so the consumer's commits queue no task for them, for up
    to ``OUTBOX_LANE_LINGER_MS`` without rows. A held flag lapses with the lane's lease
    (it is renewed while the task waits), so a task that dies holding it delays its lanes'
    kicks no longer than its lease delays them anyway."""

    def __init__(self, app: Celery, settings: Settings, worker: str) -> None:
        flags = flags_for_this_process(app.conf.broker_url)
        super().__init__(app, flags, settings.lane_linger_ms / 1000, worker, settings.lane_budget_s)
        self.app, self.settings = app, settings
        self.hold_s = min(KICK_FLAG_TTL_S, settings.lane_lease_s)
        self._held: tuple[str, list[int]] | None = None
        self._held_at = 0.0

    def hold(self, group: str, lanes: Sequence[int]) -> None:
        pipe = self.flags.pipeline(transaction=False)
        for lane in lanes:
            pipe.set(lane_flag(group, lane), LINGERING, px=int(self.hold_s * 1000))
        pipe.execute()
        self._held, self._held_at = (group, list(lanes)), time.monotonic()

    def keep_waiting(self, idle_s: float) -> bool:
        if not super().keep_waiting(idle_s):
            return False
        if self._held is not None and time.monotonic() - self._held_at >= self.hold_s / 3:
            self.hold(*self._held)
        return True

    def let_go(self, group: str, lanes: Sequence[int]) -> None:
        self._held = None
        kick_started(self.flags, *(lane_flag(group, n) for n in lanes))
        self.free_place()

    def acks_written(self) -> None:
        kick_relay(self.app, self.settings)

    def gathers(self) -> bool:
        return self.placed

    def may_hand_off(self) -> bool:
        return not self.queued()

    def hand_off(self, group: str, lanes: Sequence[int]) -> None:
        kick_started(self.flags, *(lane_flag(group, n) for n in lanes))
        kick_lanes(self.app, self.settings, {(group, n) for n in lanes})


def kick_targeted(app: Celery, group: str, lane: int, worker: str) -> None:
    """Queue the lane's task on ``worker``'s own queue (Celery ``worker_direct``), so the
    targeted retry in that lane runs there."""
    app.send_task(tasknames.PROCESS_LANE, args=(group, [lane]), queue=worker_direct(worker))


def register(app: Celery, settings: Settings) -> None:
    """Register the lane tasks on ``app``."""
    # Re-kicks wait at most this long: a countdown must stay below the visibility timeout.
    longest_countdown_s = settings.celery_visibility_timeout_s / 2

    # A process stuck in a handler past every timeout is ended (and replaced by the pool);
    # its lanes' next holder counts each attempt before it runs (consumer.lanes).
    @app.task(
        name=tasknames.PROCESS_LANE,
        bind=True,
        shared=False,
        time_limit=settings.lane_time_limit_s,
    )
    def process_lane(
        self: Any, group: str, lanes: int | list[int], busy_s: float | None = None
    ) -> dict[str, Any]:
        """Run the handlers of the lanes' due inbox rows, each lane in order."""
        wanted = [lanes] if isinstance(lanes, int) else list(lanes)
        worker = self.request.hostname or socket.gethostname()
        flags = flags_for_this_process(app.conf.broker_url)
        lanes_started(flags, [lane_flag(group, n) for n in wanted])
        linger = LaneLinger(app, settings, worker) if settings.lane_linger_ms else None
        hostname = self.request.hostname
        stopping = stopping_for_this_process(flags, hostname) if hostname else None
        try:
            report = processor_for_this_process(settings, worker).run(
                group, wanted, linger=linger, stopping=stopping
            )
        finally:
            if linger is not None:
                linger.free_place()
        if report.acks:
            # Its acks are outbox rows: relayed now, not at beat's next tick.
            kick_relay(app, settings)
        countdown = rekick_countdown(report, longest_countdown_s)
        if countdown is not None:
            process_lane.apply_async((group, sorted(report.due_s)), countdown=countdown)
        if report.busy:
            # Their holder may be ending just as the rows this task was kicked for commit:
            # look again soon. The flags keep it to one such task per lane at a time.
            kick_lanes(app, settings, {(group, n) for n in report.busy}, busy_s=busy_wait(busy_s))
        return report.as_dict()

    @app.task(name=tasknames.SWEEP, bind=True, shared=False)
    def sweep(self: Any) -> int:
        """Kick every lane that has due rows (recovers tasks lost in Redis)."""
        worker = self.request.hostname or socket.gethostname()
        sessions = processor_for_this_process(settings, worker).sessions
        with sessions() as session:
            lanes = {
                (g, n)
                for g, n in session.execute(queries.LANES_WITH_DUE_ROWS, {"limit": SWEEP_LIMIT})
            }
        return kick_lanes(app, settings, lanes)
