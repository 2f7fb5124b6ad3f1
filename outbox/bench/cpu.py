"""CPU time of the processes that do a benchmark's work, read from ``/proc``.

A role (publisher, PostgreSQL, broker, worker, ...) is one or more process trees; its
CPU time is the user and system time of every live process in its trees, each with
what it collected from its ended children (``cutime`` and ``cstime``), so a pool
process or a backend that ends during a measurement still counts once. The publisher
is this process alone, without its children (they are roles of their own).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from sqlalchemy import Engine, text

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
PUBLISHER = "publisher"


def _stats() -> dict[int, tuple[int, float, float]]:
    """Every process: parent pid, own CPU seconds, and CPU seconds of reaped children."""
    out: dict[int, tuple[int, float, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # After the command: state, ppid, ... utime (12), stime (13), cutime, cstime.
        ppid = int(fields[1])
        own = (int(fields[11]) + int(fields[12])) * TICK_S
        reaped = (int(fields[13]) + int(fields[14])) * TICK_S
        out[int(entry.name)] = (ppid, own, reaped)
    return out


def _tree_cpu(roots: Iterable[int], stats: Mapping[int, tuple[int, float, float]]) -> float:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total = 0.0
    seen: set[int] = set()
    todo = [r for r in roots if r in stats]
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        _, own, reaped = stats[pid]
        total += own + reaped
        todo += children.get(pid, [])
    return total


def find_pids(pattern: str) -> list[int]:
    """Processes whose command line matches ``pattern`` (a regular expression)."""
    found = []
    compiled = re.compile(pattern)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if compiled.search(cmdline) and int(entry.name) != os.getpid():
                found.append(int(entry.name))
    return found


def postmaster_pid(engine: Engine) -> int | None:
    """The PostgreSQL server's main process, when it runs on this machine."""
    with engine.connect() as conn:
        backend = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
    try:
        fields = Path(f"/proc/{backend}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None  # another machine's
    return int(fields[1])


class CpuMeter:
    """CPU seconds per role since :meth:`start`."""

    def __init__(self, roles: Mapping[str, Iterable[int]]) -> None:
        self.roles = {role: list(pids) for role, pids in roles.items()}
        self._start: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        stats = _stats()
        now = {role: _tree_cpu(pids, stats) for role, pids in self.roles.items()}
        _, own, _ = stats[os.getpid()]
        now[PUBLISHER] = own
        return now

    def start(self) -> None:
        self._start = self._now()

    def seconds(self) -> dict[str, float]:
        """CPU seconds each role used since :meth:`start`."""
        now = self._now()
        return {role: now[role] - self._start.get(role, 0.0) for role in now}
