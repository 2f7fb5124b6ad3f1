"""Periodic tasks whose work arrives with the operations features (retry, heartbeat, cleanup)."""

from __future__ import annotations

import logging

from celery import Celery

log = logging.getLogger(__name__)


def register(app: Celery) -> None:
    """Register the beat tasks on ``app``."""

    @app.task(name="outbox.retry_targeted", shared=False)
    def retry_targeted() -> None:
        """Re-send what a consumer group failed or never acknowledged."""
        log.info("outbox.retry_targeted: targeted retry is not installed yet; nothing to do")

    @app.task(name="outbox.heartbeat", shared=False)
    def heartbeat() -> None:
        """Record worker agents and a health snapshot."""
        log.info("outbox.heartbeat: heartbeats are not installed yet; nothing to do")

    @app.task(name="outbox.cleanup", shared=False)
    def cleanup() -> None:
        """Delete finished rows past their retention."""
        log.info("outbox.cleanup: cleanup is not installed yet; nothing to do")
