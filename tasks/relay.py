"""``outbox.publish``: one relay pass. The Relay (and its producer) is made per process,
on first use in that process, so never before a prefork pool forks."""

from __future__ import annotations

import os
from typing import Any

import redis
from celery import Celery
from celery.signals import worker_process_shutdown

from outbox import tasknames
from outbox.health import redis_client
from outbox.kick import kick_started
from outbox.relay import Relay
from outbox.settings import Settings

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


def register(app: Celery, settings: Settings) -> None:
    """Register ``outbox.publish`` on ``app``."""

    @app.task(name=tasknames.PUBLISH, shared=False)
    def publish() -> dict[str, Any]:
        """Relay committed outbox rows to Kafka until none is left or the drain time ends."""
        relay = relay_for_this_process(settings)
        # Before claiming: a commit from now on queues a new kick (see outbox.kick).
        kick_started(flags_for_this_process(app.conf.broker_url))
        return relay.run().as_dict()
