"""The services every process depends on: the session's ones, and a fresh embedded set."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from confluent_kafka import Consumer, Producer
from sqlalchemy import create_engine, text

from outbox.devstack.server import STANDARD_PORTS, port_open
from outbox.devstack.services import EmbeddedServices
from outbox.settings import Settings


def _port(url_or_bootstrap: str) -> int:
    return int(url_or_bootstrap.rsplit(":", 1)[1].split("/")[0])


def test_the_configured_services_are_the_ones_in_use(services: Settings):
    for name, variable in [
        ("database_url", "OUTBOX_DATABASE_URL"),
        ("redis_url", "OUTBOX_REDIS_URL"),
        ("kafka_bootstrap", "OUTBOX_KAFKA_BOOTSTRAP"),
    ]:
        configured = os.environ.get(variable)
        value = getattr(services, name)
        if configured:
            assert value == configured
        else:
            assert _port(value) not in STANDARD_PORTS.values()


def test_postgresql_answers(services: Settings):
    assert services.database_url is not None
    engine = create_engine(services.database_url)
    with engine.connect() as conn:
        version = conn.execute(text("SHOW server_version_num")).scalar_one()
    engine.dispose()
    if not os.environ.get("OUTBOX_DATABASE_URL"):
        assert int(version) // 10000 == 18
    else:
        assert int(version) >= 140000


def test_redis_answers(redis_url: str):
    client = redis.Redis.from_url(redis_url)
    client.set("k", "v")
    assert client.get("k") == b"v"
    client.close()


def test_kafka_round_trip_with_the_idempotent_producer(services: Settings, topic: str):
    producer = Producer(
        {"bootstrap.servers": services.kafka_bootstrap, "enable.idempotence": True, "acks": "all"}
    )
    reports = []
    for i in range(10):
        producer.produce(
            topic,
            key=b"k",
            value=str(i).encode(),
            on_delivery=lambda err, msg: reports.append((err, msg.offset())),
        )
    assert producer.flush(10) == 0
    assert [err for err, _ in reports] == [None] * 10
    assert [offset for _, offset in reports] == list(range(10))
    consumer = Consumer(
        {
            "bootstrap.servers": services.kafka_bootstrap,
            "group.id": f"g-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
        }
    )
    consumer.subscribe([topic])
    values: list[bytes] = []
    deadline = time.monotonic() + 30
    while len(values) < 10 and time.monotonic() < deadline:
        values += [m.value() for m in consumer.consume(10, 0.5) if m.error() is None]
    consumer.close()
    assert values == [str(i).encode() for i in range(10)]


def _processes_mentioning(path: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if str(path).encode() in cmdline:
                pids.append(int(entry.name))
    return pids


def test_a_fresh_embedded_set_starts_keeps_its_data_and_stops_cleanly(tmp_path: Path):
    root = tmp_path / "dev"
    tmp_path.chmod(0o755)
    # An empty environment: this is the embedded path even when the suite uses real servers.
    settings = Settings.from_env({})
    embedded = EmbeddedServices(settings, root)
    live = embedded.start()
    assert live.database_url and live.redis_url and live.kafka_bootstrap
    ports = [_port(live.database_url), _port(live.redis_url), _port(live.kafka_bootstrap)]
    try:
        assert not set(ports) & set(STANDARD_PORTS.values())
        engine = create_engine(live.database_url)
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE kept (v int)"))
            conn.execute(text("INSERT INTO kept VALUES (42)"))
            backend = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
            # PostgreSQL refuses root, so under root it runs as its own system user (read
            # while the backend lives: it ends with its connection).
            owner = pwd.getpwuid(Path(f"/proc/{backend}").stat().st_uid).pw_name
        engine.dispose()
        assert owner == (
            "embedded_postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        )
    finally:
        embedded.stop()
    assert not any(port_open(p) for p in ports)
    assert _processes_mentioning(root) == []

    # Same directory again: PostgreSQL finds its data.
    again = EmbeddedServices(settings, root)
    live = again.start()
    try:
        assert live.database_url is not None
        engine = create_engine(live.database_url)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT v FROM kept")).scalar_one() == 42
        engine.dispose()
    finally:
        again.stop()
    assert _processes_mentioning(root) == []


def test_services_stop_when_the_process_that_started_them_is_killed(tmp_path: Path):
    root = tmp_path / "dev"
    tmp_path.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    starter = subprocess.Popen(
        [sys.executable, "-m", "outbox", "services", "--dir", str(root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    assert starter.stdout is not None
    exports = {}
    for line in starter.stdout:
        if line.startswith("export "):
            name, _, value = line.removeprefix("export ").strip().partition("=")
            exports[name] = value
        if line.startswith("# Ctrl-C"):
            break
    ports = [
        _port(exports["OUTBOX_DATABASE_URL"]),
        _port(exports["OUTBOX_REDIS_URL"]),
        _port(exports["OUTBOX_KAFKA_BOOTSTRAP"]),
    ]
    assert all(port_open(p) for p in ports)

    # When the process that started them dies without a chance to stop them
    starter.kill()
    starter.wait(10)

    # Then its watchdog stops all three
    deadline = time.monotonic() + 30
    while any(port_open(p) for p in ports) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [p for p in ports if port_open(p)] == []
    assert _processes_mentioning(root) == []


ORDINARY_USER_SCRIPT = textwrap.dedent(
    """
    import os, pwd, sys
    import psycopg2, socket
    from confluent_kafka.admin import AdminClient
    from pathlib import Path
    from outbox.devstack.services import EmbeddedServices
    from outbox.settings import Settings
    import encodings.idna, secrets  # imported lazily later; root's stdlib is closed to nobody

    user = pwd.getpwnam("nobody")
    os.setgid(user.pw_gid)
    os.setuid(user.pw_uid)
    os.environ["HOME"] = sys.argv[1]
    embedded = EmbeddedServices(Settings.from_env({}), Path(sys.argv[1]) / "dev")
    live = embedded.start()
    try:
        port = int(live.database_url.rsplit(":", 1)[1].split("/")[0])
        conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="outbox")
        cur = conn.cursor()
        cur.execute("SELECT current_setting('data_directory')")
        print("pgdata", cur.fetchone()[0])
        conn.close()
        redis_port = int(live.redis_url.split(":")[2].split("/")[0])
        with socket.create_connection(("127.0.0.1", redis_port)) as s:
            s.sendall(b"PING\\r\\n")
            print("redis", s.recv(7).decode().strip())
        print("kafka", len(AdminClient({"bootstrap.servers": live.kafka_bootstrap})
                           .list_topics(timeout=5).brokers))
        print("uid", os.geteuid())
    finally:
        embedded.stop()
    """
)


@pytest.fixture
def nobody_home() -> Iterator[Path]:
    """A directory ``nobody`` owns and can reach (pytest's own tmp folders are root-only)."""
    home = Path(tempfile.mkdtemp(prefix="outbox-nobody-"))
    os.chown(home, *_nobody_ids())
    yield home
    shutil.rmtree(home, ignore_errors=True)


def test_embedded_services_run_as_an_ordinary_user(nobody_home: Path):
    if os.geteuid() != 0:
        pytest.skip("the suite already runs as an ordinary user: every test here covers it")
    home = nobody_home
    result = subprocess.run(
        [sys.executable, "-c", ORDINARY_USER_SCRIPT, str(home)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert lines["uid"] == str(_nobody_ids()[0])
    assert lines["pgdata"].startswith(str(home / "dev"))
    assert lines["redis"] == "+PONG"
    assert lines["kafka"] == "1"
    assert _processes_mentioning(home) == []


def _nobody_ids() -> tuple[int, int]:
    user = pwd.getpwnam("nobody")
    return user.pw_uid, user.pw_gid
