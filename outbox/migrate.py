"""Alembic, driven from Python: the only way the schema is made or changed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from alembic import command
from alembic.config import Config

from outbox.db import database_url
from outbox.settings import Settings


def _script_location() -> str:
    spec = importlib.util.find_spec("migrations")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the migrations package is not installed")
    return str(Path(next(iter(spec.submodule_search_locations))))


def alembic_config(settings: Settings) -> Config:
    """An Alembic config for the settings' database, independent of the working directory."""
    config = Config()
    config.set_main_option("script_location", _script_location())
    # ConfigParser interpolation would eat a '%' in a password.
    config.set_main_option("sqlalchemy.url", database_url(settings).replace("%", "%%"))
    return config


def upgrade(settings: Settings, revision: str = "head") -> None:
    """Apply migrations up to ``revision``."""
    command.upgrade(alembic_config(settings), revision)


def downgrade(settings: Settings, revision: str = "base") -> None:
    """Revert migrations down to ``revision``."""
    command.downgrade(alembic_config(settings), revision)


def current(settings: Settings) -> None:
    """Print the database's revision."""
    command.current(alembic_config(settings), verbose=False)
