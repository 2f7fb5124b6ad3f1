"""Real API, worker, beat and consumer processes for end-to-end and fault tests, from the
project's one launcher (:mod:`outbox.devstack.processes`), each logging to
``<log_dir>/<name>.log``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from outbox.devstack import processes
from outbox.devstack.processes import Process
from outbox.devstack.server import free_port
from outbox.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def _start(
    settings: Settings, spec: processes.Spec, log_dir: Path, env: dict[str, str] | None
) -> Process:
    return Process(spec, settings, log=log_dir / f"{spec.name}.log", env=env, cwd=ROOT).start()


def start_worker(
    settings: Settings,
    name: str,
    log_dir: Path,
    *,
    concurrency: int = 1,
    env: dict[str, str] | None = None,
) -> Process:
    """``celery -A tasks worker -n <name>@<host>``."""
    return _start(settings, processes.worker(settings, name, concurrency=concurrency), log_dir, env)


def start_beat(settings: Settings, log_dir: Path, env: dict[str, str] | None = None) -> Process:
    """``celery -A tasks beat``, its schedule file in ``log_dir``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    spec = processes.beat(settings, log_dir / "celerybeat-schedule")
    return _start(settings, spec, log_dir, env)


def start_consumer(
    settings: Settings,
    name: str,
    log_dir: Path,
    *,
    group: str,
    topics: list[str],
    env: dict[str, str] | None = None,
) -> Process:
    """``outbox consume``; ready once it holds partitions."""
    spec = processes.consumer(settings, name, group=group, topics=topics)
    spec = dataclasses.replace(spec, ready_pattern=processes.CONSUMER_ASSIGNED)
    return _start(settings, spec, log_dir, env)


class ApiServer:
    """The API under gunicorn with several worker processes, as compose runs it."""

    def __init__(self, settings: Settings, log_dir: Path, *, workers: int = 2) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        spec = processes.gunicorn("api", "api:create_app()", port, workers=workers)
        self.process = _start(settings, spec, log_dir, None)

    def wait_ready(self) -> None:
        self.process.wait_ready()

    def stop(self) -> None:
        self.process.stop()
