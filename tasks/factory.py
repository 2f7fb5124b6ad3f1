"""``make_celery(settings)``: the Celery app with our configuration and tasks."""

from __future__ import annotations

import sys
from typing import Any

from celery import Celery, current_task
from celery.signals import beat_init, worker_process_init, worker_ready
from celery.signals import setup_logging as setup_logging_signal

import celeryconfig
from consumer.handlers import import_handler_modules
from outbox.heap import freeze_startup_objects
from outbox.logs import set_task_context, setup_logging
from outbox.settings import Settings
from tasks.single_beat import hold_beat_lock


def celery_role(argv: list[str]) -> str:
    """The Celery sub-command this process runs (worker, beat, flower), for log lines."""
    return next((a for a in argv[1:] if a in ("worker", "beat", "flower")), "celery")


def _running_task() -> tuple[str | None, str | None]:
    """The id and name of the task this process runs now (``celery.current_task``)."""
    task_id = getattr(getattr(current_task, "request", None), "id", None)
    return task_id, (getattr(current_task, "name", None) if task_id else None)


set_task_context(_running_task)


# Each process of a worker, once it is set up (outbox.heap): the pool's processes as they
# start, the main process once it takes tasks. Connected once, whatever the apps made.
@worker_process_init.connect(weak=False)
def freeze_pool_process(**_: Any) -> None:
    """Freeze a pool process's start-up objects (:mod:`outbox.heap`) as it starts."""
    freeze_startup_objects()


@worker_ready.connect(weak=False)
def freeze_worker(**_: Any) -> None:
    """Freeze a worker's main process's start-up objects once it takes tasks."""
    freeze_startup_objects()


def make_celery(settings: Settings) -> Celery:
    """A Celery app configured from ``settings``, with every task registered."""
    app = Celery("outbox")
    app.conf.update(celeryconfig.from_settings(settings))
    app.conf.outbox_settings = settings

    @setup_logging_signal.connect(weak=False)
    def _logging(**_: Any) -> None:
        setup_logging(settings, celery_role(sys.argv))

    @beat_init.connect(weak=False)
    def _one_beat(**_: Any) -> None:
        hold_beat_lock(settings)  # its watcher thread keeps the connection, and the lock
        freeze_startup_objects()  # beat is set up (outbox.heap)

    from tasks import beat, lanes, relay, shutdown

    shutdown.register(app)
    relay.register(app, settings)
    lanes.register(app, settings)
    beat.register(app, settings)
    import_handler_modules(settings.handler_modules)
    return app
