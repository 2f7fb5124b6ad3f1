"""``outbox dev`` as a user runs it: one command, every URL answers, a stop leaves nothing."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
import redis
from confluent_kafka.admin import AdminClient

from outbox.devstack.server import free_port, port_open

READY_LINE = re.compile(r"outbox dev: all ready in ([\d.]+) s")
EXPORT_LINE = re.compile(r"^\s*export (OUTBOX_\w+)=(\S+)$", re.M)
BANNER_END = "Ctrl-C stops everything."


def _fetch(url: str, auth: tuple[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def _status(url: str, auth: tuple[str, str] | None = None) -> int:
    return _fetch(url, auth)[0]


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class DevProcess:
    def __init__(self, env: dict[str, str], args: tuple[str, ...] = ()) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "outbox", "dev", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.output: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            if BANNER_END in line:
                self.ready.set()

    @property
    def text(self) -> str:
        return "".join(self.output)


def _dev_env(dev_dir: Path) -> dict[str, str]:
    """The environment of an ``outbox dev`` on embedded services, in ``dev_dir``, on free
    ports."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OUTBOX_DATABASE_URL", "OUTBOX_REDIS_URL", "OUTBOX_KAFKA_BOOTSTRAP")
    }
    env.update(
        OUTBOX_DEV_DIR=str(dev_dir),
        OUTBOX_API_PORT=str(free_port()),
        OUTBOX_FLOWER_PORT=str(free_port()),
    )
    return env


@pytest.fixture
def dev_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="outbox-dev-e2e-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize(
    ("stop_signal", "scale", "named"),
    [
        (signal.SIGTERM, (), ("worker", "consumer")),
        (
            signal.SIGINT,
            ("--workers", "2", "--consumers", "2"),
            ("worker1", "worker2", "consumer1", "consumer2"),
        ),
    ],
    ids=["sigterm", "ctrl-c-scaled"],
)
def test_outbox_dev_runs_everything_and_a_stop_signal_leaves_no_process(
    dev_dir: Path, stop_signal: signal.Signals, scale: tuple[str, ...], named: tuple[str, ...]
):
    env = _dev_env(dev_dir)
    env.update(OUTBOX_FLOWER_USER="ops", OUTBOX_FLOWER_PASSWORD="s3cret")
    api_port, flower_port = int(env["OUTBOX_API_PORT"]), int(env["OUTBOX_FLOWER_PORT"])
    dev = DevProcess(env, scale)
    try:
        assert dev.ready.wait(90), dev.text[-5000:]
        text = dev.text
        elapsed = float(READY_LINE.search(text).group(1))  # type: ignore[union-attr]
        assert elapsed > 0
        exports = dict(EXPORT_LINE.findall(text))
        assert set(exports) == {"OUTBOX_DATABASE_URL", "OUTBOX_REDIS_URL", "OUTBOX_KAFKA_BOOTSTRAP"}
        # Each child's log lines carry its name.
        for name in ("api", "beat", "flower", *named):
            assert re.search(rf"^{name}\s+\| ", text, re.M), name

        # The API and its readiness probe
        api = f"http://127.0.0.1:{api_port}"
        assert _status(f"{api}/healthz") == 200
        assert _status(f"{api}/readyz") == 200
        # The dashboard and /metrics, behind the token the banner prints
        token = re.search(r"token (\S+)\)", text).group(1)  # type: ignore[union-attr]
        assert f"{api}/dashboard" in text and f"{api}/metrics" in text
        assert _status(f"{api}/dashboard") == 401
        code, page = _fetch(f"{api}/dashboard", ("ops", token))
        assert code == 200 and f'href="http://127.0.0.1:{flower_port}"' in page
        assert _status(f"{api}/metrics") == 401
        code, metrics = _fetch(f"{api}/metrics", ("prometheus", token))
        assert code == 200
        assert re.search(r'^outbox_metrics_source_up\{source="redis"\} 1\.0$', metrics, re.M)
        # Flower refuses without credentials and answers with them
        flower = f"http://127.0.0.1:{flower_port}"
        assert _status(f"{flower}/") == 401
        assert _status(f"{flower}/", ("ops", "wrong")) == 401
        assert _status(f"{flower}/", ("ops", "s3cret")) == 200
        # The printed exports reach the same services from another process
        pg = exports["OUTBOX_DATABASE_URL"].replace("postgresql+psycopg2", "postgresql")
        with psycopg2.connect(pg) as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM alembic_version")
            assert cur.fetchone() == (1,)
        assert redis.Redis.from_url(exports["OUTBOX_REDIS_URL"]).ping()
        admin = AdminClient({"bootstrap.servers": exports["OUTBOX_KAFKA_BOOTSTRAP"]})
        assert "outbox.acks" in admin.list_topics(timeout=5).topics
        # Beat reaches the worker: a scheduled publish tick runs there
        ran = re.compile(r"^worker\d?\s+\|.*Task outbox\.publish\[.*succeeded", re.M)
        deadline = time.monotonic() + 15
        while not ran.search(dev.text) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ran.search(dev.text), dev.text[-3000:]
        # Task events reach Flower: its task list (behind the credentials) and its own
        # Prometheus metrics show the beat's ticks.
        assert _status(f"{flower}/api/tasks") == 401
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            code, body = _fetch(f"{flower}/api/tasks?taskname=outbox.publish", ("ops", "s3cret"))
            if code == 200 and json.loads(body):
                break
            time.sleep(0.5)
        tasks = json.loads(body)
        assert tasks and {t["name"] for t in tasks.values()} == {"outbox.publish"}
        assert all(t["args"] == "()" for t in tasks.values())  # ids-only arguments: none here
        code, metrics = _fetch(f"{flower}/metrics")
        assert code == 200
        assert re.search(r'^flower_events_total\{.*task="outbox\.publish"', metrics, re.M)

        # A child killed outright is started again after a short delay; the rest go on.
        victim = named[0]
        worker = next(
            pid
            for pid in _descendants(dev.proc.pid)
            if f"{victim}@".encode() in _cmdline(Path(f"/proc/{pid}")) and os.getpgid(pid) == pid
        )
        ready_lines = len(re.findall(rf"^{victim}\s+\|.*@\S+ ready\.", dev.text, re.M))
        os.killpg(worker, signal.SIGKILL)
        again = re.compile(rf"^{victim}\s+\| exited \(-9\); starting it again in [\d.]+ s$", re.M)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (
            not again.search(dev.text)
            or len(re.findall(rf"^{victim}\s+\|.*@\S+ ready\.", dev.text, re.M)) <= ready_lines
        ):
            time.sleep(0.2)
        assert again.search(dev.text), dev.text[-3000:]
        assert len(re.findall(rf"^{victim}\s+\|.*@\S+ ready\.", dev.text, re.M)) > ready_lines
        assert dev.proc.poll() is None and _status(f"{api}/readyz") == 200

        ports = [api_port, flower_port] + [
            int(v.rsplit(":", 1)[1].split("/")[0]) for v in exports.values()
        ]
        children = _descendants(dev.proc.pid)
        assert len(children) >= 3 + len(named)
    finally:
        dev.proc.send_signal(stop_signal)
        code = dev.proc.wait(60)
    assert code == 0, dev.text[-3000:]
    assert "outbox dev: stopped" in dev.text
    survivors = [pid for pid in children if _alive(pid)]
    assert survivors == []
    assert [p for p in ports if port_open(p)] == []
    # PostgreSQL daemonizes away from the tree: nothing may still run on its data.
    assert not [
        e
        for e in Path("/proc").iterdir()
        if e.name.isdigit() and _alive(int(e.name)) and str(dev_dir).encode() in _cmdline(e)
    ]


def _cmdline(entry: Path) -> bytes:
    try:
        return (entry / "cmdline").read_bytes()
    except OSError:
        return b""


def test_a_second_outbox_dev_on_the_same_folder_is_refused_and_a_stop_without_stdout_leaves_nothing(
    dev_dir: Path,
):
    # Given outbox dev running, its output read through a pipe
    read_end, write_end = os.pipe()
    env = _dev_env(dev_dir)
    api_port = int(env["OUTBOX_API_PORT"])
    first = subprocess.Popen(
        [sys.executable, "-m", "outbox", "dev"],
        env=env,
        stdout=write_end,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    os.close(write_end)
    reader = os.fdopen(read_end, "r")
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and BANNER_END not in "".join(seen[-3:]):
            seen.append(reader.readline())
        assert BANNER_END in "".join(seen), "".join(seen)[-3000:]
        children = _descendants(first.pid)

        # When a second one starts in another shell on the same folder
        second = subprocess.run(
            [sys.executable, "-m", "outbox", "dev"],
            env=_dev_env(dev_dir),
            capture_output=True,
            text=True,
            timeout=60,
        )
        # Then it refuses, naming the running one, and the first is untouched
        assert second.returncode != 0
        assert f"pid {first.pid}" in second.stderr + second.stdout
        assert _status(f"http://127.0.0.1:{api_port}/readyz") == 200

        # When the first one's output is gone (a closed pipe) and it is stopped
        reader.close()
        first.send_signal(signal.SIGTERM)
        first.wait(60)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    # Then no child is left behind, Flower (which ignores SIGTERM) included
    assert [pid for pid in children if _alive(pid)] == []
    assert not port_open(api_port)
