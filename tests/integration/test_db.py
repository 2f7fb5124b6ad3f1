"""The engines' pool on a real PostgreSQL: a connection idle past
``OUTBOX_DB_PING_AFTER_IDLE_S`` is pinged and replaced when its server connection is gone;
one in use a moment ago goes without a ping, fails once when its server connection is
gone, and the pool reconnects."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from outbox.db import make_engine
from outbox.settings import Settings


@pytest.fixture
def cut_me() -> str:
    return f"cut-{uuid.uuid4().hex[:8]}"


def _engine(settings: Settings, name: str, idle_s: float) -> Engine:
    return make_engine(
        settings.replace(db_ping_after_idle_s=idle_s),
        pool_size=2,
        connect_args={"application_name": name},
    )


@pytest.fixture
def counted_pings(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """How many pings reached the server, counted as the dialect sends them."""
    from sqlalchemy.dialects.postgresql.psycopg2 import PGDialect_psycopg2

    pings: list[int] = []
    send = PGDialect_psycopg2.do_ping

    def do_ping(self: PGDialect_psycopg2, dbapi_connection: object) -> bool:
        pings.append(1)
        return send(self, dbapi_connection)

    monkeypatch.setattr(PGDialect_psycopg2, "do_ping", do_ping)
    yield pings


def _cut(engine: Engine, name: str) -> int:
    """End the server side of every connection named ``name``, as a restart would."""
    with engine.connect() as conn:
        ended = conn.execute(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = :name"
            ),
            {"name": name},
        ).scalar_one()
        conn.commit()
    # pg_terminate_backend signals: wait until the backends are gone.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            left = conn.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :name"),
                {"name": name},
            ).scalar_one()
        if not left:
            break
        time.sleep(0.02)
    return int(ended)


def _backend(engine: Engine) -> int:
    with engine.begin() as conn:
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def test_a_connection_idle_past_the_setting_is_pinged_and_replaced_when_its_server_is_gone(
    settings: Settings, engine: Engine, cut_me: str, counted_pings: list[int]
):
    own = _engine(settings, cut_me, idle_s=0.2)
    try:
        before = _backend(own)
        time.sleep(0.3)
        assert _cut(engine, cut_me) == 1
        # No error: the ping found the connection dead, and the pool made a new one
        after = _backend(own)
        assert after != before
        assert counted_pings
    finally:
        own.dispose()


def test_a_connection_used_a_moment_ago_goes_without_a_ping(
    settings: Settings, cut_me: str, counted_pings: list[int]
):
    own = _engine(settings, cut_me, idle_s=60.0)
    try:
        backends = {_backend(own) for _ in range(50)}
        assert len(backends) == 1
        assert counted_pings == []
    finally:
        own.dispose()


def test_a_busy_connection_whose_server_is_gone_fails_once_and_the_pool_reconnects(
    settings: Settings, engine: Engine, cut_me: str
):
    own = _engine(settings, cut_me, idle_s=60.0)
    try:
        # Two connections in the pool, both used a moment ago
        with own.connect() as first, own.connect() as second:
            first.execute(text("SELECT 1"))
            second.execute(text("SELECT 1"))
        assert _cut(engine, cut_me) == 2
        with pytest.raises(OperationalError) as failed:
            _backend(own)
        assert failed.value.connection_invalidated
        # The failure renewed the whole pool: no second failure, on either connection
        with own.connect() as first, own.connect() as second:
            assert first.execute(text("SELECT 1")).scalar_one() == 1
            assert second.execute(text("SELECT 1")).scalar_one() == 1
    finally:
        own.dispose()


def test_with_the_setting_at_zero_every_checkout_is_pinged(
    settings: Settings, engine: Engine, cut_me: str, counted_pings: list[int]
):
    own = _engine(settings, cut_me, idle_s=0.0)
    try:
        before = _backend(own)
        _backend(own)
        assert len(counted_pings) == 1  # the second checkout; the first was a new connection
        assert _cut(engine, cut_me) == 1
        assert _backend(own) != before
    finally:
        own.dispose()
