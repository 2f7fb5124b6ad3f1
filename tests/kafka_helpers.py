"""Reading what actually reached Kafka."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from typing import Any

from confluent_kafka import Consumer


@dataclasses.dataclass(frozen=True)
class Received:
    key: str | None
    value: Any
    headers: dict[str, str]
    partition: int
    offset: int

    @property
    def message_id(self) -> str:
        return self.headers["message_id"]


def consume_all(
    bootstrap: str, topic: str, expected: int, timeout_s: float = 60, settle_s: float = 1.0
) -> list[Received]:
    """Read ``topic`` from the start with a new group until ``expected`` messages have come
    and nothing more arrives for ``settle_s`` (so duplicates are seen too), or until timeout."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
            "fetch.wait.max.ms": 10,
        }
    )
    consumer.subscribe([topic])
    out: list[Received] = []
    deadline = time.monotonic() + timeout_s
    quiet_since = time.monotonic()
    try:
        while time.monotonic() < deadline:
            batch = [m for m in consumer.consume(1000, 0.2) if m.error() is None]
            if batch:
                quiet_since = time.monotonic()
            for m in batch:
                headers = {k: v.decode() for k, v in (m.headers() or [])}
                key = m.key().decode() if m.key() is not None else None
                out.append(Received(key, json.loads(m.value()), headers, m.partition(), m.offset()))
            if len(out) >= expected and time.monotonic() - quiet_since >= settle_s:
                break
    finally:
        consumer.close()
    return out
