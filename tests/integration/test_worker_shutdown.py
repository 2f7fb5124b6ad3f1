"""A worker's warm shutdown (SIGTERM to its main process, as ``docker stop`` sends it)
ends its running relay and lane tasks early, so that it stops well within a stop's grace
and gives back what its tasks hold."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import redis

from outbox.budget import Budget
from outbox.settings import Settings
from tasks.factory import make_celery
from tasks.relay import LINGERER
from tasks.shutdown import Stopping, stopping_key
from tests.processes import start_worker


def test_a_budget_runs_out_once_the_worker_stops():
    stopped = []
    budget = Budget(60, lambda: bool(stopped))
    assert 59 < budget.left() <= 60 and not budget.over()
    stopped.append(True)
    assert budget.left() == 0 and budget.over()
    assert Budget(0).over()


def test_a_warm_shutdown_ends_a_lingering_relay_task_at_once(settings: Settings, tmp_path: Path):
    assert settings.redis_url is not None
    client = redis.Redis.from_url(settings.redis_url)
    # A relay task that would wait a minute for new rows, with a budget of two.
    s = settings.replace(relay_linger_ms=60_000, relay_drain_s=120.0)
    # Two pool processes: a task lingers only where another process is left for the rest.
    worker = start_worker(s, "stopping", tmp_path, concurrency=2)
    try:
        worker.wait_ready()
        make_celery(s).send_task("outbox.publish")
        deadline = time.monotonic() + 30
        while not client.exists(LINGERER) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.exists(LINGERER), worker.text()[-3000:]

        # When its main process alone gets SIGTERM
        assert worker.proc is not None
        os.kill(worker.proc.pid, signal.SIGTERM)
        started = time.monotonic()
        try:
            worker.proc.wait(15)
        except subprocess.TimeoutExpired:
            raise AssertionError("the worker still waits for its task") from None

        # Then the task ended within moments, letting its flags go, and the worker exited
        assert time.monotonic() - started < 10
        assert worker.proc.returncode == 0, worker.text()[-3000:]
        assert not client.exists(LINGERER)
        assert client.exists(stopping_key(f"stopping@{os.uname().nodename}"))
    finally:
        worker.stop()


def test_a_worker_starting_clears_the_stopping_mark_and_the_lingering_place_its_name_left(
    settings: Settings, tmp_path: Path
):
    assert settings.redis_url is not None
    client = redis.Redis.from_url(settings.redis_url)
    name = f"again@{os.uname().nodename}"
    client.set(stopping_key(name), b"1")
    assert Stopping(client, name)()
    # A task of a killed worker of that name held its one lingering place.
    place = f"outbox:worker:{name}:lingering:0"
    client.set(place, b"a task that died", px=60_000)
    worker = start_worker(settings, "again", tmp_path, concurrency=2)
    try:
        worker.wait_ready()
        assert not client.exists(stopping_key(name))
        assert not Stopping(client, name)()
        assert not client.exists(place)  # its lane tasks may linger again
    finally:
        worker.stop()
