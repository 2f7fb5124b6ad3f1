"""Periodic tasks of operations: targeted retry, heartbeat and cleanup."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.signals import worker_ready
from sqlalchemy.orm import Session, sessionmaker

from outbox import queries, tasknames
from outbox.cleanup import cleanup as delete_finished
from outbox.db import make_engine, make_sessionmaker
from outbox.heartbeat import record_heartbeat
from outbox.metrics import MetricsRecorder
from outbox.settings import Settings
from outbox.targeted_retry import retry_due
from tasks.relay import kick_relay

_sessions: tuple[int, sessionmaker[Session]] | None = None
# Workers that answered a heartbeat within this many intervals are waited for.
RECENT_HEARTBEATS = 3
# A new worker's own heartbeat is dropped if no pool process took it up by then (a
# regular tick then finds the worker only if its answer comes before the others' end).
JOIN_EXPIRES_S = 60.0


def sessions_for_this_process(settings: Settings) -> sessionmaker[Session]:
    """This process's sessions for the beat tasks, made on first use after fork."""
    global _sessions
    if _sessions is None or _sessions[0] != os.getpid():
        _sessions = (os.getpid(), make_sessionmaker(make_engine(settings, pool_size=1)))
    return _sessions[1]


def register(app: Celery, settings: Settings) -> None:
    """Register the beat tasks on ``app``."""
    metrics = MetricsRecorder(settings)  # its Redis client is made on first use, after fork

    @app.task(name=tasknames.RETRY_TARGETED, shared=False)
    def retry_targeted() -> dict[str, Any]:
        """Re-send what a consumer group failed or never acknowledged, aimed at that group
        and a healthy worker; past the group's retries the delivery is dead."""
        report = retry_due(settings, sessions_for_this_process(settings), metrics)
        if report.retried:
            # Relay the retries now rather than at the next tick.
            kick_relay(app, settings)
        return report.as_dict()

    @app.task(name=tasknames.HEARTBEAT, shared=False)
    def heartbeat(beat: str | None = None, joining: bool = False) -> dict[str, Any]:
        """Record the workers that answer over the broker (and the beat that sent this
        tick) as agents, mark the silent inactive, and store a health snapshot.

        It waits for answers in a pool process, which meanwhile runs no relay or lane
        task: it stops waiting once as many workers answered as answered lately, and
        waits the whole ``OUTBOX_HEARTBEAT_INSPECT_TIMEOUT_S`` only when a worker has
        just started (``joining``: the worker asks for this heartbeat itself, which
        hears every worker, so that workers starting together are all found), when one
        is gone, or when none answered lately."""
        sessions = sessions_for_this_process(settings)
        with sessions() as session:
            window = RECENT_HEARTBEATS * settings.heartbeat_interval_s
            answered = len(session.scalars(queries.HEALTHY_WORKERS, {"window": window}).all())
        limit = None if joining or not answered else answered
        stats = app.control.inspect(
            timeout=settings.heartbeat_inspect_timeout_s, limit=limit
        ).stats()
        report = record_heartbeat(settings, sessions, stats or {}, beat=beat).as_dict()
        return {**report, "joining": joining}

    @worker_ready.connect(weak=False)
    def _joined(**_: Any) -> None:
        # A new worker is found now, by a heartbeat that waits for every answer.
        app.send_task(tasknames.HEARTBEAT, kwargs={"joining": True}, expires=JOIN_EXPIRES_S)

    @app.task(name=tasknames.CLEANUP, shared=False)
    def cleanup() -> dict[str, Any]:
        """Delete finished rows past their retention, in bounded batches."""
        return delete_finished(settings, sessions_for_this_process(settings)).as_dict()
