from __future__ import annotations

import celeryconfig
from outbox.settings import Settings
from tasks.factory import make_celery

SETTINGS = Settings.from_env(
    {"OUTBOX_REDIS_URL": "redis://127.0.0.1:1/0", "OUTBOX_RETRY_INTERVAL_S": "7"}
)


def test_beat_schedules_every_periodic_task_at_its_configured_interval():
    schedule = celeryconfig.beat_schedule(SETTINGS)
    assert schedule["outbox.publish"]["schedule"] == 1.0
    assert schedule["outbox.retry_targeted"]["schedule"] == 7.0
    assert schedule["outbox.heartbeat"]["schedule"] == 10.0
    assert schedule["outbox.cleanup"]["schedule"] == 3600.0
    assert schedule["consumer.sweep"]["schedule"] == 5.0
    # A tick nobody ran within its interval is dropped, not queued behind the next.
    assert all(e["options"]["expires"] == e["schedule"] for e in schedule.values())


def test_celery_runs_with_late_acks_json_and_events():
    app = make_celery(SETTINGS)
    conf = app.conf
    assert conf.broker_url == "redis://127.0.0.1:1/0"
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert conf.worker_send_task_events and conf.task_send_sent_event
    assert conf.worker_direct
    assert conf.broker_transport_options["visibility_timeout"] == 3600


def test_a_worker_has_a_lingering_place_for_the_relay_and_one_for_the_lanes(monkeypatch):
    # Places are one fewer than the pool processes: with both kinds lingering (the
    # default) a worker keeps a process beyond its CPUs, and at least three in all.
    for cpus, expected in ((1, 3), (2, 3), (8, 9)):
        monkeypatch.setattr(celeryconfig.os, "cpu_count", lambda cpus=cpus: cpus)
        assert celeryconfig.worker_concurrency(SETTINGS) == expected
    monkeypatch.setattr(celeryconfig.os, "cpu_count", lambda: 8)
    still = SETTINGS.replace(relay_linger_ms=0, lane_linger_ms=0)
    assert celeryconfig.worker_concurrency(still) == 8
    assert celeryconfig.worker_concurrency(SETTINGS.replace(worker_concurrency=2)) == 2
    assert make_celery(SETTINGS).conf.worker_concurrency == 9


def test_a_worker_runs_every_task_beat_sends():
    app = make_celery(SETTINGS)
    assert set(celeryconfig.beat_schedule(SETTINGS)) <= set(app.tasks)


class _CountingRedis:
    """Counts the look-ups of the stopping key."""

    def __init__(self) -> None:
        self.lookups = 0
        self.stopping = False

    def exists(self, key: str) -> int:
        self.lookups += 1
        return int(self.stopping)


def test_a_pool_process_looks_up_its_workers_stopping_key_at_most_every_check_interval(
    monkeypatch,
):
    from tasks import shutdown

    client = _CountingRedis()
    clock = [1000.0]
    monkeypatch.setattr(shutdown.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(shutdown, "_per_process", None)

    # Many tasks start within one check interval: one look-up between them.
    for _ in range(50):
        assert not shutdown.stopping_for_this_process(client, "w1@host")()  # type: ignore[arg-type]
    assert client.lookups == 1

    # Once the interval has passed, the next task's look-up sees the worker stopping.
    client.stopping = True
    clock[0] += shutdown.CHECK_S
    assert shutdown.stopping_for_this_process(client, "w1@host")()  # type: ignore[arg-type]
    assert client.lookups == 2
    # Another worker's name has a key of its own.
    assert shutdown.stopping_for_this_process(client, "w2@host")()  # type: ignore[arg-type]
    assert client.lookups == 3
