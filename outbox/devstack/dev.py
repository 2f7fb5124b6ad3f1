"""``outbox dev``: the whole system on one machine, as real child processes.

It starts the embedded services (or uses the configured ones), applies the
migrations, then runs the API, Celery workers, Celery beat, consumers and Flower
from the launcher (:mod:`outbox.devstack.processes`). A child that exits is started
again after a short delay that grows while it keeps failing, as compose's restart
policy and Kubernetes do; everything stops on Ctrl-C or SIGTERM, or when a child
exits again and again before it ever gets ready.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from outbox import migrate
from outbox.devstack import processes
from outbox.devstack.processes import Process, Spec
from outbox.devstack.server import free_port
from outbox.devstack.services import EmbeddedServices
from outbox.settings import Settings, env_name

log = logging.getLogger(__name__)

# Used only when OUTBOX_API_TOKENS is unset; the API listens on loopback in dev.
DEV_API_TOKEN = "dev-token"
FLOWER_PASSWORD_FILE = "flower-password"
# A child that exits is started again after RESTART_BASE_S, doubled for each exit
# in a row up to RESTART_MAX_S; the count starts over once it has been ready for
# RESTART_RESET_S. One that exits GIVE_UP_AFTER times in a row without getting
# ready stops everything.
RESTART_BASE_S = 0.5
RESTART_MAX_S = 15.0
RESTART_RESET_S = 30.0
GIVE_UP_AFTER = 5


def plan(
    settings: Settings, schedule_file: Path, *, workers: int = 1, consumers: int = 1
) -> list[Spec]:
    """The children of ``outbox dev``, in start order: ``workers`` Celery workers and
    ``consumers`` consumer processes (of one group), the way compose scales them."""
    level = settings.log_level.upper()
    return [
        processes.api(settings),
        *(
            processes.worker(settings, _numbered("worker", n, workers), log_level=level)
            for n in range(1, workers + 1)
        ),
        processes.beat(settings, schedule_file, log_level=level),
        *(
            processes.consumer(
                settings,
                _numbered("consumer", n, consumers),
                group=settings.consumer_group,
                topics=settings.consumer_topics,
            )
            for n in range(1, consumers + 1)
        ),
        processes.flower(settings),
    ]


def _numbered(role: str, n: int, count: int) -> str:
    """A child's name: ``worker`` when there is one, ``worker1``, ``worker2``... else."""
    return role if count == 1 else f"{role}{n}"


class Output:
    """Where ``outbox dev`` writes; once that is gone (a closed pipe, a lost terminal) its
    lines are dropped, so that stopping never fails on them."""

    def __init__(self, out: TextIO) -> None:
        self.out: TextIO | None = out
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        with self._lock:
            if self.out is None:
                return
            try:
                self.out.write(text)
                self.out.flush()
            except (OSError, ValueError):
                self.out = None


class Child(Process):
    """A supervised process: its output prefixed with its name, and its run of exits."""

    def __init__(self, spec: Spec, settings: Settings, say: Callable[[str, str], None]) -> None:
        super().__init__(spec, settings, on_line=lambda line: say(spec.name, line))
        self.exits = 0  # in a row, without a long enough ready run between them
        self.restart_at: float | None = None
        self.ready_since: float | None = None


class GaveUp(Exception):
    """A child kept exiting before it got ready."""


class Supervisor:
    """Runs the children, relays their output with a name prefix, restarts those that
    exit, and stops them all."""

    def __init__(
        self,
        settings: Settings,
        specs: list[Spec],
        out: Output,
        on_start: Callable[[int], None] | None = None,
        give_up_after: int | None = GIVE_UP_AFTER,
    ) -> None:
        self.settings = settings
        self.give_up_after = give_up_after
        self.out = out
        self.children = [Child(spec, settings, self.say) for spec in specs]
        # Told each child's pid (the leader of its own process group) once it started.
        self.on_start = on_start
        self.stopping = threading.Event()
        self._width = max(len(c.name) for c in self.children)
        self._children_lock = threading.Lock()  # add, retire and keep_alive may race

    def say(self, name: str, line: str) -> None:
        self.out.write(f"{name:<{self._width}} | {line}\n")

    def start(self) -> None:
        for child in self.children:
            self._spawn(child)

    def _spawn(self, child: Child) -> None:
        child.start()
        if self.on_start is not None:
            self.on_start(child.pid)

    def add(self, spec: Spec) -> Child:
        """Start one more child (a consumer joining its group, say)."""
        child = Child(spec, self.settings, self.say)
        with self._children_lock:
            self.children.append(child)
            self._width = max(self._width, len(child.name))
            self._spawn(child)
        return child

    def retire(self, child: Child) -> None:
        """Stop one child for good, as :meth:`stop` stops them all."""
        with self._children_lock:
            self.children.remove(child)
        if not child.stop():
            self.say(child.name, f"did not stop in {processes.STOP_GRACE_S:g} s; killed")

    def keep_alive(self, now: float | None = None) -> list[str]:
        """Start again every child that exited once its delay is over; return the names
        of those started. Raise :class:`GaveUp` for a child that exited
        ``give_up_after`` times in a row without getting ready."""
        now = time.monotonic() if now is None else now
        restarted = []
        with self._children_lock:
            for child in self.children:
                if child.ready.is_set() and child.ready_since is None:
                    child.ready_since = now
                if child.ready_since is not None and now - child.ready_since >= RESTART_RESET_S:
                    child.exits = 0
                if child.alive() or self.stopping.is_set():
                    continue
                if child.restart_at is None:
                    self._exited(child, now)
                elif now >= child.restart_at:
                    child.restart_at = child.ready_since = None
                    self._spawn(child)
                    restarted.append(child.name)
        return restarted

    def _exited(self, child: Child, now: float) -> None:
        assert child.proc is not None
        # What its process group still holds (pool processes) goes with it.
        child.signal_group(signal.SIGKILL)
        never_ready = not child.ready.is_set()
        child.exits += 1
        if never_ready and self.give_up_after is not None and child.exits >= self.give_up_after:
            raise GaveUp(f"{child.name} exited {child.exits} times in a row before it got ready")
        delay = min(RESTART_MAX_S, RESTART_BASE_S * 2 ** (child.exits - 1))
        child.restart_at = now + delay
        self.say(
            child.name,
            f"exited ({child.proc.returncode}); starting it again in {delay:g} s",
        )

    def wait_ready(self, timeout_s: float = processes.READY_TIMEOUT_S) -> list[str]:
        """Wait for every child, restarting those that exit meanwhile; return the names
        of those not ready in time. Raise :class:`GaveUp` as :meth:`keep_alive` does."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self.stopping.is_set():
            self.keep_alive()
            if all(c.ready.is_set() for c in self.children):
                return []
            time.sleep(0.05)
        return [c.name for c in self.children if not c.ready.is_set()]

    def stop(self) -> None:
        """SIGTERM every child's process group, last started first; SIGKILL what lingers."""
        self.stopping.set()
        for name in processes.stop_all(list(self.children)):
            self.say(name, f"did not stop in {processes.STOP_GRACE_S:g} s; killed")


def _resolve_ports(settings: Settings) -> Settings:
    changes = {}
    if settings.api_port == 0:
        changes["api_port"] = free_port()
    if settings.flower_port == 0:
        changes["flower_port"] = free_port()
    return settings.replace(**changes) if changes else settings


def flower_password(root: Path) -> str:
    """The data folder's own Flower password: made at its first start, kept in the folder
    (readable by its owner only) and the same on every start after."""
    path = root / FLOWER_PASSWORD_FILE
    if not path.exists():
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(18))
    return path.read_text().strip()


def _banner(settings: Settings, elapsed_s: float, out: Output) -> None:
    api = f"http://{settings.api_host}:{settings.api_port}"
    lines = [
        f"outbox dev: all ready in {elapsed_s:.1f} s",
        f"  API          {api}  (docs {api}/docs, token {settings.api_tokens[0]})",
        f"  Dashboard    {api}/dashboard  (any user name, the token as password)",
        f"  Metrics      {api}/metrics  (Prometheus, the same token)",
        f"  Flower       http://127.0.0.1:{settings.flower_port}"
        f"  (user {settings.flower_user}, password {settings.flower_password})",
        f"  PostgreSQL   {settings.database_url}",
        f"  Redis        {settings.redis_url}",
        f"  Kafka        {settings.kafka_bootstrap}",
        "To reach the same services from another shell:",
        f"  export {env_name('database_url')}={settings.database_url}",
        f"  export {env_name('redis_url')}={settings.redis_url}",
        f"  export {env_name('kafka_bootstrap')}={settings.kafka_bootstrap}",
        "Ctrl-C stops everything.",
    ]
    out.write("\n".join(lines) + "\n")


def run(
    settings: Settings, stream: TextIO = sys.stdout, *, workers: int = 1, consumers: int = 1
) -> int:
    """Run the system until SIGINT or SIGTERM, or until a child keeps failing at start;
    return an exit code."""
    out = Output(stream)
    started = time.monotonic()
    stop_requested = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    root = Path(settings.dev_dir).resolve()
    settings = settings.replace(
        api_tokens=settings.api_tokens or (DEV_API_TOKEN,),
        flower_password=settings.flower_password or flower_password(root),
    )
    services = EmbeddedServices(settings, root)
    settings = services.start()
    supervisor: Supervisor | None = None
    try:
        out.write(
            f"outbox dev: services up in {time.monotonic() - started:.1f} s (data in {root})\n"
        )
        migrate.upgrade(settings)
        settings = _resolve_ports(settings)
        supervisor = Supervisor(
            settings,
            plan(settings, root / "celerybeat-schedule", workers=workers, consumers=consumers),
            out,
            # Should this process be killed, the watchdog stops the children too.
            on_start=services.watch_group,
        )
        supervisor.start()
        not_ready = supervisor.wait_ready()
        if stop_requested.is_set():
            return 0
        if not_ready:
            out.write(f"outbox dev: not ready: {', '.join(not_ready)}; stopping\n")
            return 1
        _banner(settings, time.monotonic() - started, out)
        while not stop_requested.wait(0.2):
            supervisor.keep_alive()
        return 0
    except GaveUp as exc:
        out.write(f"outbox dev: {exc}; stopping everything\n")
        return 1
    finally:
        out.write("outbox dev: stopping\n")
        if supervisor is not None:
            supervisor.stop()
        services.stop()
        out.write("outbox dev: stopped\n")
