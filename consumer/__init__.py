"""The consumer side: Kafka to inbox, and processing of inbox rows."""

from __future__ import annotations

from consumer.loop import Consumer

__all__ = ["Consumer"]
