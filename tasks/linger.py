"""What a relay or lane task needs to stay on while its work runs dry: the kick flags it
holds meanwhile, and whether other tasks wait for its pool process.

Staying on saves the round trip of ending and being queued again for the next commit (a
task with nothing to do costs a few milliseconds of a worker); waiting in a pool process
is fair only while nothing else wants it, so a task stops at once when another one is
queued, and after ``linger_s`` without new work in any case.
"""

from __future__ import annotations

import time

import redis
from celery import Celery
from celery.utils.nodenames import worker_direct


class Lingering:
    """The common part: how long to stay without work, and the queue check."""

    QUEUE_CHECK_S = 0.05
    # Idle this long before queued tasks are looked for: a loop under steady traffic is
    # idle only for moments between batches, and yielding then would only trade places
    # with the next kick of its own kind.
    QUEUE_IDLE_S = 0.025

    def __init__(
        self, app: Celery, flags: redis.Redis, linger_s: float, worker: str | None
    ) -> None:
        self.flags = flags
        # The shared queue, and the worker's own (where targeted retries are sent).
        self.queues = [app.conf.task_default_queue or "celery"]
        if worker:
            self.queues.append(worker_direct(worker).name)
        self.linger_s = linger_s
        self._checked = 0.0

    def keep_waiting(self, idle_s: float) -> bool:
        """False after ``linger_s`` without work, or once another task is queued while
        this one has been idle for a moment."""
        if idle_s >= self.linger_s:
            return False
        now = time.monotonic()
        if idle_s >= self.QUEUE_IDLE_S and now - self._checked >= self.QUEUE_CHECK_S:
            self._checked = now
            if self.queued():
                return False
        return True

    def queued(self) -> bool:
        """Whether a task waits in the shared queue or the worker's own."""
        pipe = self.flags.pipeline(transaction=False)
        for queue in self.queues:
            pipe.llen(queue)
        return any(pipe.execute())
