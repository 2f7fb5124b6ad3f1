"""gunicorn's own log lines (start-up, worker boot and exit, access log) in the format
of every other process: ``gunicorn --logger-class api.gunicorn_logging.Logger``."""

from __future__ import annotations

from typing import Any

from gunicorn import glogging

from outbox.logs import setup_logging
from outbox.settings import Settings


class Logger(glogging.Logger):
    """gunicorn's logger, writing through the root logger set up like every process's."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        setup_logging(Settings.from_env(), "api")
        for log in (self.error_log, self.access_log):
            log.handlers.clear()
            log.propagate = True
