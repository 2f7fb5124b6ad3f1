"""One logging setup for every process: each line names the process role, and the
Celery task and the message it concerns where there is one.

``OUTBOX_LOG_FORMAT=text`` (the default) writes readable lines; ``json`` writes one
JSON object per line (``ts``, ``level``, ``role``, ``logger``, ``message``, and
``task_id``, ``task``, ``message_id``, ``exc_info`` when present), for a log
collector. The message id comes from :func:`log_message`, which the lane processor
wraps around each handler call.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

from outbox.settings import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)-7s {role} %(name)s: %(message)s%(context)s"

_message_id: contextvars.ContextVar[object] = contextvars.ContextVar(
    "outbox_message_id", default=None
)


def _no_task() -> tuple[str | None, str | None]:
    return None, None


# (task id, task name) of the task this process runs now; the Celery app sets it.
_current_task: Callable[[], tuple[str | None, str | None]] = _no_task


def set_task_context(current: Callable[[], tuple[str | None, str | None]]) -> None:
    """Say how to find the running task's id and name (``tasks`` passes Celery's)."""
    global _current_task
    _current_task = current


@contextlib.contextmanager
def log_message(message_id: object) -> Iterator[None]:
    """Tag every log line written inside the block with ``message_id``."""
    token = tag_message(message_id)
    try:
        yield
    finally:
        untag_message(token)


def tag_message(message_id: object) -> contextvars.Token[object]:
    """Tag the log lines written from now on with ``message_id`` (made text only when a
    line is written), until :func:`untag_message`: what :func:`log_message` does, for a
    caller that runs once per message and would rather not pay for a context manager."""
    return _message_id.set(message_id)


def untag_message(token: contextvars.Token[object]) -> None:
    _message_id.reset(token)


class _Context(logging.Filter):
    """Puts the role, the current Celery task and the current message on each record."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def filter(self, record: logging.LogRecord) -> bool:
        task_id, name = _current_task()
        tagged = _message_id.get()
        message_id = None if tagged is None else str(tagged)
        parts = [
            f"task={name}[{task_id}]" if task_id else "",
            f"message={message_id}" if message_id else "",
        ]
        shown = " ".join(p for p in parts if p)
        record.__dict__.update(
            role=self.role,
            task_id=task_id,
            task=name,
            message_id=message_id,
            context=f" [{shown}]" if shown else "",
        )
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "role": getattr(record, "role", None),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("task_id", "task", "message_id"):
            value = getattr(record, key, None)
            if value is not None:
                line[key] = value
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def setup_logging(settings: Settings, role: str) -> None:
    """Send the root logger to stderr at the configured level and format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Context(role))
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT.format(role=role)))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    logging.captureWarnings(True)  # warnings become log lines too, in the same format
    # librdkafka's own logger and the HTTP access log are chatty at INFO.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
