"""Readiness checks of the three services every process depends on."""

from __future__ import annotations

import redis
from confluent_kafka.admin import AdminClient
from sqlalchemy import Engine, text

CHECK_TIMEOUT_S = 2.0


def check_database(engine: Engine) -> None:
    """Raise unless PostgreSQL answers a query."""
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))


def check_redis(client: redis.Redis) -> None:
    """Raise unless Redis answers PING."""
    if not client.ping():
        raise ConnectionError("Redis did not answer PING")


def check_kafka(admin: AdminClient) -> None:
    """Raise unless a Kafka broker answers a metadata request."""
    metadata = admin.list_topics(timeout=CHECK_TIMEOUT_S)
    if not metadata.brokers:
        raise ConnectionError("Kafka metadata names no broker")


def redis_client(url: str) -> redis.Redis:
    """A Redis client that fails fast instead of hanging a health check."""
    return redis.Redis.from_url(
        url, socket_timeout=CHECK_TIMEOUT_S, socket_connect_timeout=CHECK_TIMEOUT_S
    )
