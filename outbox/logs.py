"""One logging setup for every process: each line names the process role."""

from __future__ import annotations

import logging
import sys

from outbox.settings import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)-7s {role} %(name)s: %(message)s"


def setup_logging(settings: Settings, role: str) -> None:
    """Send the root logger to stderr at the configured level, tagged with ``role``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(TEXT_FORMAT.format(role=role)))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    # librdkafka's own logger and the HTTP access log are chatty at INFO.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
