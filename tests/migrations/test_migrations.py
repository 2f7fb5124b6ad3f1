from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from outbox import migrate
from outbox.models import MAX_BACKOFF_S, MAX_HANDLER_TIMEOUT_S, MAX_RETRY_FACTOR, Base
from outbox.settings import Settings


def _tables(settings: Settings) -> set[str]:
    assert settings.database_url is not None
    engine = create_engine(settings.database_url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _drift(settings: Settings) -> list:
    assert settings.database_url is not None
    engine = create_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            return compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()


def test_upgrade_from_empty_matches_the_models_exactly(empty_database: Settings):
    migrate.upgrade(empty_database)
    assert _tables(empty_database) == set(Base.metadata.tables) | {"alembic_version"}
    assert _drift(empty_database) == []


def test_downgrade_to_base_removes_everything_and_upgrade_works_again(empty_database: Settings):
    migrate.upgrade(empty_database)
    migrate.downgrade(empty_database, "base")
    assert _tables(empty_database) == {"alembic_version"}
    migrate.upgrade(empty_database)
    assert _drift(empty_database) == []


def test_the_claim_and_inbox_indexes_are_partial(empty_database: Settings):
    migrate.upgrade(empty_database)
    assert empty_database.database_url is not None
    engine = create_engine(empty_database.database_url)
    try:
        outbox = {i["name"]: i for i in inspect(engine).get_indexes("outbox_messages")}
        inbox = {i["name"]: i for i in inspect(engine).get_indexes("inbox_messages")}
    finally:
        engine.dispose()
    claim = outbox["ix_outbox_messages_claimable"]
    assert claim["column_names"] == ["bucket", "id"]
    assert "pending" in claim["dialect_options"]["postgresql_where"]
    due = inbox["ix_inbox_messages_due"]
    assert due["column_names"] == ["consumer_group", "lane", "id"]
    assert "received" in due["dialect_options"]["postgresql_where"]


def test_outbox_db_upgrade_and_current_from_the_command_line(empty_database: Settings):
    from click.testing import CliRunner

    from outbox.cli import cli

    env = {"OUTBOX_DATABASE_URL": empty_database.database_url}
    result = CliRunner().invoke(cli, ["db", "upgrade"], env=env)
    assert result.exit_code == 0, result.output
    assert _drift(empty_database) == []
    result = CliRunner().invoke(cli, ["db", "downgrade", "base"], env=env)
    assert result.exit_code == 0, result.output
    assert _tables(empty_database) == {"alembic_version"}


def test_upgrading_brings_out_of_bounds_retry_settings_to_their_bounds(empty_database: Settings):
    """Groups written before the bounds existed (through the library, which the API's
    validation never saw) keep working: their values are brought inside."""
    migrate.upgrade(empty_database, "0013")
    assert empty_database.database_url is not None
    engine = create_engine(empty_database.database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO topics (name) VALUES ('orders')"))
            conn.execute(
                text(
                    "INSERT INTO consumer_groups (name, topic, retry_base_s, retry_cap_s,"
                    " retry_factor, max_attempts, handler_timeout_s) VALUES"
                    " ('huge', 'orders', 'Infinity', 'NaN', 1e9, 0, 1e6),"
                    " ('fine', 'orders', 2, 60, 3, 5, 10)"
                )
            )
        migrate.upgrade(empty_database)
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT name, retry_base_s, retry_cap_s, retry_factor, max_attempts,"
                    " handler_timeout_s FROM consumer_groups ORDER BY name"
                )
            ).all()
    finally:
        engine.dispose()
    assert [tuple(r) for r in rows] == [
        ("fine", 2.0, 60.0, 3.0, 5, 10.0),
        ("huge", MAX_BACKOFF_S, MAX_BACKOFF_S, MAX_RETRY_FACTOR, 1, MAX_HANDLER_TIMEOUT_S),
    ]
