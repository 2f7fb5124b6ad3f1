"""``outbox dev``'s supervisor, on tiny real processes: a child that exits is started
again after a delay that doubles while it keeps exiting, and one that keeps exiting
before it ever gets ready stops everything."""

from __future__ import annotations

import io
import sys

import pytest

from outbox.devstack.dev import GaveUp, Output, Supervisor
from outbox.devstack.processes import Spec
from outbox.settings import Settings

START = 1000.0


def _supervisor(code: str, **kwargs: object) -> tuple[Supervisor, io.StringIO]:
    out = io.StringIO()
    spec = Spec("flaky", (sys.executable, "-c", code), ready_pattern="^up$")
    supervisor = Supervisor(Settings.from_env({}), [spec], Output(out), **kwargs)  # type: ignore[arg-type]
    supervisor.start()
    return supervisor, out


def _exited(supervisor: Supervisor, *, ready: bool) -> None:
    child = supervisor.children[0]
    assert child.proc is not None
    child.proc.wait(10)
    if ready:  # its output is read on another thread
        assert child.ready.wait(10)
    else:
        assert not child.ready.is_set()


def test_a_child_that_exits_is_started_again_after_a_delay_that_doubles():
    supervisor, out = _supervisor("print('up')")
    try:
        _exited(supervisor, ready=True)
        assert supervisor.keep_alive(START) == []  # seen: restart in 0.5 s
        assert supervisor.keep_alive(START + 0.4) == []
        assert supervisor.keep_alive(START + 0.5) == ["flaky"]
        _exited(supervisor, ready=True)
        assert supervisor.keep_alive(START + 1) == []  # the second exit in a row: 1 s
        assert supervisor.keep_alive(START + 1.9) == []
        assert supervisor.keep_alive(START + 2) == ["flaky"]
    finally:
        supervisor.stop()
    lines = out.getvalue().splitlines()
    assert "flaky | exited (0); starting it again in 0.5 s" in lines
    assert "flaky | exited (0); starting it again in 1 s" in lines


def test_a_child_that_keeps_exiting_before_it_is_ready_stops_everything():
    supervisor, _ = _supervisor("raise SystemExit(3)")
    now = START
    try:
        with pytest.raises(GaveUp, match="flaky exited 5 times in a row before it got ready"):
            for _ in range(5):
                _exited(supervisor, ready=False)
                supervisor.keep_alive(now)  # the exit
                now += 60
                supervisor.keep_alive(now)  # the restart
    finally:
        supervisor.stop()


def test_a_supervisor_told_never_to_give_up_keeps_starting_it():
    supervisor, _ = _supervisor("raise SystemExit(3)", give_up_after=None)
    now = START
    try:
        for _ in range(6):
            _exited(supervisor, ready=False)
            supervisor.keep_alive(now)
            now += 60
            assert supervisor.keep_alive(now) == ["flaky"]
    finally:
        supervisor.stop()
