"""One handler call, limited in time.

A call that runs past its group's ``handler_timeout_s`` is interrupted with
:class:`~consumer.handlers.HandlerTimeout` (a ``SIGALRM`` timer, in the main
thread of a worker process) and fails like any other failure; the database
statements of the call's transaction are limited to the same time
(``statement_timeout``), since a query waiting in PostgreSQL cannot be
interrupted by a signal. A call that hangs in C code beyond both is ended with
its process by the lane task's hard time limit (``OUTBOX_LANE_TIME_LIMIT_S``);
its attempt then counts as described in :mod:`consumer.lanes`.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

from sqlalchemy import text
from sqlalchemy.orm import Session

from consumer.handlers import (
    BatchHandler,
    HandlerExit,
    HandlerTimeout,
    Message,
    handler_for,
)
from outbox.logs import log_message


def limit_statements(session: Session, timeout_s: float) -> None:
    """Limit every statement of the session's transaction to ``timeout_s``."""
    session.execute(
        text("SELECT set_config('statement_timeout', :ms, true)"),
        {"ms": str(max(1, int(timeout_s * 1000)))},
    )


def call(message: Message, session: Session, timeout_s: float) -> None:
    """Run the message's handler; its log lines name the message."""
    with log_message(message.id), _handler_call(timeout_s):
        handler_for(message.topic)(message, session)


def call_batch(
    handle: BatchHandler, messages: list[Message], session: Session, timeout_s: float
) -> None:
    """Run a batch handler on ``messages``, within one handler's time limit."""
    with _handler_call(timeout_s):
        handle(messages, session)


@contextlib.contextmanager
def _handler_call(timeout_s: float) -> Iterator[None]:
    """A handler's call: limited to ``timeout_s``, and an ``exit()`` in it is a failure."""
    with _time_limit(timeout_s):
        try:
            yield
        except SystemExit as exc:
            raise HandlerExit(f"the handler called exit({exc.code!r})") from exc


# The limit of the call running now, for the message of its timeout.
_limit_s = [0.0]
_installed = [False]


def _expire(_signum: int, _frame: FrameType | None) -> None:
    raise HandlerTimeout(f"the handler took longer than {_limit_s[0]:g} s")


@contextlib.contextmanager
def time_limits() -> Iterator[None]:
    """Keep the ``SIGALRM`` handler of the calls' time limits installed for a run of
    calls (a batch), rather than install it for each: installing costs more than the
    timer. The previous handler is put back at the end."""
    if _installed[0] or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGALRM, _expire)
    _installed[0] = True
    try:
        yield
    finally:
        _installed[0] = False
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def _time_limit(timeout_s: float) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach the main thread only; the statement timeout still holds
        return
    with time_limits():
        _limit_s[0] = timeout_s
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
