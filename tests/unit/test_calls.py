"""A handler call's time limit: a SIGALRM timer kept armed across the calls of a batch."""

from __future__ import annotations

import signal
import time

import pytest

from consumer.calls import _handler_call, time_limits
from consumer.handlers import HandlerTimeout


def _sleeping(seconds: float):
    def handle(_argument, _session) -> None:
        time.sleep(seconds)

    return handle


def _timed_out(seconds: float, limit_s: float) -> float:
    """Run a call sleeping ``seconds`` under ``limit_s``; the seconds until it timed out."""
    started = time.monotonic()
    with pytest.raises(HandlerTimeout, match=f"longer than {limit_s:g} s"):
        _handler_call(_sleeping(seconds), None, None, limit_s)
    return time.monotonic() - started


def test_a_call_past_its_limit_fails_at_its_limit_after_quick_calls_before_it():
    with time_limits():
        for _ in range(50):
            _handler_call(_sleeping(0), None, None, 0.3)
        time.sleep(0.2)  # the timer, armed by the first call, goes off during the next
        assert 0.3 <= _timed_out(5, 0.3) < 0.6


def test_a_call_with_a_shorter_limit_than_the_one_before_fails_at_its_own():
    with time_limits():
        _handler_call(_sleeping(0), None, None, 30.0)
        assert 0.2 <= _timed_out(5, 0.2) < 0.5


def test_calls_each_within_the_limit_pass_however_long_the_batch_runs():
    with time_limits():
        started = time.monotonic()
        while time.monotonic() - started < 0.6:  # the timer goes off several times
            _handler_call(_sleeping(0.03), None, None, 0.1)
            time.sleep(0.02)  # between calls: nothing is limited


def test_no_timer_is_left_armed_and_the_previous_handler_is_back_after_a_batch():
    previous = signal.getsignal(signal.SIGALRM)
    with time_limits():
        _handler_call(_sleeping(0), None, None, 30.0)
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) is previous


def test_a_call_outside_a_batch_is_limited_too_and_leaves_no_timer():
    assert 0.2 <= _timed_out(5, 0.2) < 0.5
    _handler_call(_sleeping(0), None, None, 30.0)
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
