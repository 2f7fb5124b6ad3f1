"""The names of the system's Celery tasks, and the periodic ones beat runs: one place,
read by the Celery configuration, the tasks themselves and the API's run-now endpoint."""

from __future__ import annotations

from typing import NamedTuple

PUBLISH = "outbox.publish"
RETRY_TARGETED = "outbox.retry_targeted"
HEARTBEAT = "outbox.heartbeat"
CLEANUP = "outbox.cleanup"
SWEEP = "consumer.sweep"
PROCESS_LANE = "consumer.process_lane"


class BeatTask(NamedTuple):
    """A task beat runs every ``interval_setting`` seconds (a settings attribute)."""

    task: str
    interval_setting: str


# By the short name ``POST /v1/tasks/<name>/run`` takes.
BEAT_TASKS = {
    "publish": BeatTask(PUBLISH, "publish_interval_s"),
    "retry_targeted": BeatTask(RETRY_TARGETED, "retry_interval_s"),
    "heartbeat": BeatTask(HEARTBEAT, "heartbeat_interval_s"),
    "cleanup": BeatTask(CLEANUP, "cleanup_interval_s"),
    "sweep": BeatTask(SWEEP, "lane_sweep_interval_s"),
}
