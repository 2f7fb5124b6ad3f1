"""Two celery beats started together: one holds the schedule, the other stands by, and
each periodic task still runs once per interval; when the first dies, the other takes over."""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import Engine, text

from outbox.devstack.processes import Process
from outbox.settings import Settings
from outbox.tasknames import HEARTBEAT
from tests.processes import start_beat, start_worker


def _snapshots(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM health_snapshots")).scalar_one())


def _standing_by(beat: Process) -> bool:
    return "standing by" in beat.text()


def _heartbeats_sent(beat: Process) -> int:
    """The heartbeat ticks ``beat`` has sent, by its log."""
    return beat.text().count(f"Sending due task {HEARTBEAT}")


def test_a_second_beat_stands_by_and_takes_over_when_the_first_dies(
    settings: Settings, engine: Engine, tmp_path: Path
):
    # outbox.heartbeat stores one snapshot per tick: the ticks are counted by the rows.
    s = settings.replace(heartbeat_interval_s=1.0)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    worker = start_worker(s, "ticker", tmp_path, concurrency=2)
    beats = [start_beat(s, tmp_path / "a"), start_beat(s, tmp_path / "b")]
    try:
        worker.wait_ready()
        for beat in beats:
            beat.wait_ready()
        deadline = time.monotonic() + 30
        while not any(_standing_by(b) for b in beats) and time.monotonic() < deadline:
            time.sleep(0.2)
        standby = [b for b in beats if _standing_by(b)]
        assert len(standby) == 1, [b.text()[-2000:] for b in beats]
        active = next(b for b in beats if b is not standby[0])

        time.sleep(2)  # past the first ticks
        sent = [_heartbeats_sent(b) for b in beats]
        before, started = _snapshots(engine), time.monotonic()
        time.sleep(8)
        sent = [_heartbeats_sent(b) - n for b, n in zip(beats, sent, strict=True)]
        ticks = _snapshots(engine) - before
        elapsed = time.monotonic() - started
        # Once per second, not twice: the beat that stands by sends nothing. The ticks are
        # counted as sent: a worker slowed down runs the ticks queued meanwhile together,
        # which puts more snapshots than seconds in a window.
        assert sent[beats.index(standby[0])] == 0
        assert elapsed - 2 <= sent[beats.index(active)] <= elapsed + 1
        assert ticks >= elapsed - 3  # and the worker ran them

        active.kill()
        deadline = time.monotonic() + 30
        while "holds the schedule" not in standby[0].text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "holds the schedule" in standby[0].text(), standby[0].text()[-2000:]
        time.sleep(2)
        sent_before, before = _heartbeats_sent(standby[0]), _snapshots(engine)
        time.sleep(5)
        assert 3 <= _heartbeats_sent(standby[0]) - sent_before <= 6
        assert _snapshots(engine) - before >= 2
    finally:
        for process in [*beats, worker]:
            process.stop()
