"""A whole consume flow for end-to-end and fault tests: an API client, Celery worker
processes, beat and a consumer process serving one topic with the handlers of
``tests.handlers``."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine, text

from api import create_app
from outbox.devstack.processes import Process
from outbox.settings import Settings
from outbox.wire import ACK_TOPIC
from tests.handlers import SCHEMA, TOPIC_VARIABLE
from tests.processes import start_beat, start_consumer, start_worker

TOKEN = "e2e"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Flow:
    """An API client, with worker, beat and consumer processes serving one topic."""

    def __init__(self, settings: Settings, engine: Engine, topic: str, group: str) -> None:
        self.settings = settings
        self.engine = engine
        self.topic = topic
        self.group = group
        self.client: FlaskClient = create_app(settings).test_client()
        self.processes: dict[str, Process] = {}

    def publish(self, messages: list[dict[str, Any]]) -> list[str]:
        ids: list[str] = []
        for start in range(0, len(messages), 500):
            batch = [dict(m, topic=self.topic) for m in messages[start : start + 500]]
            response = self.client.post("/v1/messages", json={"messages": batch}, headers=AUTH)
            assert response.status_code == 202, response.get_json()
            ids += response.get_json()["message_ids"]
        return ids

    def scalar(self, sql: str, **params: Any) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(text(sql), params).scalar()

    def wait(self, done: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if done():
                return
            time.sleep(0.25)
        raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def flow(
    settings: Settings, engine: Engine, topic: str, tmp_path: Path, request: Any
) -> Iterator[Flow]:
    """Serves ``topic`` for one group; ``request.param`` may set ``requires_ack`` (then an
    acks consumer runs too), ``workers`` (Celery worker processes, 1 by default),
    ``consumers`` (consumer processes of the group, 1 by default), ``retry`` (the
    group's retry policy), ``handler_timeout_s`` and ``settings`` (overrides for every
    process)."""
    options = getattr(request, "param", {})
    settings = settings.replace(**options.get("settings", {}))
    group = f"g-{uuid.uuid4().hex[:8]}"
    retry = {"base_s": 0.3, "factor": 3.0, "max_attempts": 5, **options.get("retry", {})}
    s = settings.replace(api_tokens=(TOKEN,), handler_modules=("tests.handlers",))
    with engine.begin() as conn:
        conn.execute(text(SCHEMA))
    flow = Flow(s, engine, topic, group)
    spec = {
        "name": group,
        "retry": retry,
        "requires_ack": options.get("requires_ack", False),
        "handler_timeout_s": options.get("handler_timeout_s", 30.0),
    }
    response = flow.client.post(
        "/v1/topics", json={"name": topic, "consumer_groups": [spec]}, headers=AUTH
    )
    assert response.status_code == 201, response.get_json()
    env = {TOPIC_VARIABLE: topic}
    # Three pool processes, a worker's default on two CPUs: a lingering place for the
    # relay, one for the lanes, and a process for every other task.
    processes: list[Process] = [
        start_worker(s, f"worker{n}", tmp_path, concurrency=3, env=env)
        for n in range(1, options.get("workers", 1) + 1)
    ]
    processes.append(start_beat(s, tmp_path))
    processes += [
        start_consumer(s, name, tmp_path, group=group, topics=[topic], env=env)
        for name in [
            "consumer",
            *(f"consumer{n}" for n in range(2, options.get("consumers", 1) + 1)),
        ]
    ]
    if options.get("requires_ack"):
        processes.append(
            start_consumer(s, "acks", tmp_path, group="outbox-acks", topics=[ACK_TOPIC])
        )
    flow.processes = {process.name: process for process in processes}
    try:
        for process in processes:
            process.wait_ready()
        yield flow
    finally:
        for process in reversed(processes):
            process.stop()
