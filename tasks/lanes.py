"""``consumer.process_lane`` and the beat sweep ``consumer.sweep``.

A lane task is a "go" signal carrying only (group, lane): the inbox rows are the
state. A task lost in Redis delays its lane until the next sweep, never more.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from celery import Celery

from consumer.lanes import LaneProcessor
from outbox import queries
from outbox.db import make_engine, make_sessionmaker
from outbox.kick import claim_kicks, kick_started, lane_flag
from outbox.settings import Settings
from tasks.relay import flags_for_this_process

SWEEP_LIMIT = 10_000
IDLE_RETRY_S = 1.0
# A pending kick's flag lapses after this, so a kick lost with its worker holds back its
# lane only until the next sweep after it; a kick queued longer than this may be doubled.
KICK_FLAG_TTL_S = 30.0

_processor: tuple[int, LaneProcessor] | None = None


def processor_for_this_process(settings: Settings, worker: str) -> LaneProcessor:
    """This process's lane processor, made on first use after fork."""
    global _processor
    if _processor is None or _processor[0] != os.getpid():
        sessions = make_sessionmaker(make_engine(settings, pool_size=2))
        _processor = (os.getpid(), LaneProcessor(settings, sessions, worker))
    return _processor[1]


def kick_lanes(app: Celery, settings: Settings, lanes: set[tuple[str, int]]) -> int:
    """Queue ``consumer.process_lane`` for each lane with no kick pending; return how many."""
    if not lanes:
        return 0
    ordered = sorted(lanes)
    flags = flags_for_this_process(app.conf.broker_url)
    claimed = claim_kicks(flags, int(KICK_FLAG_TTL_S * 1000), [lane_flag(g, n) for g, n in ordered])
    sent = 0
    for (group, lane), claim in zip(ordered, claimed, strict=True):
        if claim:
            # No expiry: the flag keeps at most one kick per lane queued, and an expired
            # kick would leave its rows waiting for the sweep.
            app.send_task("consumer.process_lane", args=(group, lane))
            sent += 1
    return sent


def register(app: Celery, settings: Settings) -> None:
    """Register the lane tasks on ``app``."""
    # Re-kicks wait at most this long: a countdown must stay below the visibility timeout.
    longest_countdown_s = settings.celery_visibility_timeout_s / 2

    @app.task(name="consumer.process_lane", bind=True, shared=False)
    def process_lane(self: Any, group: str, lane: int) -> dict[str, Any]:
        """Run the handlers of one lane's due inbox rows, in order."""
        worker = self.request.hostname or socket.gethostname()
        kick_started(flags_for_this_process(app.conf.broker_url), lane_flag(group, lane))
        report = processor_for_this_process(settings, worker).run(group, lane)
        if report.leased and report.next_due_s is not None:
            # Rows wait for a backoff (or the budget ended): come back when they are due.
            countdown = report.next_due_s
            if not report.done + report.failed + report.dead:
                # Due rows that could not be had (locked elsewhere): no busy loop.
                countdown = max(countdown, IDLE_RETRY_S)
            process_lane.apply_async((group, lane), countdown=min(countdown, longest_countdown_s))
        return report.as_dict()

    @app.task(name="consumer.sweep", bind=True, shared=False)
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
