"""``outbox dev``: the whole system on one machine, as real child processes.

It starts the embedded services (or uses the configured ones), applies the
migrations, then runs the API, a Celery worker, Celery beat, a consumer and
Flower. Each child runs in its own session so that a terminal's Ctrl-C reaches
only this supervisor, which then stops the children (whole process groups,
so prefork pool processes go too) and the services, in reverse order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from outbox import migrate
from outbox.embedded import EmbeddedServices, free_port
from outbox.settings import Settings, env_name

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 10.0
# Used only when OUTBOX_API_TOKENS is unset; the API listens on loopback in dev.
DEV_API_TOKEN = "dev-token"
FLOWER_PASSWORD_FILE = "flower-password"


@dataclasses.dataclass
class Child:
    """A child process and how to tell that it is ready."""

    name: str
    argv: list[str]
    ready_pattern: str | None = None
    ready_url: str | None = None
    ready_status: int = 200
    proc: subprocess.Popen[str] | None = None
    ready: threading.Event = dataclasses.field(default_factory=threading.Event)

    def matches(self, line: str) -> bool:
        return self.ready_pattern is not None and re.search(self.ready_pattern, line) is not None


def _http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def worker_argv(
    name: str, log_level: str, concurrency: int | None = None, *, quiet: bool = False
) -> list[str]:
    """The command line of a Celery worker named ``name@<host>``; ``quiet`` leaves out
    the start-up banner (with JSON logs, every line of output is a JSON object)."""
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "tasks",
        *(["--quiet"] if quiet else []),
        "worker",
        "-n",
        f"{name}@%h",
        "--loglevel",
        log_level,
    ]
    if concurrency is not None:
        argv += ["-c", str(concurrency), "--without-mingle", "--without-gossip"]
    return argv


def plan(
    settings: Settings, schedule_file: Path, *, workers: int = 1, consumers: int = 1
) -> list[Child]:
    """The children of ``outbox dev``, in start order: ``workers`` Celery workers and
    ``consumers`` consumer processes (of one group), the way compose scales them."""
    py = sys.executable
    quiet = settings.log_format == "json"  # no banners: every line is a JSON object
    celery = [py, "-m", "celery", "-A", "tasks", *(["--quiet"] if quiet else [])]
    level = settings.log_level.upper()
    api = f"http://{settings.api_host}:{settings.api_port}"
    flower = f"http://127.0.0.1:{settings.flower_port}"
    return [
        Child(
            "api",
            [
                py,
                "-m",
                "flask",
                "--app",
                "api:create_app()",
                "run",
                "--no-reload",
                "--host",
                settings.api_host,
                "--port",
                str(settings.api_port),
            ],
            ready_url=f"{api}/readyz",
        ),
        *(
            Child(
                _numbered("worker", n, workers),
                worker_argv(f"worker{n}", level, quiet=quiet),
                ready_pattern=r"@\S+ ready\.",
            )
            for n in range(1, workers + 1)
        ),
        Child(
            "beat",
            [*celery, "beat", "--loglevel", level, "-s", str(schedule_file)],
            ready_pattern=r"beat: Starting",
        ),
        *(
            Child(
                _numbered("consumer", n, consumers),
                [
                    py,
                    "-m",
                    "outbox",
                    "consume",
                    "--group",
                    settings.consumer_group,
                    "--topics",
                    ",".join(settings.consumer_topics),
                ],
                ready_pattern=r"consumer \S+ ready",
            )
            for n in range(1, consumers + 1)
        ),
        Child(
            "flower",
            [
                *celery,
                "flower",
                "--address=127.0.0.1",
                f"--port={settings.flower_port}",
                f"--basic-auth={settings.flower_user}:{settings.flower_password}",
            ],
            # Flower is up when it refuses a request without credentials.
            ready_url=f"{flower}/",
            ready_status=401,
        ),
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


class Supervisor:
    """Runs the children, relays their output with a name prefix, and stops them all."""

    def __init__(
        self,
        settings: Settings,
        children: list[Child],
        out: Output,
        on_start: Callable[[int], None] | None = None,
    ) -> None:
        self.settings = settings
        self.children = children
        self.out = out
        # Told each child's pid (the leader of its own process group) once it started.
        self.on_start = on_start
        self.stopping = threading.Event()
        self._width = max(len(c.name) for c in children)
        self._children_lock = threading.Lock()  # add, retire and restart_dead may race

    def say(self, name: str, line: str) -> None:
        self.out.write(f"{name:<{self._width}} | {line}\n")

    def start(self) -> None:
        for child in self.children:
            self._spawn(child)

    def _spawn(self, child: Child) -> None:
        env = {**os.environ, **self.settings.as_env(), "PYTHONUNBUFFERED": "1"}
        child.ready.clear()
        child.proc = subprocess.Popen(
            child.argv,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        if self.on_start is not None:
            self.on_start(child.proc.pid)
        threading.Thread(target=self._pump, args=(child,), daemon=True).start()
        if child.ready_url is not None:
            threading.Thread(target=self._probe, args=(child,), daemon=True).start()

    def add(self, child: Child) -> None:
        """Start one more child (a consumer joining its group, say)."""
        with self._children_lock:
            self.children.append(child)
            self._width = max(self._width, len(child.name))
            self._spawn(child)

    def retire(self, child: Child) -> None:
        """Stop one child for good, as :meth:`stop` stops them all."""
        with self._children_lock:
            self.children.remove(child)
        _signal_group(child, signal.SIGTERM)
        assert child.proc is not None
        try:
            child.proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self.say(child.name, f"did not stop in {STOP_GRACE_S:g} s; killing it")
        _signal_group(child, signal.SIGKILL)
        child.proc.wait()

    def restart_dead(self) -> list[str]:
        """Start again every child that exited, as a process supervisor would; return
        their names."""
        with self._children_lock:
            dead = [c for c in self.children if c.proc is not None and c.proc.poll() is not None]
            for child in dead:
                assert child.proc is not None
                # What its process group still holds (pool processes) goes with it.
                _signal_group(child, signal.SIGKILL)
                self.say(child.name, f"exited ({child.proc.returncode}); starting it again")
                self._spawn(child)
        return [c.name for c in dead]

    def _pump(self, child: Child) -> None:
        assert child.proc is not None and child.proc.stdout is not None
        for raw in child.proc.stdout:
            line = raw.rstrip("\n")
            self.say(child.name, line)
            if not child.ready.is_set() and child.matches(line):
                child.ready.set()

    def _probe(self, child: Child) -> None:
        assert child.ready_url is not None
        while not child.ready.is_set() and not self.stopping.is_set():
            if _http_status(child.ready_url) == child.ready_status:
                child.ready.set()
                return
            time.sleep(0.1)

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> list[str]:
        """Wait for every child; return the names of those not ready (or dead)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self.stopping.is_set():
            if self.dead():
                break
            if all(c.ready.is_set() for c in self.children):
                return []
            time.sleep(0.05)
        return [c.name for c in self.children if not c.ready.is_set()]

    def dead(self) -> list[str]:
        """Children that have exited."""
        return [c.name for c in self.children if c.proc is not None and c.proc.poll() is not None]

    def stop(self) -> None:
        """SIGTERM every child's process group, last started first; SIGKILL what lingers."""
        self.stopping.set()
        running = [c for c in reversed(self.children) if c.proc is not None]
        for child in running:
            _signal_group(child, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for child in running:
            assert child.proc is not None
            try:
                child.proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                self.say(child.name, f"did not stop in {STOP_GRACE_S:g} s; killing it")
            # Pool processes of a stopped parent may linger: clear the group either way.
            _signal_group(child, signal.SIGKILL)
            child.proc.wait()


def _signal_group(child: Child, sig: signal.Signals) -> None:
    assert child.proc is not None
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.proc.pid, sig)


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
    """Run the system until SIGINT or SIGTERM, or until a child dies; return an exit code."""
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
            dead = supervisor.dead()
            if dead:
                out.write(f"outbox dev: {', '.join(dead)} exited; stopping everything\n")
                return 1
        return 0
    finally:
        out.write("outbox dev: stopping\n")
        if supervisor is not None:
            supervisor.stop()
        services.stop()
        out.write("outbox dev: stopped\n")
