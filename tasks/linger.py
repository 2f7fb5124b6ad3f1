"""What a relay or lane task needs to stay on while its work runs dry: the kick flags it
holds meanwhile, a lingering place in its worker, and whether other tasks wait for its
pool process.

Staying on saves the round trip of ending and being queued again for the next commit (a
task with nothing to do costs a few milliseconds of a worker), and the wait for a free
pool process that the next task would have. A task stops after ``linger_s`` without new
work, and lingers only in one of its worker's places, one fewer than its pool processes:
one process is always left for every other task (kicks of the other kind, the
heartbeat, beat's ticks), which would otherwise wait behind lingering tasks until their
budgets end. A worker with one pool process has no place: its tasks never linger.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from typing import Any

import redis
from celery import Celery
from celery.signals import celeryd_after_setup
from celery.utils.nodenames import worker_direct

from outbox.health import redis_client

# This worker's pool processes, learnt in its main process before the pool forks (None
# outside a worker, where nothing limits lingering).
_pool_size: int | None = None


@celeryd_after_setup.connect(weak=False)
def _pool_known(sender: str, instance: Any, **_: Any) -> None:
    global _pool_size
    _pool_size = int(instance.concurrency)
    held = places(sender)
    if held:
        # A worker of the same name that was killed may have left its places taken.
        client = redis_client(instance.app.conf.broker_url)
        with contextlib.suppress(redis.RedisError):
            client.delete(*held)
        client.close()


def places(worker: str | None) -> list[str]:
    """The keys of ``worker``'s lingering places (an empty list: it may not linger); one
    key, not limiting, outside a worker."""
    if _pool_size is None or worker is None:
        return [f"outbox:lingering:{uuid.uuid4().hex}"]
    return [f"outbox:worker:{worker}:lingering:{n}" for n in range(_pool_size - 1)]


# Take a free place, or keep the one held (renewing it): 1, or 0 when every place is held.
_TAKE_PLACE = """
for _, key in ipairs(KEYS) do
    if redis.call('GET', key) == ARGV[1] then
        redis.call('PEXPIRE', key, ARGV[2])
        return 1
    end
end
for _, key in ipairs(KEYS) do
    if redis.call('SET', key, ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
end
return 0
"""
# Give back the place held, if any.
_FREE_PLACE = """
for _, key in ipairs(KEYS) do
    if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key) end
end
return 0
"""


class Lingering:
    """The common part: how long to stay without work, the lingering place, and the
    queue check."""

    QUEUE_CHECK_S = 0.05
    RENEW_PLACE_S = 1.0
    # Idle this long before queued tasks are looked for: a loop under steady traffic is
    # idle only for moments between batches, and yielding then would only trade places
    # with the next kick of its own kind.
    QUEUE_IDLE_S = 0.025

    def __init__(
        self,
        app: Celery,
        flags: redis.Redis,
        linger_s: float,
        worker: str | None,
        budget_s: float,
    ) -> None:
        self.flags = flags
        # The shared queue, and the worker's own (where targeted retries are sent).
        self.queues = [app.conf.task_default_queue or "celery"]
        if worker:
            self.queues.append(worker_direct(worker).name)
        self.linger_s = linger_s
        self._checked = 0.0
        self._places = places(worker)
        self._token = uuid.uuid4().hex
        self._take_place = flags.register_script(_TAKE_PLACE)
        self._free_place = flags.register_script(_FREE_PLACE)
        self._placed_at: float | None = None
        # A place is renewed while its task waits, and lapses twice the task's budget
        # after that: never under a living task (which renews it as it waits, and ends
        # with its budget), and soon enough after one that died.
        self._place_ms = int(2000 * budget_s)

    def keep_waiting(self, idle_s: float) -> bool:
        """False after ``linger_s`` without work, or when the worker has no lingering place
        free; outside a worker (no places known), also once another task is queued while
        this one has been idle for a moment."""
        if idle_s >= self.linger_s or not self.take_place():
            return False
        if _pool_size is not None:
            # A pool process is left for what queues meanwhile: no need to give way.
            return True
        now = time.monotonic()
        if idle_s >= self.QUEUE_IDLE_S and now - self._checked >= self.QUEUE_CHECK_S:
            self._checked = now
            if self.queued():
                return False
        return True

    def take_place(self) -> bool:
        """Take one of the worker's lingering places, or renew the one held (at most every
        :data:`RENEW_PLACE_S`); False when none is free."""
        now = time.monotonic()
        if self._placed_at is not None and now - self._placed_at < self.RENEW_PLACE_S:
            return True
        self._placed_at = None
        if self._places and self._take_place(keys=self._places, args=[self._token, self._place_ms]):
            self._placed_at = now
        return self._placed_at is not None

    @property
    def placed(self) -> bool:
        """Whether this task holds one of its worker's lingering places."""
        return self._placed_at is not None and _pool_size is not None

    def free_place(self) -> None:
        """Give the lingering place back (when the task ends)."""
        if self._placed_at is not None:
            self._placed_at = None
            self._free_place(keys=self._places, args=[self._token])

    def queued(self) -> bool:
        """Whether a task waits in the shared queue or the worker's own."""
        pipe = self.flags.pipeline(transaction=False)
        for queue in self.queues:
            pipe.llen(queue)
        return any(pipe.execute())
