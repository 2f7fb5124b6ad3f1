"""Stops the embedded services (and the children of ``outbox dev``) when the process that
started them dies without stopping them (SIGKILL, a crash, a lost terminal).

:class:`~outbox.devstack.services.EmbeddedServices` starts ``python -m
outbox.devstack.watchdog`` in a session of its own, its standard input a pipe that only
the starting process holds.
The starting process writes one JSON line per service as it starts, and ``"disarm"``
when it stops them itself. The end of input without ``"disarm"`` can only mean that
it died: the watchdog then stops every service it was told of, newest first.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DISARM = "disarm"
GRACE_S = 5.0


def start_ticks(pid: int) -> str | None:
    """The process's start time (``/proc/<pid>/stat``), to tell it from a later one with its
    pid; None where there is no ``/proc``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def process_spec(pid: int) -> dict[str, Any]:
    """What the watchdog needs to stop a server process."""
    return {"kind": "process", "pid": pid, "start": start_ticks(pid)}


def group_spec(pid: int) -> dict[str, Any]:
    """What the watchdog needs to stop a child that leads a process group of its own (its
    pool processes, say, go with it)."""
    return {"kind": "group", "pid": pid, "start": start_ticks(pid)}


def _stop_process(pid: int, start: str | None, group: bool = False) -> None:
    if start_ticks(pid) != start:
        return  # gone already (or the pid is another process's now)
    kill = os.killpg if group else os.kill
    with contextlib.suppress(ProcessLookupError):
        kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + GRACE_S
        while time.monotonic() < deadline and start_ticks(pid) == start:
            time.sleep(0.1)
        # A group may keep members (pool processes) after its leader went.
        if group or start_ticks(pid) == start:
            kill(pid, signal.SIGKILL)


def stop(spec: dict[str, Any]) -> None:
    """Stop one service described by ``spec``."""
    if spec["kind"] in ("process", "group"):
        _stop_process(spec["pid"], spec["start"], group=spec["kind"] == "group")
    elif spec["kind"] == "postgres":
        subprocess.run(
            [spec["pg_ctl"], "-D", spec["data"], "-m", "fast", "-w", "stop"],
            user=spec["user"],
            capture_output=True,
            timeout=60,
            check=False,
        )


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the starting process
    services: list[dict[str, Any]] = []
    for line in sys.stdin:
        message = json.loads(line)
        if message == DISARM:
            return
        services.append(message)
    for spec in reversed(services):
        stop(spec)


if __name__ == "__main__":
    main()
