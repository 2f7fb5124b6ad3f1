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


def _rate(
    settings: Settings,
    server: Gunicorn,
    path: str,
    body: Mapping[str, Any],
    token: str | None,
    seconds: float,
) -> tuple[float, int]:
    """Requests/s and errors of one round, on an emptied table."""
    _truncate(settings)
    post_load(server.port, path, body, token=token, seconds=min(seconds, 2.0))  # warm up
    return post_load(server.port, path, body, token=token, seconds=seconds)


def _rounds(rates: list[float]) -> str:
    return "median of " + ", ".join(f"{r:,.0f}" for r in rates)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def run(
    settings: Settings,
    *,
    seconds: float,
    rounds: int,
    workers: int,
    threads: int,
    batch: int,
    command: str,
) -> Report:
    """The API scenario on running services; returns the report.

    The bare endpoint and single publish take turns, ``rounds`` times each, and the
    medians are compared: on a shared machine, load that comes and goes then weighs on
    both alike instead of on whichever ran at the wrong moment.
    """
    report = Report("api", command)
    s = settings.replace(api_tokens=(TOKEN,))
    with make_sessionmaker(make_engine(s)).begin() as session:
        register_topic(session, TOPIC)
    single = {"topic": TOPIC, "key": "customer-7", "payload": PAYLOAD}
    batch_body = {"messages": [dict(single, key=f"customer-{i}") for i in range(batch)]}

    bare_server = Gunicorn(s, "api.bare:create_bare_app()", workers, threads)
    api_server = Gunicorn(s, "api:create_app()", workers, threads)
    bare: list[float] = []
    one: list[float] = []
    errors = 0
    try:
        for n in range(1, rounds + 1):
            progress(f"round {n}/{rounds}: bare Flask INSERT endpoint, {seconds:g} s")
            rate, failed = _rate(s, bare_server, "/bare", single, None, seconds)
            bare.append(rate)
            errors += failed
            progress(f"round {n}/{rounds}: POST /v1/messages, one message, {seconds:g} s")
            rate, failed = _rate(s, api_server, "/v1/messages", single, TOKEN, seconds)
            one.append(rate)
            errors += failed
        progress(f"POST /v1/messages, {batch} messages per request, {seconds:g} s")
        many, failed = _rate(s, api_server, "/v1/messages", batch_body, TOKEN, seconds)
        errors += failed
    finally:
        bare_server.stop()
        api_server.stop()
    report.add("bare Flask + one INSERT (limit)", _median(bare), "req/s", _rounds(bare))
    report.add("publish one message", _median(one), "req/s", _rounds(one))
    report.add(f"publish batches of {batch}", many * batch, "msg/s", f"{many:,.0f} req/s")
    report.add("errors", errors, "responses")
    report.add("publish one / bare", 100 * _median(one) / _median(bare), "%")
    report.target(
        "single publish >= 80% of the bare INSERT endpoint", _median(one), 0.8 * _median(bare)
    )
    return report
