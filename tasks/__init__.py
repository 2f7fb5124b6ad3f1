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
        from outbox.errors import SettingsError
        from outbox.logs import setup_logging
        from outbox.settings import Settings, env_name
        from tasks.factory import celery_role

        settings = Settings.from_env()
        if celery_role(sys.argv) == "flower" and not settings.flower_password:
            # Flower shows every task's arguments and can revoke tasks: never open.
            raise SettingsError(
                f"{env_name('flower_password')} is not set: Flower does not start without "
                "a password"
            )
        # The Celery command's own process: log in our format from the start, before
        # Celery's checks warn (its setup_logging signal comes later).
        setup_logging(settings, celery_role(sys.argv))
        app = make_celery(settings)
        globals()["app"] = app
        return app
    raise AttributeError(name)
