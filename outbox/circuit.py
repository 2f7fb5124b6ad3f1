"""A circuit breaker for the broker: closed, open (paused) or half-open (probing)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Circuit:
    """Opens when the broker stops answering; after ``open_s`` one probe decides.

    While open the relay claims nothing, so no message spends an attempt on an
    outage. Each failed probe doubles the pause, up to ``max_open_s``.
    """

    open_s: float
    max_open_s: float = 30.0
    clock: Callable[[], float] = time.monotonic
    state: str = "closed"
    opened_at: float = 0.0
    pause_s: float = 0.0
    reason: str = ""

    def open(self, reason: str) -> None:
        """Stop relaying because of ``reason``."""
        if self.state == "closed":
            log.warning("broker circuit open: %s", reason)
            self.pause_s = self.open_s
        else:
            self.pause_s = min(self.pause_s * 2, self.max_open_s)
        self.state, self.opened_at, self.reason = "open", self.clock(), reason

    def close(self) -> None:
        """The broker answers again."""
        if self.state != "closed":
            log.info("broker circuit closed after: %s", self.reason)
        self.state, self.reason = "closed", ""

    def allows(self) -> bool:
        """True when relaying may proceed; moves open to half-open once the pause is over."""
        if self.state == "open" and self.clock() - self.opened_at >= self.pause_s:
            self.state = "half_open"
        return self.state != "open"
