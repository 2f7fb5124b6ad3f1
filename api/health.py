"""Unauthenticated probes: ``/healthz`` (the process answers) and ``/readyz`` (its services do)."""

from __future__ import annotations

from collections.abc import Callable

from flask import Blueprint, Response, jsonify

from api.state import state
from outbox.health import check_database, check_kafka, check_redis

health = Blueprint("health", __name__)


@health.get("/healthz")
def healthz() -> Response:
    """The process is up."""
    return jsonify(status="ok")


@health.get("/readyz")
def readyz() -> tuple[Response, int]:
    """PostgreSQL, Redis and Kafka each answer; 503 naming the ones that do not."""
    s = state()
    checks: dict[str, Callable[[], None]] = {
        "postgresql": lambda: check_database(s.engine),
        "redis": lambda: check_redis(s.redis),
        "kafka": lambda: check_kafka(s.kafka_admin),
    }
    results: dict[str, str] = {}
    for name, check in checks.items():
        try:
            check()
            results[name] = "ok"
        except Exception as exc:
            results[name] = f"error: {type(exc).__name__}: {exc}"
    ready = all(v == "ok" for v in results.values())
    return jsonify(status="ready" if ready else "unavailable", checks=results), (
        200 if ready else 503
    )
