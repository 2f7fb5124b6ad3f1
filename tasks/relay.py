"""``outbox.publish``: one relay pass. The Relay (and its producer) is made per process,
on first use in that process, so never before a prefork pool forks."""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

import redis
from celery import Celery
from celery.signals import worker_process_shutdown

from outbox import tasknames
from outbox.health import redis_client
from outbox.kick import FLAG, claim_kicks, kick_expires_s, kick_started
from outbox.relay import Relay
from outbox.settings import Settings
from tasks.linger import Lingering
from tasks.shutdown import stopping_for_this_process

_relay: tuple[int, Relay] | None = None
_flags: tuple[int, str, redis.Redis] | None = None


def relay_for_this_process(settings: Settings) -> Relay:
    """This process's relay, made on first use after fork."""
    global _relay
    if _relay is None or _relay[0] != os.getpid():
        _relay = (os.getpid(), Relay(settings))
    return _relay[1]


def flags_for_this_process(url: str) -> redis.Redis:
    """This process's Redis client for the kick flag."""
    global _flags
    if _flags is None or _flags[:2] != (os.getpid(), url):
        _flags = (os.getpid(), url, redis_client(url))
    return _flags[2]


def kick_relay(app: Celery, settings: Settings) -> bool:
    """Queue a relay pass unless one is pending, as the API does after a commit (the same
    flag: a lingering relay task holds it and sees the rows itself). For rows a task
    commits, which would otherwise wait for beat's tick. Returns whether it queued one."""
    expires_s = kick_expires_s(settings)
    flags = flags_for_this_process(app.conf.broker_url)
    if not claim_kicks(flags, int(expires_s * 1000), [FLAG])[0]:
        return False
    app.send_task(tasknames.PUBLISH, expires=expires_s)
    return True


@worker_process_shutdown.connect
def _flush(**_: Any) -> None:
    if _relay is not None and _relay[0] == os.getpid():
        _relay[1].close()


# The lingering relay task's token: one relay task at a time lingers.
LINGERER = "outbox:relay:lingering"
# Set while the lingering task works through a backlog: kicked tasks share it then.
BACKLOG = "outbox:relay:lingering:backlog"

# Take or renew the lingerer's place and the kick flag with it, out of a backlog (this
# task sees every commit alone): 0 when another task has it.
_HOLD = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
redis.call('DEL', KEYS[3])
return 1
"""
# Give the place back and let commits kick again, unless another task lingers now (its
# own let-go clears the flag).
_LET_GO = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return 1
"""
# A backlog: keep the place, let commits kick tasks that share it (no flag held).
_BACKLOG = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[3], '1', 'PX', ARGV[2])
redis.call('DEL', KEYS[2])
return 1
"""


# The keys every script above takes, in this order.
_KEYS = [LINGERER, FLAG, BACKLOG]


def another_lingers(flags: redis.Redis) -> bool:
    """Whether a relay task lingers and sees every commit: a kicked task ends at once
    then. Under a backlog the lingering task lets kicks through, and they help it."""
    lingering, backlog = flags.mget([LINGERER, BACKLOG])  # one round trip
    return lingering is not None and backlog is None


class RelayLinger(Lingering):
    """A relay task's wait for new rows (:class:`outbox.relay.Linger`): it holds the kick
    flag meanwhile, renewed well within its life, so commits queue no relay task, for up
    to ``OUTBOX_RELAY_LINGER_MS`` without rows. One relay task lingers at a time: a task
    that finds another one lingering ends after its own rows (two lingering tasks, never
    idle under steady traffic, would keep every other task out of a small pool). While
    its claims find a backlog it lets the kick flag go, so that commits kick tasks that
    share the buckets with it, as relay tasks that do not linger do."""

    HOLD_MS = 2000

    def __init__(self, app: Celery, settings: Settings, worker: str | None) -> None:
        flags = flags_for_this_process(app.conf.broker_url)
        super().__init__(
            app, flags, settings.relay_linger_ms / 1000, worker, settings.relay_drain_s
        )
        self._token = uuid.uuid4().hex
        self._hold = flags.register_script(_HOLD)
        self._let_go = flags.register_script(_LET_GO)
        self._backlog = flags.register_script(_BACKLOG)
        self._holding = False
        self._held_at = 0.0
        self._in_backlog = False

    def hold(self) -> bool:
        if not self.take_place():
            # No lingering place in this worker: send what there is and end.
            self._holding = False
            return False
        self._holding = bool(self._hold(keys=_KEYS, args=[self._token, self.HOLD_MS]))
        self._held_at = time.monotonic()
        self._in_backlog = False
        return self._holding

    def keep_waiting(self, idle_s: float) -> bool:
        if not self._holding or not super().keep_waiting(idle_s):
            return False
        if time.monotonic() - self._held_at >= self.HOLD_MS / 3000:
            self.hold()  # a stall past the hold lets another task in: then this one ends
        return self._holding

    def let_go(self) -> None:
        self._let_go(keys=_KEYS, args=[self._token])
        self._holding = self._in_backlog = False
        self.free_place()

    def backlog(self, found: bool) -> None:
        renew = time.monotonic() - self._held_at >= self.HOLD_MS / 3000
        if found and (not self._in_backlog or renew):
            self._holding = bool(self._backlog(keys=_KEYS, args=[self._token, self.HOLD_MS]))
            self._in_backlog, self._held_at = self._holding, time.monotonic()
        elif not found and self._in_backlog:
            self.hold()  # commits kick nothing again: this task sees them


def register(app: Celery, settings: Settings) -> None:
    """Register ``outbox.publish`` on ``app``."""

    @app.task(name=tasknames.PUBLISH, bind=True, shared=False)
    def publish(self: Any, tick: bool = False) -> dict[str, Any]:
        """Relay committed outbox rows to Kafka until none is left or the drain time ends."""
        flags = flags_for_this_process(app.conf.broker_url)
        if tick and flags.exists(FLAG):
            # Beat's safety net is not needed now: a kicked pass is queued, or one is on.
            return {"skipped": "a relay pass is queued or running"}
        relay = relay_for_this_process(settings)
        # Before claiming: a commit from now on queues a new kick (see outbox.kick).
        kick_started(flags)
        if settings.relay_linger_ms and another_lingers(flags):
            # A lingering task sees every row committed before it lets go; a commit after
            # that kicks again.
            return {"skipped": "another relay task is lingering"}
        worker = self.request.hostname
        linger = RelayLinger(app, settings, worker) if settings.relay_linger_ms else None
        stopping = stopping_for_this_process(flags, worker) if worker else None
        try:
            return relay.run(linger=linger, stopping=stopping).as_dict()
        finally:
            if linger is not None:
                linger.free_place()
