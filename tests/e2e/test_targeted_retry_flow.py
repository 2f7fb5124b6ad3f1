"""Targeted retry end to end: two groups on one topic, both acking, two consumers each
and two Celery workers. Group A's handler fails on worker W1 only; its retry is aimed at
A and at W2, B never sees it, and both deliveries end acked."""

from __future__ import annotations

import time
from pathlib import Path

from flask.testing import FlaskClient
from sqlalchemy import Engine, text

from api import create_app
from outbox.devstack.processes import Process
from outbox.settings import Settings
from outbox.wire import ACK_TOPIC
from tests.processes import start_beat, start_consumer, start_worker
from tests.retry_handlers import SCHEMA

TOKEN = "retry-e2e"
RETRY_AFTER_S = 3600.0
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


def _system(settings: Settings, engine: Engine) -> tuple[Settings, FlaskClient]:
    """The tests' settings, the handler's tables, and an API client."""
    s = settings.replace(
        api_tokens=(TOKEN,),
        handler_modules=("tests.retry_handlers",),
        retry_interval_s=1.0,
        # each heartbeat holds a pool process for the inspect timeout: keep it short
        heartbeat_interval_s=2.0,
        heartbeat_inspect_timeout_s=0.3,
    )
    with engine.begin() as conn:
        conn.execute(text(SCHEMA))
    return s, create_app(s).test_client()


def test_a_group_that_fails_on_one_worker_is_retried_on_the_other_and_only_there(
    settings: Settings, engine: Engine, topic: str, tmp_path: Path
):
    s, client = _system(settings, engine)
    # A's lanes try once, then the message waits for its targeted retry, which the test
    # makes due once W2 is known; B's as usual.
    retry = {"base_s": RETRY_AFTER_S, "factor": 1.0, "max_attempts": 1}
    a, b = f"group-a.{topic}", f"group-b.{topic}"  # the broker's groups outlive a test
    groups = [
        {"name": a, "requires_ack": True, "retry": retry},
        {"name": b, "requires_ack": True},
    ]
    created = client.post(
        "/v1/topics", json={"name": topic, "consumer_groups": groups}, headers=AUTH
    )
    assert created.status_code == 201, created.get_json()

    env = {"OUTBOX_TEST_HANDLER_TOPIC": topic, "OUTBOX_TEST_FAIL_GROUP": a}
    env["OUTBOX_TEST_FAIL_WORKER"] = "w1"
    # Only W1 runs at first, so A's first attempt is W1's. (A paused W2 would not do:
    # Redis hands a task to a worker's pending BRPOP even while the worker is stopped.)
    processes: list[Process] = [
        start_worker(s, "w1", tmp_path, env={**env, "OUTBOX_TEST_WORKER": "w1"}, concurrency=2),
        start_beat(s, tmp_path),
        start_consumer(s, "acks", tmp_path, group="outbox-acks", topics=[ACK_TOPIC]),
    ]
    for group in (a, b):
        processes += [
            start_consumer(s, f"{group[:7]}-{n}", tmp_path, group=group, topics=[topic], env=env)
            for n in (1, 2)
        ]
    try:
        for process in processes:
            process.wait_ready(120)
        published = client.post(
            "/v1/messages", json={"topic": topic, "key": "order-1", "payload": {}}, headers=AUTH
        )
        assert published.status_code == 202, published.get_json()
        message_id = published.get_json()["message_id"]
        failed = (
            "SELECT count(*) FROM deliveries d JOIN consumer_groups g"
            " ON g.id = d.consumer_group_id"
            " WHERE g.name = :a AND d.status = 'failed' AND d.attempts = 0"
        )
        _wait(engine, failed, 1, 60, a=a)
        # W2 starts and is a healthy agent before A's retry is due (the group's backoff
        # draws its first wait from [0, an hour]); then the test makes the retry due.
        w2 = start_worker(s, "w2", tmp_path, env={**env, "OUTBOX_TEST_WORKER": "w2"}, concurrency=2)
        processes.append(w2)
        w2.wait_ready(120)
        _wait(engine, "SELECT count(*) FROM agents WHERE role = 'worker' AND active", 2, 30)
        assert _scalar(engine, "SELECT count(*) FROM outbox_messages WHERE is_retry") == 0, (
            "the retry went out before W2 was known"
        )
        with engine.begin() as conn:
            conn.execute(
                text("UPDATE deliveries SET next_retry_at = now() WHERE status = 'failed'")
            )

        # A's effect happens once, on W2, after a retry aimed at A and at W2.
        _wait(engine, "SELECT count(*) FROM group_effects WHERE consumer_group = :a", 1, 90, a=a)
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
        assert effects in ({(a, "w2"), (b, "w1")}, {(a, "w2"), (b, "w2")})
        b_effect = next(e for e in effects if e[0] == b)
        a_attempts = _rows(
            engine,
            "SELECT worker FROM group_attempts WHERE consumer_group = :a",
            a=a,
        )
        assert sorted(a_attempts) == [("w1",), ("w2",)]  # failed on W1, then done on W2
        assert (
            _scalar(engine, "SELECT count(*) FROM group_attempts WHERE consumer_group = :b", b=b)
            == 1
        )  # B ran once in total: it skipped A's retry
        retries = _rows(
            engine,
            "SELECT target_group, target_instance FROM outbox_messages"
            " WHERE is_retry AND original_message_id = CAST(:m AS uuid)",
            m=message_id,
        )
        assert retries and all(r == (a, retries[0][1]) for r in retries)
        assert retries[0][1].startswith("w2@")
        inbox = _rows(
            engine,
            "SELECT consumer_group, attempt_workers, retries, status FROM inbox_messages"
            " WHERE message_id = CAST(:m AS uuid) ORDER BY consumer_group",
            m=message_id,
        )
        assert [(g, [w.split("@")[0] for w in ws], r, st) for g, ws, r, st in inbox] == [
            (a, ["w1", "w2"], 1, "done"),  # each attempt's worker is on the inbox row
            (b, [b_effect[1]], 0, "done"),
        ]
    finally:
        for process in reversed(processes):
            process.stop()


def test_a_group_whose_consumers_are_down_is_retried_and_processes_the_message_once(
    settings: Settings, engine: Engine, topic: str, tmp_path: Path
):
    s, client = _system(settings, engine)
    a = f"group-a.{topic}"  # the broker's groups outlive a test
    group = {"name": a, "requires_ack": True, "ack_timeout_s": 2, "max_retries": -1}
    group["retry"] = {"base_s": 0.5, "factor": 2.0, "cap_s": 1.0}
    created = client.post(
        "/v1/topics", json={"name": topic, "consumer_groups": [group]}, headers=AUTH
    )
    assert created.status_code == 201, created.get_json()
    env = {"OUTBOX_TEST_HANDLER_TOPIC": topic, "OUTBOX_TEST_WORKER": "w1"}
    processes: list[Process] = [
        start_worker(s, "w1", tmp_path, env=env, concurrency=2),
        start_beat(s, tmp_path),
        start_consumer(s, "acks", tmp_path, group="outbox-acks", topics=[ACK_TOPIC]),
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
        consumer = start_consumer(s, "group-a", tmp_path, group=a, topics=[topic], env=env)
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
        assert _rows(engine, "SELECT consumer_group, worker FROM group_effects") == [(a, "w1")]
        assert _scalar(engine, "SELECT count(*) FROM group_attempts") == 1
        inbox = "SELECT count(*) FROM inbox_messages WHERE consumer_group = :a"
        assert _scalar(engine, inbox, a=a) == 1  # the message and its retries: one inbox row
    finally:
        for process in reversed(processes):
            process.stop()


def _rows(engine: Engine, sql: str, **params: object) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(sql), params)]
