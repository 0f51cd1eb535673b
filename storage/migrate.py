"""Schema migrations (Alembic), for SQLite and PostgreSQL alike."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, inspect, text
from sqlalchemy.exc import DBAPIError

from config.errors import SchemaError, StorageError

if TYPE_CHECKING:
    from alembic.config import Config

SCRIPTS = Path(__file__).with_name("migrations")
# The newest revision under migrations/versions. Every command checks the
# database against it, so it is a constant here rather than read through
# Alembic, whose import costs a tenth of a second at each start
# (tests/test_nodes.py checks that the two agree).
HEAD = "0008"
# Alembic's command API keeps module-level state: one upgrade per process at
# a time. Across processes the database lock in env.py orders them.
_LOCK = threading.Lock()


def _config() -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(SCRIPTS))
    return config


def head() -> str:
    """The newest schema revision this code knows."""
    return HEAD


def scripts_head() -> str | None:
    """The newest revision among the migration scripts, read through Alembic."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_config()).get_current_head()


def current(engine: Engine) -> str | None:
    """The schema revision of the database; None when it has no schema."""
    with engine.connect() as connection:
        try:
            return connection.execute(text("SELECT version_num FROM alembic_version")
                                      ).scalar_one_or_none()
        except DBAPIError:  # no alembic_version table: an empty database
            return None


def require_current(engine: Engine) -> None:
    """Check, without changing anything, that the database is at
    :data:`HEAD`. Raises SchemaError naming both revisions otherwise."""
    found = current(engine)
    if found != HEAD:
        raise SchemaError(current=found, needed=HEAD)


def upgrade(engine: Engine, revision: str = "head") -> str:
    """Bring the schema to ``revision``; safe to call from several processes
    at once. Returns the revision the database is at afterwards. A database
    that holds tables but no revision (not made by Embargo) is refused."""
    tables = inspect(engine).get_table_names()
    if tables and "alembic_version" not in tables:
        names = ", ".join(sorted(tables)[:5])
        raise StorageError(f"the database has tables ({names}…) but no Embargo schema "
                           "revision; use an empty database")
    from alembic import command

    config = _config()
    with _LOCK, engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
    after = current(engine)
    assert after is not None
    return after
