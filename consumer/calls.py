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
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import billiard.common
from sqlalchemy import text
from sqlalchemy.orm import Session

from consumer.handlers import (
    BatchHandler,
    HandlerExit,
    HandlerTimeout,
    Message,
    handler_for,
)
from outbox.logs import tag_message, untag_message


def statement_timeout_ms(timeout_s: float) -> str:
    """``statement_timeout`` for ``timeout_s``, as ``set_config`` takes it."""
    return str(max(1, int(timeout_s * 1000)))


def limit_statements(session: Session, timeout_s: float) -> None:
    """Limit every statement of the session's transaction to ``timeout_s``."""
    session.execute(
        text("SELECT set_config('statement_timeout', :ms, true)"),
        {"ms": statement_timeout_ms(timeout_s)},
    )


def call(message: Message, session: Session, timeout_s: float) -> None:
    """Run the message's handler; its log lines name the message."""
    token = tag_message(message.id)
    try:
        _handler_call(handler_for(message.topic), message, session, timeout_s)
    finally:
        untag_message(token)


def call_batch(
    handle: BatchHandler, messages: list[Message], session: Session, timeout_s: float
) -> None:
    """Run a batch handler on ``messages``, within one handler's time limit."""
    _handler_call(handle, messages, session, timeout_s)


def _handler_call(
    handle: Callable[[Any, Session], None], argument: Any, session: Session, timeout_s: float
) -> None:
    """A handler's call: limited to ``timeout_s``, and an ``exit()`` in it is a failure.
    Plain code rather than context managers: it runs once per message, where each
    generator-based context manager costs about a microsecond."""
    if threading.current_thread() is not threading.main_thread():
        _run(handle, argument, session)  # signals reach the main thread only; the
        return  # statement timeout still holds
    if not _installed[0]:
        with time_limits():
            _handler_call(handle, argument, session, timeout_s)
        return
    deadline = time.monotonic() + timeout_s
    # The timer stays armed from call to call within time_limits(): arming and disarming
    # it around each call cost more than a short handler (a couple of microseconds, after
    # the process waited for PostgreSQL). It is armed anew only for a call that must end
    # before it goes off; when it goes off early, _expire arms it for the rest. The call
    # is made known first: a timer that goes off between the two then arms itself for it.
    _running[0] = (deadline, timeout_s)
    if not _armed_until[0] or _armed_until[0] > deadline:
        _arm(timeout_s, deadline)
    try:
        _run(handle, argument, session)
    finally:
        _running[0] = None


def _run(handle: Callable[[Any, Session], None], argument: Any, session: Session) -> None:
    try:
        handle(argument, session)
    except SystemExit as exc:
        if _process_ending():
            raise  # the pool's own SystemExit: the process ends, its batch undone
        raise HandlerExit(f"the handler called exit({exc.code!r})") from exc


def _process_ending() -> bool:
    """Whether this (pool) process's terminate handler has run: a worker process sent
    SIGTERM (a hard time limit, a stop signalled to its process group) raises SystemExit
    in whatever code it runs, a handler's included. That is not the handler's failure:
    its batch must be undone with the process, not recorded, and the process must end."""
    fired = getattr(billiard.common, "terminate_handler_fired", None)
    return bool(fired is not None and fired())


# The call running now: its deadline (monotonic) and limit; None between calls.
_running: list[tuple[float, float] | None] = [None]
# When the armed timer goes off (monotonic); 0.0 when none is armed.
_armed_until = [0.0]
_installed = [False]
# A timer may go off this much before its deadline by the monotonic clock (the two clocks
# are read apart): that is the deadline.
_EARLY_S = 0.001


def _arm(seconds: float, until: float) -> None:
    signal.setitimer(signal.ITIMER_REAL, seconds)
    _armed_until[0] = until


def _expire(_signum: int, _frame: FrameType | None) -> None:
    """The timer went off: the call running now fails if it is past its deadline; if it
    started later than the timer was armed for, the timer is armed for the rest of its
    time; between calls, nothing is limited."""
    _armed_until[0] = 0.0
    running = _running[0]
    if running is None:
        return
    deadline, limit_s = running
    left_s = deadline - time.monotonic()
    if left_s > _EARLY_S:
        _arm(left_s, deadline)
        return
    raise HandlerTimeout(f"the handler took longer than {limit_s:g} s")


@contextlib.contextmanager
def time_limits() -> Iterator[None]:
    """Keep the ``SIGALRM`` handler of the calls' time limits installed, and its timer
    armed, for a run of calls (a batch), rather than install and arm them for each. The
    timer is disarmed and the previous handler put back at the end."""
    if _installed[0] or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGALRM, _expire)
    _installed[0] = True
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        _armed_until[0] = 0.0
        _installed[0] = False
        signal.signal(signal.SIGALRM, previous)
