from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from outbox import migrate
from outbox.models import Base
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
