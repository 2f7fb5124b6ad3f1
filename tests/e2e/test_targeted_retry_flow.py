"""Targeted retry end to end: two groups on one topic, both acking, two consumers each
and two Celery workers. Group A's handler fails on worker W1 only; its retry is aimed at
A and at W2, B never sees it, and both deliveries end acked."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from sqlalchemy import Engine, text

from api import create_app
from outbox.settings import Settings
from outbox.wire import ACK_TOPIC
from tests.processes import BeatProcess, ConsumerProcess, ServiceProcess, WorkerProcess
from tests.retry_handlers import SCHEMA

TOKEN = "retry-e2e"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _scalar(engine: Engine, sql: str, **params: object) -> object:
    with engine.connect() as conn:
        return conn.execute(text(sql), params).scalar()


def _wait(engine: Engine, sql: str, expected: object, timeout_s: float, **params: object) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _scalar(engine, sql, **params) == expected:
            return
        time.sleep(0.25)
    raise AssertionError(f"{sql} is {_scalar(engine, sql, **params)!r}, not {expected!r}")


def test_a_group_that_fails_on_one_worker_is_retried_on_the_other_and_only_there(
    settings: Settings, engine: Engine, topic: str, tmp_path: Path
):
    s = settings.replace(
        api_tokens=(TOKEN,),
        handler_modules=("tests.retry_handlers",),
        retry_interval_s=1.0,
        heartbeat_interval_s=1.0,
    )
    with engine.begin() as conn:
        conn.execute(text(SCHEMA))
    client = create_app(s).test_client()
    # A's lanes try once (then the message waits for its targeted retry); B's as usual.
    groups = [
        {"name": "group-a", "requires_ack": True, "retry": {"base_s": 0.5, "max_attempts": 1}},
        {"name": "group-b", "requires_ack": True},
    ]
    created = client.post(
        "/v1/topics", json={"name": topic, "consumer_groups": groups}, headers=AUTH
    )
    assert created.status_code == 201, created.get_json()

    env = {"OUTBOX_TEST_HANDLER_TOPIC": topic, "OUTBOX_TEST_FAIL_GROUP": "group-a"}
    env["OUTBOX_TEST_FAIL_WORKER"] = "w1"
    processes: list[ServiceProcess] = [
        WorkerProcess(s, "w1", tmp_path, env={**env, "OUTBOX_TEST_WORKER": "w1"}),
        WorkerProcess(s, "w2", tmp_path, env={**env, "OUTBOX_TEST_WORKER": "w2"}),
        BeatProcess(s, tmp_path),
        ConsumerProcess(s, "acks", tmp_path, group="outbox-acks", topics=[ACK_TOPIC]),
    ]
    for group in ("group-a", "group-b"):
        processes += [
            ConsumerProcess(s, f"{group}-{n}", tmp_path, group=group, topics=[topic], env=env)
            for n in (1, 2)
        ]
    try:
        for process in processes:
            process.wait_ready(120)
        # Both workers are known as healthy agents before anything fails.
        _wait(engine, "SELECT count(*) FROM agents WHERE role = 'worker' AND active", 2, 30)
        # Only W1 runs A's first attempt: W2 is paused until that attempt has failed.
        os.killpg(processes[1].proc.pid, signal.SIGSTOP)
        published = client.post(
            "/v1/messages", json={"topic": topic, "key": "order-1", "payload": {}}, headers=AUTH
        )
        assert published.status_code == 202, published.get_json()
        message_id = published.get_json()["message_id"]
        _wait(
            engine,
            "SELECT count(*) FROM group_attempts WHERE consumer_group = 'group-a'",
            1,
            60,
        )
        os.killpg(processes[1].proc.pid, signal.SIGCONT)

        # A's effect happens once, on W2, after a retry aimed at A and at W2.
        _wait(engine, "SELECT count(*) FROM group_effects WHERE consumer_group = 'group-a'", 1, 90)
        _wait(
            engine,
            "SELECT count(*) FROM deliveries WHERE message_id = CAST(:m AS uuid)"
            " AND status = 'acked'",
            2,
            90,
            m=message_id,
        )
        time.sleep(2)  # let any stray duplicate show
        effects = {
            (g, w) for g, w in _rows(engine, "SELECT consumer_group, worker FROM group_effects")
        }
        assert effects == {("group-a", "w2"), ("group-b", "w1")} or effects == {
            ("group-a", "w2"),
            ("group-b", "w2"),
        }
        a_attempts = _rows(
            engine,
            "SELECT worker FROM group_attempts WHERE consumer_group = 'group-a'",
        )
        assert a_attempts[0] == ("w1",) and ("w2",) in a_attempts
        assert (
            _scalar(engine, "SELECT count(*) FROM group_attempts WHERE consumer_group = 'group-b'")
            == 1
        )  # B ran once in total: it skipped A's retry
        retries = _rows(
            engine,
            "SELECT target_group, target_instance FROM outbox_messages"
            " WHERE is_retry AND original_message_id = CAST(:m AS uuid)",
            m=message_id,
        )
        assert retries and all(r == ("group-a", retries[0][1]) for r in retries)
        assert retries[0][1].startswith("w2@")
        inbox_workers = _rows(
            engine,
            "SELECT consumer_group, worker, status FROM inbox_messages"
            " WHERE message_id = CAST(:m AS uuid) ORDER BY consumer_group",
            m=message_id,
        )
        assert inbox_workers[0][0] == "group-a" and inbox_workers[0][1].startswith("w2@")
        assert [row[2] for row in inbox_workers] == ["done", "done"]
    finally:
        for process in reversed(processes):
            process.stop()


def test_a_group_whose_consumers_are_down_is_retried_and_processes_the_message_once(
    settings: Settings, engine: Engine, topic: str, tmp_path: Path
):
    s = settings.replace(
        api_tokens=(TOKEN,),
        handler_modules=("tests.retry_handlers",),
        retry_interval_s=1.0,
        heartbeat_interval_s=1.0,
    )
    with engine.begin() as conn:
        conn.execute(text(SCHEMA))
    client = create_app(s).test_client()
    group = {"name": "group-a", "requires_ack": True, "ack_timeout_s": 2, "max_retries": -1}
    group["retry"] = {"base_s": 0.5, "factor": 2.0, "cap_s": 1.0}
    created = client.post(
        "/v1/topics", json={"name": topic, "consumer_groups": [group]}, headers=AUTH
    )
    assert created.status_code == 201, created.get_json()
    env = {"OUTBOX_TEST_HANDLER_TOPIC": topic, "OUTBOX_TEST_WORKER": "w1"}
    processes: list[ServiceProcess] = [
        WorkerProcess(s, "w1", tmp_path, env=env),
        BeatProcess(s, tmp_path),
        ConsumerProcess(s, "acks", tmp_path, group="outbox-acks", topics=[ACK_TOPIC]),
    ]
    try:
        for process in processes:
            process.wait_ready(120)
        published = client.post(
            "/v1/messages", json={"topic": topic, "key": "k", "payload": {}}, headers=AUTH
        )
        message_id = published.get_json()["message_id"]
        # No consumer of the group runs: after the ack timeout, retries go out.
        retried = (
            "SELECT count(*) >= 2 FROM outbox_messages WHERE is_retry"
            " AND original_message_id = CAST(:m AS uuid) AND status = 'sent'"
        )
        _wait(engine, retried, True, 60, m=message_id)
        # The group's consumer comes back: it reads the message and its retries, once.
        consumer = ConsumerProcess(s, "group-a", tmp_path, group="group-a", topics=[topic], env=env)
        processes.append(consumer)
        consumer.wait_ready(120)
        _wait(
            engine,
            "SELECT status FROM deliveries WHERE message_id = CAST(:m AS uuid)",
            "acked",
            90,
            m=message_id,
        )
        time.sleep(2)  # let a stray duplicate show
        assert _rows(engine, "SELECT consumer_group, worker FROM group_effects") == [
            ("group-a", "w1")
        ]
        assert _scalar(engine, "SELECT count(*) FROM group_attempts") == 1
        assert _scalar(engine, "SELECT count(*) FROM inbox_messages") == 1
    finally:
        for process in reversed(processes):
            process.stop()


def _rows(engine: Engine, sql: str, **params: object) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(sql), params)]
