"""Unauthenticated probes: ``/healthz`` (the process answers) and ``/readyz`` (its services do)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from flask import Blueprint, Response, jsonify

from api.state import state
from outbox.health import check_database, check_kafka, check_redis

log = logging.getLogger(__name__)
health = Blueprint("health", __name__)


@health.get("/healthz")
def healthz() -> Response:
    """The process is up."""
    return jsonify(status="ok")


@health.get("/readyz")
def readyz() -> tuple[Response, int]:
    """PostgreSQL, Redis and Kafka each answer; 503 naming the ones that do not.

    The probe is unauthenticated: it says which service is down and nothing more (the
    reason, with hosts and names, goes to the log)."""
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
            log.warning("readyz: %s does not answer: %s: %s", name, type(exc).__name__, exc)
            results[name] = "unavailable"
    ready = all(v == "ok" for v in results.values())
    return jsonify(status="ready" if ready else "unavailable", checks=results), (
        200 if ready else 503
    )
