"""Fixtures: real services (embedded by default, or the ones OUTBOX_* variables name),
a database per test copied from a migrated template, a Redis database per test,
and unique Kafka topic names."""

from __future__ import annotations

import gc
import itertools
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from outbox import migrate
from outbox.db import make_engine, make_sessionmaker
from outbox.devstack.services import EmbeddedServices
from outbox.settings import Settings

# Short partition leases: a dead consumer's partitions move after it.
TEST_CONSUMER_LEASE_S = 6.0
# Database 0 is left alone on a shared Redis; tests take 1..15 in turn.
_redis_dbs = itertools.cycle(range(1, 16))


def _url(base: str, database: str) -> str:
    return make_url(base).set(database=database).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def services() -> Iterator[Settings]:
    """Settings pointing at running PostgreSQL, Redis and Kafka for the whole session."""
    settings = Settings.from_env(consumer_lease_s=TEST_CONSUMER_LEASE_S)
    root = Path(tempfile.mkdtemp(prefix="outbox-test-"))
    root.chmod(0o755)  # the postgres system user must reach its data directory
    embedded = EmbeddedServices(settings, root, durable=False)
    try:
        yield embedded.start()
    finally:
        embedded.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def admin_engine(services: Settings) -> Iterator[Engine]:
    """An autocommit connection to the server's maintenance database, for CREATE DATABASE."""
    assert services.database_url is not None
    engine = create_engine(_url(services.database_url, "postgres"), isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


def create_database(admin: Engine, name: str, template: str | None = None) -> None:
    clause = f' TEMPLATE "{template}"' if template else ""
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"{clause}'))


def drop_database(admin: Engine, name: str) -> None:
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def template_database(services: Settings, admin_engine: Engine) -> Iterator[str]:
    """A database migrated once to head; each test gets a copy."""
    assert services.database_url is not None
    name = f"outbox_template_{os.getpid()}"
    create_database(admin_engine, name)
    migrate.upgrade(services.replace(database_url=_url(services.database_url, name)))
    yield name
    drop_database(admin_engine, name)


@pytest.fixture
def empty_database(services: Settings, admin_engine: Engine) -> Iterator[Settings]:
    """Settings pointing at a new database with no schema at all."""
    assert services.database_url is not None
    name = f"outbox_empty_{uuid.uuid4().hex[:12]}"
    create_database(admin_engine, name)
    yield services.replace(database_url=_url(services.database_url, name))
    drop_database(admin_engine, name)


@pytest.fixture
def redis_url(services: Settings) -> str:
    """A Redis database of its own, emptied before the test."""
    assert services.redis_url is not None
    url = urlunsplit(urlsplit(services.redis_url)._replace(path=f"/{next(_redis_dbs)}"))
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


@pytest.fixture
def settings(
    services: Settings, admin_engine: Engine, template_database: str, redis_url: str
) -> Iterator[Settings]:
    """Settings with a migrated database and a Redis database of this test's own."""
    assert services.database_url is not None
    name = f"outbox_test_{uuid.uuid4().hex[:12]}"
    create_database(admin_engine, name, template=template_database)
    yield services.replace(database_url=_url(services.database_url, name), redis_url=redis_url)
    gc.collect()  # the test's API apps go, and their heartbeat threads stop with them
    drop_database(admin_engine, name)


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    engine = make_engine(settings)
    yield engine
    engine.dispose()


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    with make_sessionmaker(engine)() as session:
        yield session


@pytest.fixture
def topic() -> str:
    """A Kafka topic name no other test uses."""
    return f"test.{uuid.uuid4().hex[:12]}"


# The whole consume flow (worker, beat and consumer processes), for e2e and fault tests.
from tests.flow import flow  # noqa: E402, F401
