"""The Celery app: ``celery -A tasks worker``, ``celery -A tasks beat``, ``celery -A tasks flower``.

``tasks.app`` is built from the ``OUTBOX_*`` variables on first access, so
importing the package (tests, tools) needs no configuration.
"""

from __future__ import annotations

import sys
from typing import Any

from tasks.factory import make_celery

__all__ = ["app", "make_celery"]


def __getattr__(name: str) -> Any:
    if name == "app":
        from outbox.logs import setup_logging
        from outbox.settings import Settings
        from tasks.factory import celery_role

        settings = Settings.from_env()
        # The Celery command's own process: log in our format from the start, before
        # Celery's checks warn (its setup_logging signal comes later).
        setup_logging(settings, celery_role(sys.argv))
        app = make_celery(settings)
        globals()["app"] = app
        return app
    raise AttributeError(name)
