"""``outbox bench api``: publish requests per second under gunicorn, next to a bare Flask
endpoint doing one INSERT into the same table, served the same way in the same run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from typing import Any

from sqlalchemy import text

from outbox.bench.load import post_load
from outbox.bench.report import Report, progress
from outbox.db import make_engine, make_sessionmaker
from outbox.embedded import free_port
from outbox.registry import register_topic
from outbox.settings import Settings

TOPIC = "bench.api"
TOKEN = "bench-token"
PAYLOAD = {"order_id": 12345, "status": "paid", "total": 99.5, "items": [1, 2, 3]}


class Gunicorn:
    """``gunicorn`` serving ``app`` with the given workers and threads."""

    def __init__(self, settings: Settings, app: str, workers: int, threads: int) -> None:
        self.port = free_port()
        env = {**os.environ, **settings.as_env(), "OUTBOX_LOG_LEVEL": "WARNING"}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "--bind",
                f"127.0.0.1:{self.port}",
                "--workers",
                str(workers),
                "--threads",
                str(threads),
                "--worker-class",
                "gthread",
                "--log-level",
                "warning",
                app,
            ],
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=1)
            except urllib.error.HTTPError:
                return  # it answers (404/405): up
            except OSError:
                time.sleep(0.1)
                continue
            return
        raise RuntimeError(f"gunicorn {app} did not start")

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(30)


def _truncate(settings: Settings) -> None:
    engine = make_engine(settings)
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE outbox_messages"))
    engine.dispose()


def _measure(
    settings: Settings,
    app: str,
    path: str,
    body: Mapping[str, Any],
    token: str | None,
    seconds: float,
    workers: int,
    threads: int,
) -> tuple[float, int]:
    _truncate(settings)
    server = Gunicorn(settings, app, workers, threads)
    try:
        post_load(server.port, path, body, token=token, seconds=1.0)  # warm up
        return post_load(server.port, path, body, token=token, seconds=seconds)
    finally:
        server.stop()


def run(
    settings: Settings, *, seconds: float, workers: int, threads: int, batch: int, command: str
) -> Report:
    """The API scenario on running services; returns the report."""
    report = Report("api", command)
    s = settings.replace(api_tokens=(TOKEN,))
    with make_sessionmaker(make_engine(s)).begin() as session:
        register_topic(session, TOPIC)
    single = {"topic": TOPIC, "key": "customer-7", "payload": PAYLOAD}

    progress(f"bare Flask INSERT endpoint, {seconds:g} s")
    bare, bare_errors = _measure(
        s, "api.bare:create_bare_app()", "/bare", single, None, seconds, workers, threads
    )
    report.add("bare Flask + one INSERT (limit)", bare, "req/s")
    progress(f"POST /v1/messages, one message per request, {seconds:g} s")
    one, one_errors = _measure(
        s, "api:create_app()", "/v1/messages", single, TOKEN, seconds, workers, threads
    )
    report.add("publish one message", one, "req/s")
    progress(f"POST /v1/messages, {batch} messages per request, {seconds:g} s")
    batch_body = {"messages": [dict(single, key=f"customer-{i}") for i in range(batch)]}
    many, many_errors = _measure(
        s, "api:create_app()", "/v1/messages", batch_body, TOKEN, seconds, workers, threads
    )
    report.add(f"publish batches of {batch}", many * batch, "msg/s", f"{many:,.0f} req/s")
    report.add("errors", bare_errors + one_errors + many_errors, "responses")
    report.add("publish one / bare", 100 * one / bare, "%")
    report.target("single publish >= 80% of the bare INSERT endpoint", one, 0.8 * bare)
    return report
