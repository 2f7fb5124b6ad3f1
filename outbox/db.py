"""Engines and sessions, made from settings; nothing connects at import time."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, Result, TextClause, create_engine, event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

from outbox import queries
from outbox.errors import SettingsError
from outbox.settings import Settings, env_name

T = TypeVar("T")


def database_url(settings: Settings) -> str:
    """The configured PostgreSQL URL, or an error naming the variable to set."""
    if settings.database_url is None:
        raise SettingsError(
            f"{env_name('database_url')} is not set: run `outbox dev` or point it at PostgreSQL"
        )
    return settings.database_url


def make_engine(settings: Settings, **kwargs: object) -> Engine:
    """An engine sized from settings that pings a connection idle for
    ``OUTBOX_DB_PING_AFTER_IDLE_S`` before use (:func:`ping_idle_connections`). Statement
    parameters (payloads, headers, keys) never go into its errors or log lines."""
    options: dict[str, object] = {
        "pool_size": settings.db_pool_size,
        "max_overflow": settings.db_pool_size,
        "hide_parameters": True,
    }
    options.update(kwargs)
    engine = create_engine(database_url(settings), **options)
    if not options.get("pool_pre_ping"):
        ping_idle_connections(engine, settings.db_ping_after_idle_s)
    return engine


# When a pooled connection went back to the pool, in its record's info.
_IDLE_SINCE = "outbox_idle_since"


def ping_idle_connections(engine: Engine, idle_s: float) -> None:
    """Ping (``SELECT 1``) a connection checked out of ``engine``'s pool after ``idle_s`` or
    more in it, and replace it when the server has gone (a restart, a failover, a
    connection cut while idle); with ``idle_s`` 0, every checkout, as SQLAlchemy's
    ``pool_pre_ping``.

    A busy process checks a connection out for every transaction, milliseconds apart: a
    ping each time would cost a round trip and a statement of the server's per
    transaction, on the path of every message. A connection whose server went away in the
    last ``idle_s`` fails its next statement instead, as the statements in flight at that
    moment fail anyway; SQLAlchemy then reconnects every connection of the pool that is
    older than the failure, and the caller's retry finds a fresh one."""

    @event.listens_for(engine, "checkin")
    def _checked_in(dbapi_connection: Any, record: Any) -> None:
        record.info[_IDLE_SINCE] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        since = record.info.pop(_IDLE_SINCE, None)
        if since is None or time.monotonic() - since < idle_s:
            return  # a new connection, or one in use a moment ago
        dialect = engine.dialect
        try:
            dialect.do_ping(dbapi_connection)
        except dialect.loaded_dbapi.Error as exc:
            if dialect.is_disconnect(exc, dbapi_connection, None):
                # The pool drops this connection and checks out a new one.
                raise DisconnectionError(str(exc)) from exc
            raise


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded values after commit (callers read ids back)."""
    return sessionmaker(engine, expire_on_commit=False)


@contextlib.contextmanager
def autocommit(engine: Engine) -> Iterator[Connection]:
    """One of ``engine``'s pooled connections in autocommit while the block runs: each
    statement commits on its own, with no BEGIN or COMMIT.

    The driver's own switch is turned, and turned back before the connection goes back to
    the pool, as SQLAlchemy's pool does for its ping. SQLAlchemy's ``isolation_level=
    "AUTOCOMMIT"`` option would leave psycopg2 with an explicit isolation level once the
    pool reset it, and every later transaction on that connection would cost one more
    round trip (``SET default_transaction_isolation TO DEFAULT`` before its BEGIN)."""
    with engine.connect() as conn:
        driver = conn.connection.dbapi_connection
        assert driver is not None
        driver.autocommit = True
        try:
            yield conn
        finally:
            if not driver.closed:
                driver.autocommit = False


def polling(sessions: sessionmaker[Session]) -> contextlib.AbstractContextManager[Connection]:
    """One connection of ``sessions``' engine, in autocommit, for a loop of read-only looks
    (a lingering task's polls): each look is one round trip, where a session of its own
    costs three or four (BEGIN, the look, ROLLBACK, and the pool's ping after a pause)."""
    return autocommit(sessions.kw["bind"])


def execute(
    session: Session | Connection,
    statement: TextClause,
    params: dict[str, Any] | None = None,
    *,
    prepare: bool,
) -> Result[*tuple[Any, ...]]:
    """Run ``statement``. With ``prepare`` (``OUTBOX_DB_PREPARE_STATEMENTS``; off behind
    PgBouncer in transaction mode), one of :data:`outbox.queries.PREPARED` is prepared on
    its connection the first time it runs there and executed by name after. A prepared
    statement outlives a rollback and goes with its connection, as does the connection's
    ``info`` that remembers it."""
    named = queries.PREPARED.get(statement) if prepare else None
    if named is None:
        return session.execute(statement, params)
    conn = session.connection() if isinstance(session, Session) else session
    done: set[str] = conn.info.setdefault("outbox_prepared", set())
    if named.name not in done:
        conn.execute(named.prepare)
        done.add(named.name)
    return session.execute(named.execute, params)


def as_tuples(
    result: Result[Any], cls: type[T], rows: Iterable[Sequence[Any]] | None = None
) -> list[T]:
    """``rows`` of ``result`` (all of them by default) as ``cls``, a NamedTuple whose fields
    are the result's last columns, in order (checked; columns before them are left out).
    Reading a column of SQLAlchemy's Row by name costs several times what a tuple's field
    does, which tells in a loop over thousands of rows."""
    fields: tuple[str, ...] = cls._fields  # type: ignore[attr-defined]
    keys = tuple(result.keys())
    skip = len(keys) - len(fields)
    if skip < 0 or keys[skip:] != fields:
        raise RuntimeError(f"the statement returned {keys}, not {cls.__name__}'s {fields}")
    make = cls._make  # type: ignore[attr-defined]
    rows = result.all() if rows is None else rows
    return [make(row[skip:]) for row in rows] if skip else [make(row) for row in rows]


def int_array(values: Iterable[int | None]) -> str:
    """Integers (None as NULL) as one PostgreSQL array literal (``'{1,NULL,3}'``), for
    ``CAST(:p AS bigint[])``: psycopg2 sends a list as ``ARRAY[1,NULL,3]``, an expression
    per element, which costs the server far more to parse and plan when the list is long."""
    return "{" + ",".join("NULL" if v is None else str(v) for v in values) + "}"


def text_array(values: Iterable[str]) -> str:
    """Strings as one PostgreSQL array literal, for ``CAST(:p AS text[])`` or ``uuid[]``
    (see :func:`int_array`)."""
    return "{" + ",".join(f'"{_array_quoted(v)}"' for v in values) + "}"


def _array_quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')
