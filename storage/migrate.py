"""Schema migrations (Alembic), for SQLite and PostgreSQL alike."""

from __future__ import annotations

import threading
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect

from config.errors import StorageError

SCRIPTS = Path(__file__).with_name("migrations")
# Alembic's command API keeps module-level state: one upgrade per process at
# a time. Across processes the database lock in env.py orders them.
_LOCK = threading.Lock()


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(SCRIPTS))
    return config


def head() -> str:
    revision = ScriptDirectory.from_config(_config()).get_current_head()
    assert revision is not None
    return revision


def current(engine: Engine) -> str | None:
    """The schema revision of the database; None when it has no schema."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> str:
    """Bring the schema to ``revision``; safe to call from several processes
    at once. Returns the revision the database is at afterwards. A database
    that holds tables but no revision (not made by Embargo) is refused."""
    tables = inspect(engine).get_table_names()
    if tables and "alembic_version" not in tables:
        names = ", ".join(sorted(tables)[:5])
        raise StorageError(f"the database has tables ({names}…) but no Embargo schema "
                           "revision; use an empty database")
    config = _config()
    with _LOCK, engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
    after = current(engine)
    assert after is not None
    return after
