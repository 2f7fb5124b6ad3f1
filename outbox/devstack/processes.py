"""The one launcher: every process of the system, how to tell it is ready, and how it stops.

A :class:`Spec` is a process's command line and readiness: a line of its output that
matches ``ready_pattern``, or an HTTP answer from ``ready_url``. The functions below build
the spec of each role (API, Celery worker, beat, consumer, Flower, gunicorn); ``outbox
dev``, ``outbox chaos``, the benchmarks and the tests all start processes from them, so a
command line or a readiness pattern is written once.

A :class:`Process` runs a spec in a session of its own, so that a terminal's Ctrl-C
reaches only the process that started it and a stop takes the whole process group
(prefork pool processes included). Its output goes line by line to a log file, to a
callback, or both.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from outbox.settings import Settings

READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 10.0
# What a Celery worker logs once it takes tasks, and beat once it ticks.
WORKER_READY = r"@\S+ ready\."
BEAT_READY = r"beat: Starting"
# A consumer is up once subscribed; it reads once it holds partitions (a consumer of a
# group with more members than partitions may hold none).
CONSUMER_READY = r"consumer \S+ ready"
CONSUMER_ASSIGNED = r"assigned \S*\["
# A worker's log line once the heartbeat it asks for as it starts has run (it waits a
# whole inspect timeout for every worker's answer, in a pool process).
WORKER_JOINED = r"outbox\.heartbeat\[\S+\] succeeded in .*'joining': True"
# Lines of output kept in memory for a process that writes no log file.
KEPT_LINES = 2000


@dataclasses.dataclass(frozen=True)
class Spec:
    """A process to start: its name, command line, extra environment and readiness."""

    name: str
    argv: tuple[str, ...]
    ready_pattern: str | None = None
    ready_url: str | None = None
    # The answer from ready_url that means ready; None takes any HTTP answer.
    ready_status: int | None = 200
    env: tuple[tuple[str, str], ...] = ()

    def with_env(self, **env: str) -> Spec:
        return dataclasses.replace(self, env=(*self.env, *env.items()))


def _python(*args: str) -> tuple[str, ...]:
    return (sys.executable, "-m", *args)


def _celery(settings: Settings, *args: str) -> tuple[str, ...]:
    # With JSON logs, no banner: every line of output is then a JSON object.
    quiet = ("--quiet",) if settings.log_format == "json" else ()
    return _python("celery", "-A", "tasks", *quiet, *args)


def api(settings: Settings, name: str = "api") -> Spec:
    """The API on Flask's own server, at the settings' host and port (``outbox dev``)."""
    host, port = settings.api_host, str(settings.api_port)
    argv = _python("flask", "--app", "api:create_app()", "run", "--no-reload")
    return Spec(
        name,
        (*argv, "--host", host, "--port", port),
        ready_url=f"http://{host}:{port}/readyz",
    )


def gunicorn(
    name: str,
    app: str,
    port: int,
    *,
    workers: int = 2,
    threads: int = 1,
    log_level: str = "info",
) -> Spec:
    """``app`` under gunicorn on loopback ``port``, logging as compose serves the API."""
    argv = _python("gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", str(workers))
    argv += ("--logger-class", "api.gunicorn_logging.Logger")
    if threads > 1:
        argv += ("--threads", str(threads), "--worker-class", "gthread")
    return Spec(
        name,
        (*argv, "--log-level", log_level, app),
        ready_url=f"http://127.0.0.1:{port}/",
        ready_status=None,
    )


def worker(
    settings: Settings, name: str, *, concurrency: int | None = None, log_level: str = "INFO"
) -> Spec:
    """A Celery worker named ``name@<host>``; with ``concurrency``, that many pool
    processes and no mingle or gossip (faster to start, as tests and benchmarks want)."""
    argv = _celery(settings, "worker", "-n", f"{name}@%h", "--loglevel", log_level)
    if concurrency is not None:
        argv += ("-c", str(concurrency), "--without-mingle", "--without-gossip")
    return Spec(name, argv, ready_pattern=WORKER_READY)


def beat(
    settings: Settings,
    schedule_file: Path | None = None,
    *,
    name: str = "beat",
    log_level: str = "INFO",
) -> Spec:
    """Celery beat, its schedule kept in ``schedule_file`` (by default in the settings'
    ``dev_dir``, never in the working directory)."""
    schedule = schedule_file or Path(settings.dev_dir) / "celerybeat-schedule"
    argv = _celery(settings, "beat", "--loglevel", log_level, "-s", str(schedule))
    return Spec(name, argv, ready_pattern=BEAT_READY)


def consumer(
    settings: Settings, name: str, *, group: str, topics: list[str] | tuple[str, ...]
) -> Spec:
    """``outbox consume`` for ``group`` on ``topics``."""
    argv = _python("outbox", "consume", "--group", group, "--topics", ",".join(topics))
    return Spec(name, argv, ready_pattern=CONSUMER_READY)


def flower(settings: Settings, name: str = "flower") -> Spec:
    """Flower on loopback, behind the settings' user and password; it is up once it
    refuses a request without them."""
    argv = _celery(
        settings,
        "flower",
        "--address=127.0.0.1",
        f"--port={settings.flower_port}",
        f"--basic-auth={settings.flower_user}:{settings.flower_password}",
    )
    return Spec(name, argv, ready_url=f"http://127.0.0.1:{settings.flower_port}/", ready_status=401)


def bare_loop(settings: Settings, role: str, topic: str) -> Spec:
    """A loop of the benchmarks' bare pipeline (:mod:`outbox.bench.bare`)."""
    return Spec(
        f"bare-{role}",
        _python("outbox.bench.bare", role, topic),
        ready_pattern=f"bare {role} ready",
    )


def bare_celery_worker(settings: Settings, concurrency: int) -> Spec:
    """The worker of the benchmarks' bare Celery pipeline (:mod:`outbox.bench.bare_celery`),
    with ``concurrency`` pool processes, started as :func:`worker` starts the system's."""
    argv = _python("celery", "-A", "outbox.bench.bare_celery", "worker", "-n", "bare-celery@%h")
    argv += ("--loglevel", "INFO", "-c", str(concurrency), "--without-mingle", "--without-gossip")
    return Spec("bare-celery-worker", argv, ready_pattern=WORKER_READY)


def bare_celery_consumer(settings: Settings, topic: str) -> Spec:
    """The bare Celery pipeline's consumer loop, which kicks its processor task."""
    return Spec(
        "bare-celery-consume",
        _python("outbox.bench.bare_celery", "consume", topic),
        ready_pattern="bare celery consume ready",
    )


def http_status(url: str) -> int | None:
    """The status of a GET of ``url``, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


class Process:
    """A spec started in a session of its own, its output relayed line by line."""

    def __init__(
        self,
        spec: Spec,
        settings: Settings,
        *,
        log: Path | None = None,
        on_line: Callable[[str], None] | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.log = log
        self.on_line = on_line
        self.ready = threading.Event()
        self._env = {
            **os.environ,
            **settings.as_env(),
            **dict(spec.env),
            **(env or {}),
            "PYTHONUNBUFFERED": "1",
        }
        self._cwd = cwd
        self._lines: collections.deque[str] = collections.deque(maxlen=KEPT_LINES)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        """Start (or start again) the process; return at once."""
        self.ready.clear()
        self.proc = subprocess.Popen(
            self.spec.argv,
            cwd=self._cwd,
            env=self._env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        proc = self.proc
        threading.Thread(target=self._pump, args=(proc,), daemon=True).start()
        if self.spec.ready_url is not None:
            threading.Thread(target=self._probe, args=(proc,), daemon=True).start()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _pump(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        log = self.log.open("ab") if self.log is not None else None
        try:
            for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                if log is not None:
                    log.write(raw)
                    log.flush()
                else:
                    self._lines.append(line)
                if self.on_line is not None:
                    self.on_line(line)
                pattern = self.spec.ready_pattern
                # (Lines a replaced process still had in its pipe make nothing ready.)
                if (
                    pattern is not None
                    and proc is self.proc
                    and not self.ready.is_set()
                    and re.search(pattern, line)
                ):
                    self.ready.set()
        finally:
            if log is not None:
                log.close()

    def _probe(self, proc: subprocess.Popen[bytes]) -> None:
        assert self.spec.ready_url is not None
        while not self.ready.is_set() and proc.poll() is None and proc is self.proc:
            status = http_status(self.spec.ready_url)
            if status is not None and self.spec.ready_status in (None, status):
                self.ready.set()
                return
            time.sleep(0.1)

    def text(self) -> str:
        """Its output so far: the whole log file, or the last lines kept in memory."""
        if self.log is not None:
            try:
                return self.log.read_text(errors="replace")
            except FileNotFoundError:
                return ""
        return "\n".join(self._lines)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Return once it is ready; raise :class:`RuntimeError` with the end of its output
        should it exit or not be ready within ``timeout_s``."""
        self.wait_for(self.ready.is_set, timeout_s, "ready")

    def wait_for_line(self, pattern: str, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Return once a line of its output matches ``pattern`` (as :meth:`wait_ready`)."""
        compiled = re.compile(pattern)
        self.wait_for(lambda: compiled.search(self.text()) is not None, timeout_s, pattern)

    def wait_for(self, check: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if check():
                return
            if not self.alive():
                break
            time.sleep(0.05)
        if check():
            return
        state = "exited" if not self.alive() else f"not {what} after {timeout_s:g} s"
        raise RuntimeError(f"{self.name} {state}:\n{self.text()[-3000:]}")

    def signal_group(self, sig: signal.Signals) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole process group: a worker's pool dies with its parent."""
        self.signal_group(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def stop(self, grace_s: float = STOP_GRACE_S) -> bool:
        """SIGTERM the process group, SIGKILL it after ``grace_s``; return whether it
        stopped within the grace."""
        self.signal_group(signal.SIGTERM)
        return self.reap(grace_s)

    def reap(self, grace_s: float) -> bool:
        """Wait up to ``grace_s`` for a stopping process, then SIGKILL its group either
        way (pool processes of a stopped parent may linger); return whether it stopped
        in time."""
        if self.proc is None:
            return True
        clean = True
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            clean = False
        self.signal_group(signal.SIGKILL)
        self.proc.wait()
        return clean


def stop_all(processes: list[Process], grace_s: float = STOP_GRACE_S) -> list[str]:
    """Stop every process, last started first, all within one grace; return the names of
    those that had to be killed."""
    running = [p for p in reversed(processes) if p.proc is not None]
    for process in running:
        process.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    killed = []
    for process in running:
        if not process.reap(max(deadline - time.monotonic(), 0.1)):
            killed.append(process.name)
    return killed


@contextlib.contextmanager
def running(
    settings: Settings, specs: list[Spec], *, timeout_s: float = READY_TIMEOUT_S
) -> Iterator[list[Process]]:
    """Start ``specs`` (output kept in memory), wait until each is ready, stop them all
    on the way out: the benchmarks' way of running part of the system."""
    processes: list[Process] = []
    try:
        for spec in specs:
            processes.append(Process(spec, settings).start())
        for process in processes:
            process.wait_ready(timeout_s)
        yield processes
    finally:
        stop_all(processes)
