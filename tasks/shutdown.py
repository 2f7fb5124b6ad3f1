"""Telling a worker's running relay and lane tasks that it is shutting down.

A warm shutdown (SIGTERM to the worker's main process, as ``docker stop`` sends it)
waits for the running tasks, and Celery does not tell its pool processes. Under steady
traffic a relay or lane task works until its budget ends (10 s by default), long enough
for a stop's grace to end in SIGKILL, after which its leases hold its buckets or lanes
until they lapse. So the main process sets a key in Redis as its shutdown begins, and
the tasks look at it between batches (:class:`outbox.budget.Budget`) and end early,
giving back what they hold.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import redis
from celery import Celery
from celery.signals import worker_init, worker_shutting_down

from outbox.health import redis_client

# A key that outlives its worker (killed before it could start again) lapses after this.
KEY_TTL_S = 300
CHECK_S = 0.1


def stopping_key(worker: str) -> str:
    """The key that says worker ``worker`` (its node name) is shutting down."""
    return f"outbox:worker:{worker}:stopping"


class Stopping:
    """In a pool process: whether its worker is shutting down, looked up in Redis at most
    every :data:`CHECK_S`."""

    def __init__(self, flags: redis.Redis, worker: str) -> None:
        self.flags = flags
        self.key = stopping_key(worker)
        self._checked = 0.0
        self._stopping = False

    def __call__(self) -> bool:
        now = time.monotonic()
        if not self._stopping and now - self._checked >= CHECK_S:
            self._checked = now
            with contextlib.suppress(redis.RedisError):  # unknown: go on; leases still hold
                self._stopping = bool(self.flags.exists(self.key))
        return self._stopping


_per_process: tuple[int, dict[str, Stopping]] | None = None


def stopping_for_this_process(flags: redis.Redis, worker: str) -> Stopping:
    """This pool process's :class:`Stopping` for ``worker``, kept from task to task: it
    looks the key up at most every :data:`CHECK_S` across the tasks the process runs, not
    at the start of each one (a round trip per task otherwise)."""
    global _per_process
    if _per_process is None or _per_process[0] != os.getpid():
        _per_process = (os.getpid(), {})
    kept = _per_process[1]
    if worker not in kept:
        kept[worker] = Stopping(flags, worker)
    return kept[worker]


def register(app: Celery) -> None:
    """Set the key when this app's worker begins to shut down; clear it as one starts."""

    def client() -> redis.Redis:
        return redis_client(app.conf.broker_url)

    @worker_init.connect(weak=False)
    def _starting(sender: Any, **_: Any) -> None:
        # A worker of the same name stopped before: its key must not stop this one's tasks.
        with contextlib.suppress(redis.RedisError):
            client().delete(stopping_key(sender.hostname))

    @worker_shutting_down.connect(weak=False)
    def _stopping(sender: str, **_: Any) -> None:  # the worker's node name
        with contextlib.suppress(redis.RedisError):  # then its tasks end with their budget
            client().set(stopping_key(sender), b"1", ex=KEY_TTL_S)
