"""A real worker and a real gunicorn with ``OUTBOX_LOG_FORMAT=json``: every line they
write is a JSON object naming their role, and the lines a task writes name the task."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

from sqlalchemy import Engine

from outbox.db import make_sessionmaker
from outbox.publishing import Publisher
from outbox.registry import register_topic
from outbox.settings import Settings
from tasks.factory import make_celery
from tests.processes import ApiServer, start_worker


def test_a_worker_writes_json_lines_and_a_tasks_lines_name_the_task(
    settings: Settings, engine: Engine, topic: str, tmp_path: Path
):
    s = settings.replace(log_format="json")
    with make_sessionmaker(engine).begin() as session:
        register_topic(session, topic)
        Publisher(s).publish(session, topic, {"n": 1}, key="k")
    worker = start_worker(s, "json", tmp_path)
    try:
        worker.wait_ready()
        task_id = make_celery(s).send_task("outbox.publish").id
        deadline = time.monotonic() + 30
        # The task's first line (a topic created) comes before its relay line: wait for both.
        while not _relay_line(worker.text(), task_id) and time.monotonic() < deadline:
            time.sleep(0.2)
        # (Celery prints its shutdown notice itself, outside logging: read before stopping.)
        text = worker.text()
    finally:
        worker.stop()
    lines = [json.loads(line) for line in text.splitlines()]  # each one parses
    assert lines and {line["role"] for line in lines} == {"worker"}
    own = [line for line in lines if line.get("task_id") == task_id]
    assert own and {line["task"] for line in own} == {"outbox.publish"}
    assert any(line["message"].startswith("relay ") for line in own), own


def _relay_line(text: str, task_id: str) -> bool:
    return any(
        f'"task_id": "{task_id}"' in line and '"message": "relay ' in line
        for line in text.splitlines()
    )


def test_gunicorn_writes_its_own_lines_as_json_too(settings: Settings, tmp_path: Path):
    s = settings.replace(log_format="json")
    server = ApiServer(s, tmp_path)  # gunicorn, as compose runs the API
    try:
        server.wait_ready()
        with urllib.request.urlopen(f"{server.url}/healthz") as response:
            assert response.status == 200
    finally:
        server.stop()
    text = server.process.text()
    lines = [json.loads(line) for line in text.splitlines()]  # each one parses
    assert {line["role"] for line in lines} == {"api"}
    assert any(line["logger"] == "gunicorn.error" for line in lines)
