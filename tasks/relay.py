"""``outbox.publish``: one relay pass. The Relay (and its producer) is made per process,
on first use in that process, so never before a prefork pool forks."""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery
from celery.signals import worker_process_shutdown

from outbox import tasknames
from outbox.health import redis_client
from outbox.kick import FLAG, kick_started
from outbox.relay import Relay
from outbox.settings import Settings
from tasks.linger import Lingering

_relay: tuple[int, Relay] | None = None
_flags: tuple[int, redis.Redis] | None = None


def relay_for_this_process(settings: Settings) -> Relay:
    """This process's relay, made on first use after fork."""
    global _relay
    if _relay is None or _relay[0] != os.getpid():
        _relay = (os.getpid(), Relay(settings))
    return _relay[1]


def flags_for_this_process(url: str) -> redis.Redis:
    """This process's Redis client for the kick flag."""
    global _flags
    if _flags is None or _flags[0] != os.getpid():
        _flags = (os.getpid(), redis_client(url))
    return _flags[1]


@worker_process_shutdown.connect
def _flush(**_: Any) -> None:
    if _relay is not None and _relay[0] == os.getpid():
        _relay[1].close()


class RelayLinger(Lingering):
    """A relay task's wait for new rows (:class:`outbox.relay.Linger`): it holds the kick
    flag meanwhile, renewed well within its life, so commits queue no relay task, for up
    to ``OUTBOX_RELAY_LINGER_MS`` without rows."""

    HOLD_MS = 2000

    def __init__(self, app: Celery, settings: Settings, worker: str | None) -> None:
        flags = flags_for_this_process(app.conf.broker_url)
        super().__init__(app, flags, settings.relay_linger_ms / 1000, worker)
        self._held_at = 0.0

    def hold(self) -> None:
        self.flags.set(FLAG, b"1", px=self.HOLD_MS)
        self._held_at = time.monotonic()

    def keep_waiting(self, idle_s: float) -> bool:
        if not super().keep_waiting(idle_s):
            return False
        if time.monotonic() - self._held_at >= self.HOLD_MS / 3000:
            self.hold()
        return True

    def let_go(self) -> None:
        kick_started(self.flags)


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
        worker = self.request.hostname
        linger = RelayLinger(app, settings, worker) if settings.relay_linger_ms else None
        return relay.run(linger=linger).as_dict()
