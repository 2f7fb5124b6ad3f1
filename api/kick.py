"""After a publish commits, ask a worker to relay now rather than at the next beat tick.

Kicks are coalesced twice: a background thread looks at most once per
``kick_debounce_ms``, and sends ``outbox.publish`` only when no kick is pending
(``outbox.kick``), so a burst of commits queues one task, not thousands.
"""

from __future__ import annotations

import logging
import threading
import time

from celery import Celery

import celeryconfig
from outbox import tasknames
from outbox.health import CHECK_TIMEOUT_S
from outbox.kick import KickClaimer, kick_expires_s
from outbox.settings import Settings

log = logging.getLogger(__name__)


class Kicker:
    """Sends debounced ``outbox.publish`` tasks from a daemon thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._wanted = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._app: Celery | None = None

    def kick(self) -> None:
        """Note that rows were committed; returns at once."""
        if self._wanted.is_set():
            return  # the next look is already due and will cover this commit
        self._wanted.set()
        if self._thread is None or not self._thread.is_alive():
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(
                        target=self._run, name="outbox-kick", daemon=True
                    )
                    self._thread.start()

    def _run(self) -> None:
        app = Celery("outbox-kick")
        app.conf.update(celeryconfig.from_settings(self.settings))
        flags = KickClaimer(app.conf.broker_url, CHECK_TIMEOUT_S)
        debounce_s = self.settings.kick_debounce_ms / 1000
        expires_s = kick_expires_s(self.settings)
        while True:
            self._wanted.wait()
            self._wanted.clear()
            try:
                if flags.claim(int(expires_s * 1000)):
                    app.send_task(tasknames.PUBLISH, expires=expires_s, ignore_result=True)
            except Exception:
                log.exception("could not kick the relay; beat will pick the rows up")
            if debounce_s:
                # Commits meanwhile gather behind one look.
                time.sleep(debounce_s)
