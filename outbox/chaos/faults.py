"""The faults the ledger injects, one every few seconds, in an order drawn from a seed.

Every kind comes once in each round of all kinds (in a seeded order), so a run of as
many faults as there are kinds has met each. What a fault kills, the supervisor
starts again (:meth:`outbox.devstack.dev.Supervisor.keep_alive`). Which process a fault hits
and for how long is drawn from the same seed; when the faults land relative to the
system's own timing is not, so two runs of one seed meet the same faults, not the
same interleavings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from outbox.devstack.dev import Child, Supervisor
from outbox.devstack.services import EmbeddedServices

PAUSE_S = (2.0, 8.0)
# Between the starts of two faults; a pause may still last when the next one begins.
GAP_S = (2.0, 4.0)
TRIES = 10


@dataclasses.dataclass(frozen=True)
class Fault:
    """One injected fault: its kind, what it hit, when (epoch seconds) and for how long."""

    kind: str
    target: str
    at: float
    lasted_s: float


class Injector:
    """Injects faults into the supervisor's children and the embedded services."""

    KINDS = (
        "kill worker",
        "kill pool process",
        "pause worker",
        "pause consumer",
        "pause broker",
        "kill consumer",
        "kill beat",
        "kill api",
        "restart redis",
        "restart postgres (fast)",
        "restart postgres (immediate)",
        "rebalance",
        "stall relay past its lease",
    )

    def __init__(
        self,
        supervisor: Supervisor,
        services: EmbeddedServices,
        rng: random.Random,
        relay_lease_s: float,
        add_consumer: Callable[[], Child],
    ) -> None:
        self.supervisor = supervisor
        self.services = services
        self.rng = rng
        self.add_consumer = add_consumer
        self.kinds: dict[str, Callable[[random.Random], str]] = {
            "kill worker": lambda r: self._kill(r, "worker"),
            "kill pool process": self._kill_pool_process,
            "pause worker": lambda r: self._pause(r, "worker", r.uniform(*PAUSE_S)),
            "pause consumer": lambda r: self._pause(r, "consumer", r.uniform(*PAUSE_S)),
            "pause broker": self._pause_broker,
            "kill consumer": lambda r: self._kill(r, "consumer"),
            "kill beat": lambda r: self._kill(r, "beat"),
            "kill api": lambda r: self._kill(r, "api"),
            "restart redis": lambda r: self._restart("redis"),
            "restart postgres (fast)": lambda r: self._restart("postgres", "fast"),
            "restart postgres (immediate)": lambda r: self._restart("postgres", "immediate"),
            "rebalance": self._rebalance,
            "stall relay past its lease": lambda r: self._pause(r, "worker", relay_lease_s + 3),
        }
        assert tuple(self.kinds) == self.KINDS
        self.faults: list[Fault] = []
        self._order: list[str] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._services_lock = threading.Lock()  # one service restart at a time

    def start_next(self) -> None:
        """Inject the next fault in a thread of its own (a pause lasts seconds, while the
        next fault may begin); what it was joins :attr:`faults` once it is over."""
        if not self._order:
            self._order = sorted(self.kinds)
            self.rng.shuffle(self._order)
        kind = self._order.pop()
        # Drawn here, in order, so that the seed alone decides every choice.
        rng = random.Random(self.rng.random())
        thread = threading.Thread(target=self._inject, args=(kind, rng), daemon=True)
        self._threads.append(thread)
        thread.start()

    def _inject(self, kind: str, rng: random.Random) -> None:
        for _ in range(TRIES):
            started = time.time()
            try:
                target = self.kinds[kind](rng)
            except LookupError:  # no process to hit just now (one is starting again)
                time.sleep(1.0)
                continue
            with self._lock:
                self.faults.append(Fault(kind, target, started, round(time.time() - started, 2)))
            return

    def join(self) -> None:
        """Wait for every fault to be over (paused processes running again)."""
        for thread in self._threads:
            thread.join(120)

    def gap_s(self) -> float:
        return self.rng.uniform(*GAP_S)

    def _pick(self, rng: random.Random, role: str) -> Child:
        running = [
            c for c in list(self.supervisor.children) if c.name.startswith(role) and c.alive()
        ]
        if not running:
            raise LookupError(f"no {role} is running")
        return rng.choice(running)

    def _kill(self, rng: random.Random, role: str) -> str:
        child = self._pick(rng, role)
        os.kill(child.pid, signal.SIGKILL)
        return child.name

    def _pause(self, rng: random.Random, role: str, seconds: float) -> str:
        child = self._pick(rng, role)
        _stop_for(child.pid, seconds, group=True)
        return f"{child.name} for {seconds:.1f} s"

    def _kill_pool_process(self, rng: random.Random) -> str:
        child = self._pick(rng, "worker")
        pool = _children(child.pid)
        if not pool:
            raise LookupError(f"{child.name} has no pool process yet")
        victim = rng.choice(pool)
        os.kill(victim, signal.SIGKILL)
        return f"{child.name} pool process {victim}"

    def _pause_broker(self, rng: random.Random) -> str:
        seconds = rng.uniform(*PAUSE_S)
        _stop_for(self.services.pid("kafka"), seconds, group=False)
        return f"broker for {seconds:.1f} s"

    def _restart(self, kind: str, mode: str = "fast") -> str:
        with self._services_lock:
            return self.services.restart(kind, mode)

    def _rebalance(self, rng: random.Random) -> str:
        extra = self.add_consumer()
        time.sleep(rng.uniform(4.0, 8.0))
        self.supervisor.retire(extra)
        return extra.name


def _stop_for(pid: int, seconds: float, *, group: bool) -> None:
    send = os.killpg if group else os.kill
    send(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        with contextlib.suppress(ProcessLookupError):  # killed meanwhile: nothing to resume
            send(pid, signal.SIGCONT)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found
