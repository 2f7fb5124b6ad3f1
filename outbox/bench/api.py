"""``outbox bench api``: publish requests per second under gunicorn, next to a bare Flask
endpoint doing one INSERT into the same table, served the same way in the same run."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import text

from outbox.bench.load import post_load
from outbox.bench.report import Report, progress
from outbox.db import make_engine, make_sessionmaker
from outbox.devstack import processes
from outbox.devstack.server import free_port
from outbox.registry import register_topic
from outbox.settings import Settings

TOPIC = "bench.api"
TOKEN = "bench-token"
PAYLOAD = {"order_id": 12345, "status": "paid", "total": 99.5, "items": [1, 2, 3]}


class Server:
    """``app`` under gunicorn with the given workers and threads, on a free port."""

    def __init__(self, settings: Settings, name: str, app: str, workers: int, threads: int):
        self.port = free_port()
        spec = processes.gunicorn(
            name, app, self.port, workers=workers, threads=threads, log_level="warning"
        )
        self.process = processes.Process(spec, settings).start()
        self.process.wait_ready(30)

    def stop(self) -> None:
        self.process.stop()


def _truncate(settings: Settings) -> None:
    engine = make_engine(settings)
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE outbox_messages"))
    engine.dispose()


def _rate(
    settings: Settings,
    server: Server,
    path: str,
    body: Mapping[str, Any],
    token: str | None,
    seconds: float,
) -> tuple[float, int]:
    """Requests/s and errors of one measurement, on an emptied table."""
    _truncate(settings)
    return post_load(server.port, path, body, token=token, seconds=seconds)


def _listed(values: list[float], unit: str = "") -> str:
    return "median of " + ", ".join(f"{v:,.0f}{unit}" for v in values)


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

    Each round measures the bare endpoint and single publish back to back (in turn
    first), and the target compares the median of the rounds' ratios: on a shared
    machine, load that comes and goes then weighs on both sides of a ratio alike
    instead of on whichever ran at the wrong moment.
    """
    report = Report("api", command)
    s = settings.replace(api_tokens=(TOKEN,))
    with make_sessionmaker(make_engine(s)).begin() as session:
        register_topic(session, TOPIC)
    single = {"topic": TOPIC, "key": "customer-7", "payload": PAYLOAD}
    batch_body = {"messages": [dict(single, key=f"customer-{i}") for i in range(batch)]}

    quiet = s.replace(log_level="WARNING")
    bare_server = Server(quiet, "bare", "api.bare:create_bare_app()", workers, threads)
    api_server = Server(quiet, "api", "api:create_app()", workers, threads)
    sides = {
        "bare": (bare_server, "/bare", None),
        "one": (api_server, "/v1/messages", TOKEN),
    }
    rates: dict[str, list[float]] = {"bare": [], "one": []}
    errors = 0
    try:
        progress("warming up both servers")
        for server, path, token in sides.values():
            post_load(server.port, path, single, token=token, seconds=2.0)
        for n in range(rounds):
            for side in ("bare", "one") if n % 2 == 0 else ("one", "bare"):
                server, path, token = sides[side]
                progress(f"round {n + 1}/{rounds}: POST {path}, one message, {seconds:g} s")
                rate, failed = _rate(s, server, path, single, token, seconds)
                rates[side].append(rate)
                errors += failed
        progress(f"POST /v1/messages, {batch} messages per request, {seconds:g} s")
        many, failed = _rate(s, api_server, "/v1/messages", batch_body, TOKEN, seconds)
        errors += failed
    finally:
        bare_server.stop()
        api_server.stop()
    ratios = [100 * one / bare for one, bare in zip(rates["one"], rates["bare"], strict=True)]
    ratio = _median(ratios)
    report.add(
        "bare Flask + one INSERT (limit)", _median(rates["bare"]), "req/s", _listed(rates["bare"])
    )
    report.add("publish one message", _median(rates["one"]), "req/s", _listed(rates["one"]))
    report.add(f"publish batches of {batch}", many * batch, "msg/s", f"{many:,.0f} req/s")
    report.add("errors", errors, "responses")
    report.add("publish one / bare, per round", ratio, "%", _listed(ratios, " %"))
    report.target("single publish >= 80% of the bare INSERT endpoint", ratio, 80.0)
    return report
