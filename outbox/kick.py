"""At most one pending kick of the relay (or of a consumer lane), through a flag in Redis.

A publisher that commits sets the flag with ``SET NX`` and sends a kick only if
it set it; the relay task deletes the flag before it claims. So a row committed
before the delete is seen by that claim, and a row committed after it queues a
new kick: no row waits for beat, and the queue never holds more than one kick
however fast messages are published. The flag expires with the kick, so a lost
kick cannot silence the next ones for long.

Consumer lanes use the same scheme, one flag per (group, lane): the consumer
sets it after an inbox commit, the lane task deletes it before it claims.
"""

from __future__ import annotations

from typing import Any

import redis

from outbox.settings import Settings

FLAG = "outbox:relay:kick-pending"


def kick_expires_s(settings: Settings) -> float:
    """How long a relay kick (and its flag) lives: ticks and kicks are interchangeable, so
    one not run within a beat interval (a second at least) is dropped, not queued up."""
    return max(settings.publish_interval_s, 1.0)


def lane_flag(group: str, lane: int) -> str:
    """The pending-kick flag of one consumer lane (the same scheme as the relay's)."""
    return f"outbox:lane:{group}:{lane}:kick-pending"


class KickClaimer:
    """Sets the pending-kick flag (``SET NX``) on one connection of its own, for one
    thread that claims up to hundreds of times a second: a pooled redis-py command
    costs several times this bare round trip. A broken connection is dropped and the
    error raised; the next claim reconnects."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self._pool = redis.ConnectionPool.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._conn: Any = None

    def claim(self, ttl_ms: int, flag: str = FLAG) -> bool:
        """True when the caller should send a kick (no kick is pending)."""
        if self._conn is None:
            self._conn = self._pool.make_connection()
        try:
            self._conn.send_command("SET", flag, "1", "NX", "PX", ttl_ms, check_health=False)
            return self._conn.read_response() is not None
        except Exception:
            self._conn.disconnect()
            self._conn = None
            raise


def claim_kicks(client: redis.Redis, ttl_ms: int, flags: list[str]) -> list[bool]:
    """For each flag, whether the caller should send its kick: one round trip for all."""
    pipe = client.pipeline(transaction=False)
    for flag in flags:
        pipe.set(flag, b"1", nx=True, px=ttl_ms)
    return [bool(r) for r in pipe.execute()]


def kick_started(client: redis.Redis, *flags: str) -> None:
    """Called by a task before it looks for work: later commits may kick again.
    ``flags`` default to the relay's."""
    client.delete(*(flags or (FLAG,)))
