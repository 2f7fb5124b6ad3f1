"""How long a relay or lane run may go on: its time, cut short when its worker stops."""

from __future__ import annotations

import time
from collections.abc import Callable


class Budget:
    """``seconds`` from now, or none left once ``stopping()`` says the worker is
    shutting down (looked at between batches and while waiting, so a run that is busy
    for its whole budget still ends within a batch of a stop)."""

    def __init__(self, seconds: float, stopping: Callable[[], bool] | None = None) -> None:
        self.deadline = time.monotonic() + seconds
        self._stopping = stopping

    def left(self) -> float:
        """Seconds left; 0 once the worker stops."""
        if self._stopping is not None and self._stopping():
            return 0.0
        return max(self.deadline - time.monotonic(), 0.0)

    def over(self) -> bool:
        return self.left() <= 0.0
