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

import redis

FLAG = "outbox:relay:kick-pending"


def lane_flag(group: str, lane: int) -> str:
    """The pending-kick flag of one consumer lane (the same scheme as the relay's)."""
    return f"outbox:lane:{group}:{lane}:kick-pending"


def claim_kick(client: redis.Redis, ttl_ms: int, flag: str = FLAG) -> bool:
    """True when the caller should send a kick (no kick is pending)."""
    return bool(client.set(flag, b"1", nx=True, px=ttl_ms))


def claim_kicks(client: redis.Redis, ttl_ms: int, flags: list[str]) -> list[bool]:
    """:func:`claim_kick` for several flags in one round trip."""
    pipe = client.pipeline(transaction=False)
    for flag in flags:
        pipe.set(flag, b"1", nx=True, px=ttl_ms)
    return [bool(r) for r in pipe.execute()]


def kick_started(client: redis.Redis, flag: str = FLAG) -> None:
    """Called by a task before it looks for work: later commits may kick again."""
    client.delete(flag)
