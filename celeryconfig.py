"""Celery settings, made from the ``OUTBOX_*`` settings object.

Correctness does not depend on Redis keeping anything: tasks carry ids or a
bare "go", acks are late and a task whose worker dies is redelivered, and beat
sweeps the tables for whatever a lost task would have done.
"""

from __future__ import annotations

import os
from typing import Any

from outbox import tasknames
from outbox.agents import instance_id
from outbox.errors import SettingsError
from outbox.settings import Settings, env_name
from outbox.tasknames import BEAT_TASKS


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Every periodic task; each tick expires after one interval so a backlog never piles up."""
    schedule: dict[str, dict[str, Any]] = {}
    for task, setting in BEAT_TASKS.values():
        interval = getattr(settings, setting)
        schedule[task] = {"task": task, "schedule": interval, "options": {"expires": interval}}
    # A relay tick finds the relay busy when a kick is pending or a pass is on: it ends.
    schedule[tasknames.PUBLISH]["kwargs"] = {"tick": True}
    # Each heartbeat tick names the beat that sent it: beat shows among the agents.
    schedule[tasknames.HEARTBEAT]["kwargs"] = {"beat": instance_id("beat")}
    return schedule


def worker_concurrency(settings: Settings) -> int:
    """Pool processes per worker: ``OUTBOX_WORKER_CONCURRENCY``, else one per CPU, and one
    more when tasks linger (at least three then). A worker lingers in one place fewer than
    its processes, so this leaves a place for a relay task and one for a lane task, and a
    process for every other task; a lingering task mostly waits, so the extra process
    costs the cores little."""
    if settings.worker_concurrency:
        return settings.worker_concurrency
    cpus = os.cpu_count() or 1
    if settings.relay_linger_ms or settings.lane_linger_ms:
        return max(cpus, 2) + 1
    return cpus


def from_settings(settings: Settings) -> dict[str, Any]:
    """The Celery configuration for ``settings``."""
    if settings.redis_url is None:
        raise SettingsError(
            f"{env_name('redis_url')} is not set: run `outbox dev` or point it at Redis"
        )
    return {
        "broker_url": settings.redis_url,
        "broker_connection_retry_on_startup": True,
        # Countdowns must stay below this, or Redis redelivers the task early.
        "broker_transport_options": {"visibility_timeout": settings.celery_visibility_timeout_s},
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": worker_concurrency(settings),
        "worker_send_task_events": settings.task_events,
        "task_send_sent_event": settings.task_events,
        "worker_direct": True,
        "worker_hijack_root_logger": False,
        "timezone": "UTC",
        "enable_utc": True,
        "beat_schedule": beat_schedule(settings),
    }
