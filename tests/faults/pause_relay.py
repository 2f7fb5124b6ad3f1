"""Imported by a worker under test (OUTBOX_HANDLER_MODULES): the first relay batch stops
after its messages are in Kafka and before its rows are marked sent, and says so in a file."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from outbox.relay import Claim, Relay

_marker = Path(os.environ["OUTBOX_TEST_PAUSE_FILE"])
_mark = Relay._mark


def _paused_mark(self: Relay, claim: Claim, *args: Any, **kw: Any) -> None:
    if not _marker.exists():
        _marker.write_text(
            json.dumps(
                {"owner": self.owner, "ids": sorted(claim.attempts), "token": str(claim.token)}
            )
        )
        time.sleep(600)
    _mark(self, claim, *args, **kw)


Relay._mark = _paused_mark  # type: ignore[method-assign]
