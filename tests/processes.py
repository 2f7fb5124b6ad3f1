"""Real worker, beat and consumer processes for end-to-end and fault tests."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from outbox.dev import worker_argv
from outbox.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


class ServiceProcess:
    """A process of ours in its own session, logging to ``<log_dir>/<name>.log``."""

    ready_pattern = ""

    def __init__(
        self,
        settings: Settings,
        name: str,
        log_dir: Path,
        argv: list[str],
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.log = log_dir / f"{name}.log"
        full_env = {**os.environ, **settings.as_env(), **(env or {}), "PYTHONUNBUFFERED": "1"}
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=full_env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if re.search(self.ready_pattern, self.text()):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"{self.name} not ready:\n{self.text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the whole process group: a worker's pool dies with its parent."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # pool processes left behind


class WorkerProcess(ServiceProcess):
    """``celery -A tasks worker -n <name>@<host>``."""

    ready_pattern = r"@\S+ ready\."

    def __init__(
        self,
        settings: Settings,
        name: str,
        log_dir: Path,
        *,
        concurrency: int = 1,
        env: dict[str, str] | None = None,
    ) -> None:
        quiet = settings.log_format == "json"
        argv = worker_argv(name, "INFO", concurrency, quiet=quiet)
        super().__init__(settings, name, log_dir, argv, env)


class BeatProcess(ServiceProcess):
    """``celery -A tasks beat``, its schedule file in ``log_dir``."""

    ready_pattern = r"beat: Starting"

    def __init__(self, settings: Settings, log_dir: Path, env: dict[str, str] | None = None):
        argv = [sys.executable, "-m", "celery", "-A", "tasks", "beat", "--loglevel", "INFO"]
        argv += ["-s", str(log_dir / "celerybeat-schedule")]
        super().__init__(settings, "beat", log_dir, argv, env)


class ConsumerProcess(ServiceProcess):
    """``outbox consume``; ready once it holds partitions."""

    ready_pattern = r"assigned \S*\["

    def __init__(
        self,
        settings: Settings,
        name: str,
        log_dir: Path,
        *,
        group: str,
        topics: list[str],
        env: dict[str, str] | None = None,
    ) -> None:
        argv = [sys.executable, "-m", "outbox", "consume", "--group", group]
        argv += ["--topics", ",".join(topics)]
        super().__init__(settings, name, log_dir, argv, env)


class ApiProcess(ServiceProcess):
    """The API under gunicorn with several worker processes, as compose runs it."""

    ready_pattern = r"Booting worker"

    def __init__(self, settings: Settings, log_dir: Path, *, workers: int = 2) -> None:
        argv = [sys.executable, "-m", "gunicorn", "--bind", "127.0.0.1:0"]
        argv += ["--workers", str(workers), "api:create_app()"]
        super().__init__(settings, "api", log_dir, argv)

    @property
    def url(self) -> str:
        found = re.search(r"Listening at: (http://127\.0\.0\.1:\d+)", self.text())
        assert found, self.text()
        return found.group(1)
