"""How long to wait before the next attempt: exponential backoff with jitter."""

from __future__ import annotations

import dataclasses
import random
from typing import Any


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """``delay(attempt)`` is uniform in ``[ceiling(attempt) / factor, ceiling(attempt)]``,
    where ``ceiling(attempt) = min(cap_s, base_s * factor ** (attempt - 1))`` (the first
    delay is uniform in ``[0, base_s]``).

    The jitter spreads retries of many messages that failed together, so a recovering
    dependency is not hit by all of them at once; drawing each delay from its own band
    rather than from zero keeps one message's waits growing until the cap, so a failing
    message backs off for real. ``attempt`` counts from 1 (the delay after the first
    failure). The database row's ``attempts`` and due time are the source of truth,
    never a timer in a process.
    """

    base_s: float = 1.0
    factor: float = 2.0
    cap_s: float = 600.0
    max_attempts: int = 10

    @classmethod
    def of_group(cls, row: Any) -> RetryPolicy:
        """The policy of a consumer group: from a row (or model) with its ``retry_base_s``,
        ``retry_factor``, ``retry_cap_s`` and, where it has one, ``max_attempts``."""
        return cls(
            base_s=row.retry_base_s,
            factor=row.retry_factor,
            cap_s=row.retry_cap_s,
            max_attempts=getattr(row, "max_attempts", cls.max_attempts),
        )

    def ceiling(self, attempt: int) -> float:
        """The largest delay after failed attempt number ``attempt``."""
        if attempt < 1:
            raise ValueError("attempt counts from 1")
        # Cap the exponent too, so huge attempt numbers cannot overflow a float.
        exponent = min(attempt - 1, 64)
        return min(self.cap_s, self.base_s * self.factor**exponent)

    def floor(self, attempt: int) -> float:
        """The smallest delay after failed attempt number ``attempt``."""
        return 0.0 if attempt <= 1 else self.ceiling(attempt) / max(self.factor, 1.0)

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """A random delay in ``[floor(attempt), ceiling(attempt)]``."""
        return (rng or random).uniform(self.floor(attempt), self.ceiling(attempt))

    def exhausted(self, attempts: int) -> bool:
        """True when ``attempts`` failures use up the budget."""
        return attempts >= self.max_attempts
