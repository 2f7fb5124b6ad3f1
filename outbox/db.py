"""Engines and sessions, made from settings; nothing connects at import time."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, Result, TextClause, create_engine
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
    """An engine with pre-ping on, sized from settings. Statement parameters (payloads,
    headers, keys) never go into its errors or log lines."""
    options: dict[str, object] = {
        "pool_size": settings.db_pool_size,
        "max_overflow": settings.db_pool_size,
        "pool_pre_ping": True,
        "hide_parameters": True,
    }
    options.update(kwargs)
    return create_engine(database_url(settings), **options)


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
    costs four (the pool's ping as it is checked out, BEGIN, the look, ROLLBACK)."""
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
