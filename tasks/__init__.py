"""The Celery app: ``celery -A tasks worker``, ``celery -A tasks beat``, ``celery -A tasks flower``.

``tasks.app`` is built from the ``OUTBOX_*`` variables on first access, so
importing the package (tests, tools) needs no configuration.
"""

from __future__ import annotations

from typing import Any

from tasks.factory import make_celery

__all__ = ["app", "make_celery"]


def __getattr__(name: str) -> Any:
    if name == "app":
        from outbox.settings import Settings

        app = make_celery(Settings.from_env())
        globals()["app"] = app
        return app
    raise AttributeError(name)
