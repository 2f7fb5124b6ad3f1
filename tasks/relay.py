"""``outbox.publish``: one relay pass. The Relay (and its producer) is made per process,
on first use in that process, so never before a prefork pool forks."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.signals import worker_process_shutdown

from outbox.relay import Relay
from outbox.settings import Settings

_relay: tuple[int, Relay] | None = None


def relay_for_this_process(settings: Settings) -> Relay:
    """This process's relay, made on first use after fork."""
    global _relay
    if _relay is None or _relay[0] != os.getpid():
        _relay = (os.getpid(), Relay(settings))
    return _relay[1]


@worker_process_shutdown.connect
def _flush(**_: Any) -> None:
    if _relay is not None and _relay[0] == os.getpid():
        _relay[1].close()


def register(app: Celery, settings: Settings) -> None:
    """Register ``outbox.publish`` on ``app``."""

    @app.task(name="outbox.publish", shared=False)
    def publish() -> dict[str, Any]:
        """Relay committed outbox rows to Kafka until none is left or the drain time ends."""
        return relay_for_this_process(settings).run().as_dict()
