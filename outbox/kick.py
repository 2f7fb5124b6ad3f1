"""At most one pending relay kick, through a flag in Redis.

A publisher that commits sets the flag with ``SET NX`` and sends a kick only if
it set it; the relay task deletes the flag before it claims. So a row committed
before the delete is seen by that claim, and a row committed after it queues a
new kick: no row waits for beat, and the queue never holds more than one kick
however fast messages are published. The flag expires with the kick, so a lost
kick cannot silence the next ones for long.
"""

from __future__ import annotations

import redis

FLAG = "outbox:relay:kick-pending"


def claim_kick(client: redis.Redis, ttl_ms: int) -> bool:
    """True when the caller should send a kick (no kick is pending)."""
    return bool(client.set(FLAG, b"1", nx=True, px=ttl_ms))


def kick_started(client: redis.Redis) -> None:
    """Called by the relay task before it claims: later commits may kick again."""
    client.delete(FLAG)
